"""core.models: validation errors that name the field, and the task state machine."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from core.errors import IllegalTransitionError, UnrecoverableError
from core.models import (
    COMMAND_PLACEHOLDERS,
    TERMINAL_STATES,
    TRANSITIONS,
    AdapterSpec,
    GateCheck,
    RoutingDecision,
    RoutingDecisions,
    TaskQueue,
    TaskSpec,
    TaskState,
    transition,
)

COMMIT = "a" * 40


def task(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task_id": "t1",
        "prompt": "do it",
        "repo": "repo",
        "base_commit": COMMIT,
    }
    data.update(over)
    return data


def only_error(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, Any]:
    errors = exc.value.errors()
    assert len(errors) == 1, errors
    return dict(errors[0])


def loc(exc: pytest.ExceptionInfo[ValidationError]) -> tuple[Any, ...]:
    return tuple(only_error(exc)["loc"])


# --------------------------------------------------------------------------- ids and commits


@pytest.mark.parametrize(
    "bad_id",
    ["", "Upper", "under_score", "-leading", "trailing-", "a" * 64, "sp ace", "dot.ted", "ü"],
)
def test_bad_task_id_names_the_field(bad_id: str) -> None:
    with pytest.raises(ValidationError) as exc:
        TaskSpec.model_validate(task(task_id=bad_id))
    assert loc(exc) == ("task_id",)


@pytest.mark.parametrize("good_id", ["a", "t1", "a-b-c", "0", "a" * 63])
def test_good_ids_accepted(good_id: str) -> None:
    assert TaskSpec.model_validate(task(task_id=good_id)).task_id == good_id


def test_bad_run_id_in_queue_names_the_field() -> None:
    with pytest.raises(ValidationError) as exc:
        TaskQueue.model_validate({"run_id": "Run_1", "tasks": [task()]})
    assert loc(exc) == ("run_id",)


def test_bad_adapter_id_in_decision_names_nested_field() -> None:
    with pytest.raises(ValidationError) as exc:
        RoutingDecisions.model_validate(
            {
                "run_id": "r",
                "adapters": [{"id": "a", "kind": "patch"}],
                "decisions": [{"task_id": "t1", "adapter_id": "Bad_Adapter"}],
            }
        )
    assert loc(exc) == ("decisions", 0, "adapter_id")


@pytest.mark.parametrize(
    "commit",
    ["abc123", "A" * 40, "g" * 40, "a" * 39, "a" * 41, "", "HEAD", "main"],
)
def test_bad_base_commit_names_the_field(commit: str) -> None:
    with pytest.raises(ValidationError) as exc:
        TaskSpec.model_validate(task(base_commit=commit))
    assert loc(exc) == ("base_commit",)


def test_nested_task_error_location_in_queue() -> None:
    with pytest.raises(ValidationError) as exc:
        TaskQueue.model_validate(
            {"run_id": "r", "tasks": [task(), task(task_id="t2", base_commit="nope")]}
        )
    assert loc(exc) == ("tasks", 1, "base_commit")


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        TaskSpec.model_validate(task(promt="typo"))
    assert loc(exc) == ("promt",)


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("placeholder", sorted(COMMAND_PLACEHOLDERS - {"target_paths"}))
def test_known_placeholders_accepted(placeholder: str) -> None:
    spec = AdapterSpec(id="a", kind="process", command=["tool", f"--x={{{placeholder}}}"])
    assert spec.command == ["tool", f"--x={{{placeholder}}}"]


def test_unknown_placeholder_in_adapter_command_names_field_and_placeholder() -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind="process", command=["tool", "--msg={prompt}"])
    err = only_error(exc)
    assert tuple(err["loc"]) == ("command", 1)  # the argument itself
    assert "unknown placeholder {prompt}" in err["msg"]
    assert "prompt_file" in err["msg"]  # lists the known ones


def test_unknown_placeholder_in_gate_check_names_field() -> None:
    with pytest.raises(ValidationError) as exc:
        GateCheck(name="lint", command=["ruff", "{title}"])
    assert loc(exc) == ("command", 1)
    assert "{title}" in only_error(exc)["msg"]


def test_unknown_placeholder_nested_in_adapter_gate() -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(
            id="a",
            kind="patch",
            gate=[{"name": "ok", "command": ["true"]}, {"name": "x", "command": ["{nope}"]}],
        )
    assert loc(exc) == ("gate", 1, "command", 0)


def test_target_paths_as_whole_argument_is_fine() -> None:
    spec = AdapterSpec(id="a", kind="process", command=["tool", "{target_paths}"])
    assert spec.command == ["tool", "{target_paths}"]


@pytest.mark.parametrize("arg", ["--files={target_paths}", "{target_paths} ", "x{target_paths}"])
def test_target_paths_inside_an_argument_is_refused(arg: str) -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind="process", command=["tool", arg])
    err = only_error(exc)
    assert tuple(err["loc"]) == ("command", 1)
    assert "{target_paths} must be a whole argument" in err["msg"]


def test_escaped_braces_are_not_placeholders() -> None:
    spec = AdapterSpec(id="a", kind="process", command=["sh", "-c", "echo {{literal}}"])
    assert spec.command is not None


def test_process_adapter_needs_command_or_template() -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind="process")
    assert "exactly one of `command` or `template`" in str(exc.value)


def test_process_adapter_refuses_command_and_template() -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind="process", command=["x"], template="aider")
    assert "exactly one of `command` or `template`" in str(exc.value)


@pytest.mark.parametrize("kind", ["patch", "manual"])
@pytest.mark.parametrize("extra", [{"command": ["x"]}, {"template": "codex"}])
def test_patch_and_manual_adapters_take_no_command(kind: str, extra: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind=kind, **extra)
    assert f"a {kind} adapter takes no `command`/`template`" in str(exc.value)


def test_process_adapter_with_template_or_command_is_valid() -> None:
    assert AdapterSpec(id="a", kind="process", template="aider").template == "aider"
    assert AdapterSpec(id="b", kind="process", command=["true"]).command == ["true"]


def test_unknown_template_names_field() -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind="process", template="cursor")
    assert loc(exc) == ("template",)


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", ""])
def test_pass_env_names_validated(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind="process", command=["x"], pass_env=["OK_NAME", name])
    assert loc(exc) == ("pass_env",)


# --------------------------------------------------------------------------- duplicates, paths


def test_duplicate_task_ids_in_queue_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        TaskQueue.model_validate({"run_id": "r", "tasks": [task(), task(title="again")]})
    assert "duplicate task_id 't1'" in str(exc.value)


def test_duplicate_adapter_ids_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        RoutingDecisions.model_validate(
            {
                "run_id": "r",
                "adapters": [{"id": "a", "kind": "patch"}, {"id": "a", "kind": "manual"}],
                "decisions": [{"task_id": "t1", "adapter_id": "a"}],
            }
        )
    assert "duplicate adapter id 'a'" in str(exc.value)


def test_duplicate_decisions_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        RoutingDecisions.model_validate(
            {
                "run_id": "r",
                "adapters": [{"id": "a", "kind": "patch"}],
                "decisions": [
                    {"task_id": "t1", "adapter_id": "a"},
                    {"task_id": "t1", "adapter_id": "a"},
                ],
            }
        )
    assert "duplicate decision for task_id 't1'" in str(exc.value)


def test_empty_queue_and_decisions_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        TaskQueue.model_validate({"run_id": "r", "tasks": []})
    assert loc(exc) == ("tasks",)
    with pytest.raises(ValidationError) as exc2:
        RoutingDecisions.model_validate({"run_id": "r", "adapters": [], "decisions": []})
    assert {tuple(e["loc"]) for e in exc2.value.errors()} == {("adapters",), ("decisions",)}


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../outside", "a/../../b", "src/..", "/", "--yes-always", "-x", ""]
)
def test_target_paths_must_stay_in_repo_and_never_look_like_options(path: str) -> None:
    with pytest.raises(ValidationError) as exc:
        TaskSpec.model_validate(task(target_paths=["ok.py", path]))
    err = only_error(exc)
    assert tuple(err["loc"]) == ("target_paths", 1)
    assert (repr(path) if path else "empty") in err["msg"]


@pytest.mark.parametrize(
    "path", ["src/a.py", "a..b/c", "dir/file with space.txt", "..hidden", "./-dash", "a/-b"]
)
def test_relative_target_paths_accepted(path: str) -> None:
    assert TaskSpec.model_validate(task(target_paths=[path])).target_paths == [path]


def test_models_are_frozen() -> None:
    spec = TaskSpec.model_validate(task())
    with pytest.raises(ValidationError):
        spec.task_id = "other"  # type: ignore[misc]


def test_routing_decision_fallbacks_validated() -> None:
    with pytest.raises(ValidationError) as exc:
        RoutingDecision(task_id="t", adapter_id="a", fallback_adapter_ids=["ok", "NOT OK"])
    assert loc(exc) == ("fallback_adapter_ids", 1)


# --------------------------------------------------------------------------- state machine

ALL_PAIRS = list(itertools.product(TaskState, TaskState))
LEGAL = [(a, b) for a, b in ALL_PAIRS if b in TRANSITIONS[a]]
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if b not in TRANSITIONS[a]]


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(TaskState)


def test_contract_path_is_legal() -> None:
    state = TaskState.PENDING
    for nxt in (TaskState.IN_PROGRESS, TaskState.VALIDATING, TaskState.COMPLETED):
        state = transition(state, nxt)
    assert state is TaskState.COMPLETED
    for end in (TaskState.FAILED, TaskState.CANCELLED):
        assert transition(TaskState.VALIDATING, end) is end
    assert transition(TaskState.IN_PROGRESS, TaskState.TIMEOUT) is TaskState.TIMEOUT


@pytest.mark.parametrize(("current", "target"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_every_legal_move_works(current: TaskState, target: TaskState) -> None:
    assert transition(current, target) is target


@pytest.mark.parametrize(("current", "target"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_every_illegal_move_raises(current: TaskState, target: TaskState) -> None:
    with pytest.raises(IllegalTransitionError) as exc:
        transition(current, target)
    assert str(current) in str(exc.value) and str(target) in str(exc.value)


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_terminal_states_have_no_exits(state: TaskState) -> None:
    assert state.terminal
    assert TRANSITIONS[state] == frozenset()
    for target in TaskState:
        with pytest.raises(IllegalTransitionError):
            transition(state, target)


def test_non_terminal_states() -> None:
    assert {s for s in TaskState if not s.terminal} == {
        TaskState.PENDING,
        TaskState.IN_PROGRESS,
        TaskState.VALIDATING,
    }


def test_specific_illegal_moves() -> None:
    # Skipping states or going backwards out of a result is refused.
    for current, target in [
        (TaskState.PENDING, TaskState.COMPLETED),
        (TaskState.PENDING, TaskState.VALIDATING),
        (TaskState.IN_PROGRESS, TaskState.COMPLETED),
        (TaskState.VALIDATING, TaskState.TIMEOUT),
        (TaskState.COMPLETED, TaskState.PENDING),
        (TaskState.FAILED, TaskState.IN_PROGRESS),
        (TaskState.PENDING, TaskState.PENDING),
    ]:
        with pytest.raises(IllegalTransitionError):
            transition(current, target)


def test_illegal_transition_is_unrecoverable() -> None:
    assert issubclass(IllegalTransitionError, UnrecoverableError)


@given(st.sampled_from(list(TaskState)), st.sampled_from(list(TaskState)))
def test_transition_agrees_with_table(current: TaskState, target: TaskState) -> None:
    if target in TRANSITIONS[current]:
        assert transition(current, target) is target
    else:
        with pytest.raises(IllegalTransitionError):
            transition(current, target)


@given(st.lists(st.sampled_from(list(TaskState)), max_size=30))
def test_random_walks_never_leave_a_terminal_state(path: list[TaskState]) -> None:
    state = TaskState.PENDING
    for target in path:
        try:
            new = transition(state, target)
        except IllegalTransitionError:
            assert target not in TRANSITIONS[state]
            continue
        assert not state.terminal, f"left terminal state {state}"
        state = new


@pytest.mark.parametrize(
    ("fallbacks", "where", "says"),
    [
        (["b", "b"], ("fallback_adapter_ids", 1), "duplicate item 'b'"),
        (["b", "a"], (), "must not repeat adapter_id"),
    ],
)
def test_fallbacks_are_refused_where_a_task_execution_would_refuse_them(
    fallbacks: list[str], where: tuple[Any, ...], says: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        RoutingDecision(task_id="t", adapter_id="a", fallback_adapter_ids=fallbacks)
    err = only_error(exc)
    assert tuple(err["loc"]) == where and says in err["msg"]

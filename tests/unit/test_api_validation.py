"""The pydantic side of the API's validation (tests/api_cases.py), and the rules themselves.

Each bad object of the shared table is refused by the models at exactly the field the API
server names (tests/e2e/test_crd_validation.py holds the server to the same table); the
placeholder regex that the CRD carries is held against ``str.format`` parsing, the ground
truth of how a command is expanded.
"""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from core.api_rules import ADAPTER_NAME_RULE, TASK_EXECUTION_NAME_RULE
from core.argv import (
    COMMAND_PLACEHOLDERS,
    GATE_PLACEHOLDERS,
    WHOLE_ARGUMENT_PLACEHOLDERS,
    argument_rule,
)
from core.crd import adapter_crd, task_execution_crd
from core.engine.command_line import expand_argv
from core.models import AdapterSpec
from core.resources import (
    AdapterResourceSpec,
    TaskExecutionSpec,
)
from core.rules import CEL_KEY, cel_string, without_kubernetes_keys
from tests.api_cases import BAD, GOOD, Case


def api_path(loc: tuple[str | int, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def pydantic_errors(case: Case) -> list[tuple[str, str]]:
    """(API field path, message) of every error the models find in ``case``'s object."""
    body = case.body()
    rule = ADAPTER_NAME_RULE if case.kind == "Adapter" else TASK_EXECUTION_NAME_RULE
    errors = []
    problem = rule.problem(body["metadata"]["name"])
    if problem is not None:
        errors.append(("metadata.name", problem))
    model: type[BaseModel] = AdapterResourceSpec if case.kind == "Adapter" else TaskExecutionSpec
    try:
        model.model_validate(body["spec"])
    except ValidationError as exc:
        errors += [(api_path(tuple(e["loc"])), e["msg"]) for e in exc.errors()]
    return errors


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_objects_are_refused_by_the_models_at_the_field(case: Case) -> None:
    errors = pydantic_errors(case)
    assert [field for field, _ in errors] == [case.field], errors
    assert case.says.lower() in errors[0][1].lower(), errors


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_good_objects_pass_the_models(case: Case) -> None:
    assert pydantic_errors(case) == []


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in BAD + GOOD]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- placeholders


def format_verdict(arg: str, names: frozenset[str]) -> bool:
    """Whether ``arg`` is usable, by how ``str.format`` reads it (the expansion's parser) and
    what ``exec`` takes (no NUL)."""
    if "\x00" in arg:
        return False
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError:
        return False
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in names or spec or conversion:
            return False
        if name in WHOLE_ARGUMENT_PLACEHOLDERS and arg != f"{{{name}}}":
            return False
    return True


ARG_PIECES = st.lists(
    st.sampled_from(
        ["{", "}", "{{", "}}", "a", " ", "-", ":", "!r", ":03d", "\n", "\x00", "é"]
        + sorted(COMMAND_PLACEHOLDERS)
        + [f"{{{n}}}" for n in COMMAND_PLACEHOLDERS]
        + ["{foo}", "{i:07d}", "{0}", "{}", "{task_id.x}", "{attempt[0]}"]
    ),
    max_size=6,
).map("".join)


@settings(max_examples=600, deadline=None)
@given(ARG_PIECES)
def test_the_crd_regex_agrees_with_str_format(arg: str) -> None:
    for names in (COMMAND_PLACEHOLDERS, GATE_PLACEHOLDERS):
        assert argument_rule(names).check(arg) == format_verdict(arg, names), (arg, names)


@settings(max_examples=300, deadline=None)
@given(ARG_PIECES)
def test_an_accepted_argument_always_expands(arg: str) -> None:
    if not argument_rule(COMMAND_PLACEHOLDERS).check(arg):
        return
    values: dict[str, Any] = {n: f"<{n}>" for n in COMMAND_PLACEHOLDERS}
    values["target_paths"] = ["a.py", "b.py"]
    expanded = expand_argv([arg], values)  # raises on anything it cannot expand
    assert expanded == (["a.py", "b.py"] if arg == "{target_paths}" else [arg.format(**values)])


def test_the_running_example_of_issue_11_is_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        AdapterSpec(id="a", kind="process", command=["seq", "{i:07d}"])
    assert "unknown placeholder {i}" in str(exc.value)


# --------------------------------------------------------------------------- the CRD's rules


def _rules(node: Any, path: str = "") -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    if isinstance(node, dict):
        out += [(path, r) for r in node.get(CEL_KEY, [])]
        for key, value in node.items():
            if key != CEL_KEY:
                out += _rules(value, f"{path}.{key}")
    elif isinstance(node, list):
        for value in node:
            out += _rules(value, path)
    return out


@pytest.mark.parametrize("crd", [task_execution_crd(), adapter_crd()], ids=["tex", "adp"])
def test_every_rule_of_the_crd_says_what_to_do(crd: dict[str, Any]) -> None:
    rules = _rules(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert len(rules) >= 4
    for path, rule in rules:
        assert len(rule["message"]) >= 20, (path, rule)
        assert set(rule) <= {"rule", "message", "fieldPath"}, (path, rule)


def test_rules_and_list_types_stay_out_of_the_json_schemas() -> None:
    schema = AdapterResourceSpec.model_json_schema(by_alias=True)
    assert CEL_KEY in str(schema)
    assert CEL_KEY not in str(without_kubernetes_keys(schema))
    assert "x-kubernetes-list-type" not in str(without_kubernetes_keys(schema))


@pytest.mark.parametrize("text", [r"^a\.b$", "it's", "a\\'b", "line\nbreak"])
def test_cel_string_literals_round_trip(text: str) -> None:
    literal = cel_string(text)
    if literal.startswith("r'"):
        assert literal[2:-1] == text
    else:
        body = literal[1:-1]
        assert re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), body) == text

"""The one attempt lifecycle: pure decisions over a task's history (no I/O, no clock)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.engine.lifecycle import (
    AttemptEvidence,
    Finish,
    Start,
    TaskPlan,
    Wait,
    WaitCause,
    conclude,
    interrupted_evidence,
    needs_gate,
    next_step,
    spent_seconds,
)
from core.models import (
    AdapterSpec,
    AttemptResult,
    CheckResult,
    CheckStatus,
    DiffSummary,
    FailureClass,
    GateResult,
    RetryPolicy,
    TaskSpec,
    TaskState,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
COMMIT = "a" * 40
DIFF = DiffSummary(sha256="f" * 64, bytes=10, files_changed=1, insertions=1, deletions=0, empty=False)
EMPTY = DiffSummary(sha256="e" * 64, bytes=0, files_changed=0, insertions=0, deletions=0, empty=True)
NO_JITTER = {"jitter_seconds": 0.0, "backoff_initial_seconds": 2.0, "backoff_max_seconds": 60}


def adapter(id_: str, timeout: float = 100.0, **retry: object) -> AdapterSpec:
    return AdapterSpec(
        id=id_,
        kind="patch",
        timeout_seconds=timeout,
        retry=RetryPolicy(**{**NO_JITTER, **retry}),
    )


def plan(
    *ids: str,
    budget: float | None = None,
    retry: dict[str, object] | None = None,
    allow_empty: bool = False,
    timeout: float = 100.0,
) -> TaskPlan:
    ids = ids or ("a",)
    task = TaskSpec(
        task_id="t",
        prompt="p",
        repo="r",
        base_commit=COMMIT,
        timeout_seconds=budget,
        allow_empty_diff=allow_empty,
        retry=RetryPolicy(**{**NO_JITTER, **(retry or {})}) if retry is not None else None,
    )
    return TaskPlan.of(task, list(ids), {i: adapter(i, timeout) for i in ids})


def evidence(attempt: int = 1, adapter_id: str = "a", seconds: float = 5.0, **kw: object):
    return AttemptEvidence(
        attempt=attempt,
        adapter_id=adapter_id,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=seconds),
        **kw,  # type: ignore[arg-type]
    )


def ok(**kw: object) -> AttemptEvidence:
    gate = GateResult(passed=True, applied=True)
    return evidence(exit_code=0, diff=DIFF, gate=gate, **kw)


def failed_gate(**kw: object) -> AttemptEvidence:
    check = CheckResult(
        name="unit", status=CheckStatus.FAILED, exit_code=1, duration_seconds=1, output_tail="E1"
    )
    gate = GateResult(passed=False, applied=True, checks=[check])
    return evidence(exit_code=0, diff=DIFF, gate=gate, **kw)


def run(p: TaskPlan, *evidences: AttemptEvidence, seed: int = 1) -> list[AttemptResult]:
    history: list[AttemptResult] = []
    for ev in evidences:
        history.append(conclude(p, history, ev, rng=random.Random(seed)).result)
    return history


# --------------------------------------------------------------------------- next_step


def test_first_attempt_takes_the_primary_with_its_timeout() -> None:
    step = next_step(plan("a", "b", budget=50), [], now=T0, admits={})
    assert step == Start(attempt=1, adapter_id="a", timeout_seconds=50.0)
    step = next_step(plan("a", timeout=30, budget=50), [], now=T0, admits={})
    assert isinstance(step, Start) and step.timeout_seconds == 30.0


def test_open_breaker_sends_the_first_attempt_to_the_fallback_or_waits() -> None:
    p = plan("a", "b")
    assert next_step(p, [], now=T0, admits={"a": False}) == Start(1, "b", 100.0)
    step = next_step(p, [], now=T0, admits={"a": False, "b": False})
    assert isinstance(step, Wait) and step.cause is WaitCause.BREAKER and step.until is None
    assert "circuit breaker open" in step.reason


def test_a_retry_waits_out_its_backoff_then_moves_to_the_fallback() -> None:
    p = plan("a", "b")
    history = run(p, evidence(exit_code=1))
    last = history[-1]
    assert not last.final and last.backoff_seconds == 2.0 and last.task_final_state is None
    ready = last.finished_at + timedelta(seconds=2)
    step = next_step(p, history, now=ready - timedelta(seconds=1), admits={})
    assert step == Wait(step.reason, WaitCause.BACKOFF, ready)  # type: ignore[union-attr]
    assert next_step(p, history, now=ready, admits={}) == Start(2, "b", 100.0 - 5.0 - 2.0)


def test_infrastructure_failures_retry_the_same_adapter() -> None:
    p = plan("a", "b")
    history = run(p, evidence(infrastructure_reason="node lost"))
    step = next_step(p, history, now=T0 + timedelta(hours=1), admits={})
    assert isinstance(step, Start) and step.adapter_id == "a" and step.attempt == 2


def test_gate_failure_retry_carries_the_gate_feedback() -> None:
    p = plan("a", retry={"retry_on": ["gate_failed"]})
    history = run(p, failed_gate())
    step = next_step(p, history, now=T0 + timedelta(hours=1), admits={})
    assert isinstance(step, Start) and step.feedback is not None
    assert "check 'unit': failed" in step.feedback and "E1" in step.feedback


def test_a_retry_gets_what_is_left_and_a_spent_budget_finishes_as_timeout() -> None:
    p = plan("a", budget=8)
    history = run(p, evidence(exit_code=1, seconds=5))  # 5 s + 2 s backoff of 8 s
    assert spent_seconds(history) == 7.0
    step = next_step(p, history, now=T0 + timedelta(hours=1), admits={})
    assert step == Start(2, "a", 1.0)
    # a history that leaves less than min_attempt_seconds (e.g. replayed from a ledger whose
    # entry was written before a crash) finishes instead of starting a pointless attempt
    spent = [history[0].model_copy(update={"duration_seconds": 6.5})]
    step = next_step(p, spent, now=T0 + timedelta(hours=1), admits={})
    assert isinstance(step, Finish)
    assert step.state is TaskState.TIMEOUT and step.budget_exhausted
    assert step.failure_class is FailureClass.ADAPTER_ERROR
    assert "task budget of 8s exhausted" in step.message


# --------------------------------------------------------------------------- conclude


def test_success_completes_the_task() -> None:
    verdict = conclude(plan(), [], ok(), rng=random.Random(0))
    assert verdict.finish is not None and verdict.finish.state is TaskState.COMPLETED
    result = verdict.result
    assert result.final and result.task_final_state is TaskState.COMPLETED
    assert result.state is TaskState.COMPLETED and result.failure_class is None
    assert result.duration_seconds == 5.0 and result.backoff_seconds == 0.0


@pytest.mark.parametrize(
    ("ev", "state", "failure"),
    [
        (evidence(timed_out=True), TaskState.TIMEOUT, FailureClass.ADAPTER_TIMEOUT),
        (evidence(exit_code=0, diff=EMPTY), TaskState.FAILED, FailureClass.EMPTY_DIFF),
        (failed_gate(), TaskState.FAILED, FailureClass.GATE_FAILED),
        (evidence(cancelled=True), TaskState.CANCELLED, FailureClass.CANCELLED),
    ],
)
def test_final_states_of_failures_that_are_not_retried(
    ev: AttemptEvidence, state: TaskState, failure: FailureClass
) -> None:
    p = plan(retry={"max_attempts": 1})
    verdict = conclude(p, [], ev, rng=random.Random(0))
    assert verdict.finish is not None
    assert (verdict.finish.state, verdict.finish.failure_class) == (state, failure)
    assert verdict.result.task_final_state is state


def test_attempts_exhausted_after_adapter_errors_is_failed() -> None:
    p = plan("a", "b", retry={"max_attempts": 2})
    history = run(p, evidence(exit_code=1), evidence(2, "b", exit_code=3))
    assert [a.final for a in history] == [False, True]
    assert history[-1].task_final_state is TaskState.FAILED
    assert history[-1].failure_class is FailureClass.ADAPTER_ERROR


def test_budget_spent_after_an_adapter_error_is_timeout_on_both_backends() -> None:
    """The case that disagreed: the embedded store said FAILED, the operator TIMEOUT."""
    p = plan("a", budget=6)
    verdict = conclude(p, [], evidence(exit_code=1, seconds=5), rng=random.Random(0))
    assert verdict.finish is not None
    assert verdict.finish.state is TaskState.TIMEOUT and verdict.finish.budget_exhausted
    assert verdict.finish.failure_class is FailureClass.ADAPTER_ERROR
    assert verdict.result.state is TaskState.FAILED  # the attempt failed; the task timed out
    assert verdict.result.task_final_state is TaskState.TIMEOUT
    assert "task budget of 6s exhausted" in verdict.finish.message


def test_an_interrupted_attempt_is_charged_what_it_ran_at_most_what_it_was_granted() -> None:
    p = plan("a", budget=100)
    long_ago = interrupted_evidence(
        attempt=1, adapter_id="a", started_at=T0, granted_seconds=30, now=T0 + timedelta(days=1)
    )
    verdict = conclude(p, [], long_ago, rng=random.Random(0))
    assert verdict.result.duration_seconds == 30.0
    assert verdict.result.failure_class is FailureClass.INFRASTRUCTURE
    assert verdict.finish is None  # retried: infrastructure is in retry_on by default
    short = interrupted_evidence(
        attempt=1, adapter_id="a", started_at=T0, granted_seconds=30, now=T0 + timedelta(seconds=4)
    )
    assert conclude(p, [], short, rng=random.Random(0)).result.duration_seconds == 4.0


def test_needs_gate_only_for_a_clean_adapter_with_a_usable_diff() -> None:
    p = plan()
    assert needs_gate(p, evidence(exit_code=0, diff=DIFF))
    assert not needs_gate(p, evidence(exit_code=0, diff=EMPTY))
    assert needs_gate(plan(allow_empty=True), evidence(exit_code=0, diff=EMPTY))
    assert not needs_gate(p, evidence(exit_code=1, diff=DIFF))
    assert not needs_gate(p, evidence(exit_code=0, diff=DIFF, timed_out=True))
    assert not needs_gate(p, evidence(exit_code=0, diff=DIFF, infrastructure_reason="evicted"))
    assert not needs_gate(p, evidence(exit_code=0, diff=None))


def test_the_same_history_and_seed_give_the_same_verdict() -> None:
    p = plan("a", "b", retry={"jitter_seconds": 3.0})
    first = conclude(p, [], evidence(exit_code=1), rng=random.Random(7)).result
    again = conclude(p, [], evidence(exit_code=1), rng=random.Random(7)).result
    assert first == again and 2.0 <= first.backoff_seconds <= 5.0


@settings(max_examples=200, deadline=None)
@given(
    durations=st.lists(st.floats(0, 50), min_size=1, max_size=6),
    budget=st.floats(1, 200),
    max_attempts=st.integers(1, 6),
)
def test_never_more_attempts_or_budget_than_the_policy_allows(
    durations: list[float], budget: float, max_attempts: int
) -> None:
    p = plan("a", "b", budget=budget, retry={"max_attempts": max_attempts})
    history: list[AttemptResult] = []
    now = T0
    for seconds in durations:
        step = next_step(p, history, now=now + timedelta(days=1), admits={})
        if not isinstance(step, Start):
            assert isinstance(step, Finish)
            break
        assert step.attempt == len(history) + 1 <= max_attempts
        assert 0 < step.timeout_seconds <= budget - spent_seconds(history) + 1e-9
        ran = min(seconds, step.timeout_seconds)
        ev = AttemptEvidence(
            step.attempt, step.adapter_id, now, now + timedelta(seconds=ran), exit_code=1
        )
        verdict = conclude(p, history, ev, rng=random.Random(0))
        history.append(verdict.result)
        if verdict.finish is not None:
            break
        now = ev.finished_at
    assert len(history) <= max_attempts
    finals = [a for a in history if a.final]
    assert len(finals) <= 1 and (not finals or finals[0] is history[-1])

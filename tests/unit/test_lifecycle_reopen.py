"""The lifecycle's answer to an integration verdict: reopen a completed task, or leave it.

Pure decisions (no I/O): the same retry policy and budget as for a failed attempt, the next
attempt on the same adapter with the verdict's feedback, starting from the integration head.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.engine.lifecycle import (
    AttemptEvidence,
    BaseRef,
    Start,
    TaskPlan,
    conclude,
    failure_of,
    next_step,
    reopen,
    spent_seconds,
)
from core.errors import IllegalTransitionError
from core.models import (
    AdapterSpec,
    AttemptResult,
    DiffSummary,
    FailureClass,
    IntegrationFailure,
    IntegrationOutcome,
    RetryPolicy,
    TaskSpec,
    TaskState,
)
from core.models import (
    reopen as reopen_state,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
COMMIT = "a" * 40
HEAD = "b" * 40
DIFF = DiffSummary(
    sha256="f" * 64, bytes=10, files_changed=1, insertions=1, deletions=0, empty=False
)


def plan(retry_on: list[str], *, budget: float = 100.0, max_attempts: int = 3) -> TaskPlan:
    policy = RetryPolicy(
        max_attempts=max_attempts,
        retry_on=retry_on,  # type: ignore[arg-type]
        jitter_seconds=0,
        backoff_initial_seconds=2,
    )
    task = TaskSpec(task_id="t", prompt="p", repo="r", base_commit=COMMIT, timeout_seconds=budget)
    adapters = {i: AdapterSpec(id=i, kind="patch", retry=policy) for i in ("a", "b")}
    return TaskPlan.of(task, ["a", "b"], adapters)


def completed(seconds: float = 10.0, attempt: int = 1) -> AttemptResult:
    p = plan([])
    verdict = conclude(
        p,
        [],
        AttemptEvidence(
            attempt=attempt,
            adapter_id="a",
            started_at=T0,
            finished_at=T0 + timedelta(seconds=seconds),
            exit_code=0,
            diff=DIFF,
        ),
        rng=random.Random(0),
    )
    assert verdict.result.final and verdict.result.state is TaskState.COMPLETED
    return verdict.result


def ran(*, attempt: int, at_hour: int, **ended: Any) -> AttemptEvidence:
    """Attempt ``attempt`` of adapter "a", 5 seconds long from T0 + ``at_hour`` hours."""
    started = T0 + timedelta(hours=at_hour)
    return AttemptEvidence(
        attempt=attempt,
        adapter_id="a",
        started_at=started,
        finished_at=started + timedelta(seconds=5),
        **ended,
    )


def conflict(outcome: IntegrationOutcome = IntegrationOutcome.CONFLICT) -> IntegrationFailure:
    return IntegrationFailure(
        outcome=outcome,  # type: ignore[arg-type]
        message="conflicts with the changes merged before it in x.py",
        feedback="Your change conflicts with x.py; start from the head.",
        rebase_repository="/w/integration/run.git",
        rebase_commit=HEAD,
        decided_at=T0 + timedelta(hours=1),
    )


def test_a_verdict_outside_retry_on_leaves_the_task_completed() -> None:
    answer = reopen(plan(["adapter_error"]), [completed()], conflict(), rng=random.Random(0))
    assert not answer.reopened and answer.result is None
    assert "merge_conflict is not retried" in answer.decision.reason


@pytest.mark.parametrize(
    ("outcome", "klass"),
    [
        (IntegrationOutcome.CONFLICT, FailureClass.MERGE_CONFLICT),
        (IntegrationOutcome.GATE_FAILED, FailureClass.MERGE_GATE_FAILED),
    ],
)
def test_a_retried_verdict_reopens_and_the_next_attempt_gets_feedback_and_the_head(
    outcome: IntegrationOutcome, klass: FailureClass
) -> None:
    p = plan([klass.value])
    first = completed()
    answer = reopen(p, [first], conflict(outcome), rng=random.Random(0))
    assert answer.reopened and answer.result is not None
    amended = answer.result
    # the attempt itself stays what it was; the task's next step is decided by the verdict
    assert amended.state is TaskState.COMPLETED and amended.failure_class is None
    assert not amended.final and amended.task_final_state is None
    assert amended.backoff_seconds == 2.0 and failure_of(amended) is klass
    step = next_step(p, [amended], now=T0 + timedelta(hours=2), admits={})
    assert step == Start(
        attempt=2,
        adapter_id="a",  # the same adapter, like gate_failed
        timeout_seconds=100.0 - 10.0 - 2.0,  # the same budget: attempt 1 and the backoff spent
        feedback="Your change conflicts with x.py; start from the head.",
        base=BaseRef("/w/integration/run.git", HEAD),
    )


def test_the_backoff_is_waited_from_the_attempts_end() -> None:
    p = plan(["merge_conflict"])
    amended = reopen(p, [completed()], conflict(), rng=random.Random(0)).result
    assert amended is not None
    step = next_step(p, [amended], now=T0 + timedelta(seconds=11), admits={})
    assert not isinstance(step, Start)


def test_later_attempts_keep_the_rebased_start_but_not_the_feedback() -> None:
    p = plan(["merge_conflict", "adapter_error"])
    amended = reopen(p, [completed()], conflict(), rng=random.Random(0)).result
    assert amended is not None
    crashed = conclude(
        p,
        [amended],
        ran(attempt=2, at_hour=2, exit_code=1),
        rng=random.Random(0),
    )
    assert crashed.finish is None  # retried: adapter_error is in retry_on
    step = next_step(p, [amended, crashed.result], now=T0 + timedelta(hours=3), admits={})
    assert isinstance(step, Start) and step.attempt == 3
    assert step.adapter_id == "b"  # adapter_error switches to the fallback
    assert step.feedback is None and step.base == BaseRef("/w/integration/run.git", HEAD)


def test_no_reopen_when_attempts_or_budget_are_spent() -> None:
    spent = reopen(
        plan(["merge_conflict"], max_attempts=1), [completed()], conflict(), rng=random.Random(0)
    )
    assert not spent.reopened and "attempts exhausted" in spent.decision.reason
    poor = reopen(
        plan(["merge_conflict"], budget=11.0), [completed(10.0)], conflict(), rng=random.Random(0)
    )
    assert not poor.reopened and poor.decision.budget_exhausted
    assert spent_seconds([completed(10.0)]) == 10.0


def test_only_a_completed_last_attempt_can_be_reopened() -> None:
    p = plan(["merge_conflict"])
    amended = reopen(p, [completed()], conflict(), rng=random.Random(0)).result
    assert amended is not None
    with pytest.raises(ValueError):
        reopen(p, [amended], conflict(), rng=random.Random(0))  # already reopened
    with pytest.raises(ValueError):
        reopen(p, [], conflict(), rng=random.Random(0))


def test_reopen_is_the_one_way_out_of_completed() -> None:
    assert reopen_state(TaskState.COMPLETED) is TaskState.PENDING
    for state in TaskState:
        if state is not TaskState.COMPLETED:
            with pytest.raises(IllegalTransitionError):
                reopen_state(state)


@pytest.mark.parametrize("outcome", [IntegrationOutcome.CONFLICT, IntegrationOutcome.GATE_FAILED])
def test_the_feedback_outlives_an_attempt_lost_to_the_platform(outcome: IntegrationOutcome) -> None:
    """Attempt 2 of a sent-back task never ran (its pod could not be scheduled): attempt 3
    starts from the integration head *and* still gets the verdict's feedback (seen on the
    cluster: it started from the head told nothing, redid its first change and failed its
    own gate). An attempt that did run ends what is said: its own failure's, or nothing."""
    klass = (
        FailureClass.MERGE_CONFLICT
        if outcome is IntegrationOutcome.CONFLICT
        else (FailureClass.MERGE_GATE_FAILED)
    )
    p = plan([klass.value, "infrastructure", "adapter_error"], max_attempts=4)
    amended = reopen(p, [completed()], conflict(outcome), rng=random.Random(0)).result
    assert amended is not None
    lost = conclude(
        p,
        [amended],
        ran(
            attempt=2, at_hour=2, infrastructure_reason="the pod could not be scheduled within 300s"
        ),
        rng=random.Random(0),
    ).result
    assert lost.failure_class is FailureClass.INFRASTRUCTURE and not lost.final
    step = next_step(p, [amended, lost], now=T0 + timedelta(hours=3), admits={})
    assert isinstance(step, Start) and step.attempt == 3
    assert step.feedback == "Your change conflicts with x.py; start from the head."
    assert step.base == BaseRef("/w/integration/run.git", HEAD)
    # an attempt that ran and failed otherwise: its failure decides, the old verdict is history
    crashed = conclude(
        p,
        [amended, lost],
        ran(attempt=3, at_hour=3, exit_code=1),
        rng=random.Random(0),
    ).result
    assert crashed.failure_class is FailureClass.ADAPTER_ERROR and not crashed.final
    step = next_step(p, [amended, lost, crashed], now=T0 + timedelta(hours=4), admits={})
    assert isinstance(step, Start) and step.attempt == 4 and step.feedback is None
    assert step.base == BaseRef("/w/integration/run.git", HEAD)  # still the head

"""The attempt lifecycle of a task, as pure decisions: the one place that decides.

Both backends are drivers of this module. The embedded executor runs an attempt as a local
process group, the operator as Jobs; each hands back what it observed
(:class:`AttemptEvidence`) and asks what to do next. Nothing here does I/O or reads a clock:
time (``now``) and randomness (``rng``) come in as arguments, so the same history gives the
same answer on both backends, in crash recovery and in tests.

* :func:`next_step` -- for a task with no attempt in flight: start attempt N on adapter A
  with R seconds (:class:`Start`), wait until T and say why (:class:`Wait`), or finish
  (:class:`Finish`: the budget is spent).
* :func:`needs_gate` -- after the adapter ran: is there a change for the test gate to judge?
* :func:`conclude` -- after an attempt: classify the evidence, build the
  :class:`~core.models.AttemptResult` (the only place one is built from evidence) and decide
  between a retry after a backoff and the task's final state. Evidence goes in as observed;
  what comes out (result, classification, messages) has passed the attempt's
  :class:`~core.engine.redaction.Redactor`, so every record written from it is masked.
* :func:`reopen` -- after the integration worker found a completed task's change conflicting
  with (or failing the gate together with) the changes merged before it: send it back for
  another attempt under the same retry policy and budget, or leave it completed.

The budget: one per task, spanning all its attempts and the backoffs between them. What is
spent is recorded, not measured by a process: the sum of the attempts' durations and of the
backoffs scheduled after them. Time a task waits for a breaker, a human or a restarted
executor is not charged; an interrupted attempt is charged what it ran (at most what it was
granted).

The final state: COMPLETED on success; CANCELLED when cancelled; TIMEOUT when the last
attempt timed out or the task's budget ran out (also when the last failure was another
class); FAILED otherwise.

A reopened task: its completed attempt carries the integration verdict (``integration``) and
counts as failed with ``merge_conflict`` / ``merge_gate_failed`` from then on; the next
attempt gets the verdict's feedback as extra input and starts from the integration branch's
head (:class:`BaseRef`), as do the attempts after it (and the feedback, past attempts lost
to ``infrastructure``: :func:`feedback_of`). Time spent in integration is not charged to the
task.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from core.engine.redaction import SHAPES_ONLY, Redactor
from core.engine.resilience.classification import (
    Classification,
    FailureEvidence,
    task_state,
)
from core.engine.resilience.detectors import classify
from core.engine.resilience.retry import (
    SWITCHING_CLASSES,
    AdapterChain,
    BackoffSchedule,
    RetryDecision,
    decide_retry,
    gate_feedback,
    select_adapter,
)
from core.engine.resilience.retry import AttemptOutcome as HistoryItem
from core.models import (
    INTEGRATION_FAILURE_CLASSES,
    AdapterSpec,
    AttemptResult,
    DiffSummary,
    FailureClass,
    GateCheck,
    GateResult,
    IntegrationFailure,
    IsolationLevel,
    RetryPolicy,
    TaskSpec,
    TaskState,
    TokenUsage,
)

# --------------------------------------------------------------------------- the task's plan


@dataclass(frozen=True, slots=True)
class TaskPlan:
    """Everything the decisions need to know about a task besides its history."""

    chain: AdapterChain
    retry: RetryPolicy
    budget_seconds: float
    adapters: Mapping[str, AdapterSpec] = field(compare=False)
    gate: tuple[GateCheck, ...] | None = None
    allow_empty_diff: bool = False

    @classmethod
    def of(
        cls,
        task: TaskSpec,
        adapter_ids: Sequence[str],
        adapters: Mapping[str, AdapterSpec],
    ) -> TaskPlan:
        """``adapter_ids``: the routed adapter first, then its fallbacks."""
        chain = AdapterChain.of(adapter_ids[0], adapter_ids[1:])
        primary = adapters[chain.primary]
        return cls(
            chain=chain,
            retry=task.retry or primary.retry,
            budget_seconds=task.timeout_seconds or primary.timeout_seconds,
            adapters={a: adapters[a] for a in chain.adapter_ids},
            gate=tuple(task.gate) if task.gate is not None else None,
            allow_empty_diff=task.allow_empty_diff,
        )

    def gate_checks(self, adapter_id: str) -> tuple[GateCheck, ...]:
        """The checks of the test gate: the task's own, else the adapter's."""
        return self.gate if self.gate is not None else tuple(self.adapters[adapter_id].gate)


def spent_seconds(history: Sequence[AttemptResult]) -> float:
    """Budget used so far: the attempts' durations plus the backoffs scheduled after them."""
    return sum(a.duration_seconds + a.backoff_seconds for a in history)


def remaining_seconds(plan: TaskPlan, history: Sequence[AttemptResult]) -> float:
    return max(0.0, plan.budget_seconds - spent_seconds(history))


# --------------------------------------------------------------------------- steps


class WaitCause(StrEnum):
    BACKOFF = "backoff"
    BREAKER = "breaker"


@dataclass(frozen=True, slots=True)
class BaseRef:
    """Where an attempt starts when not at its task's base commit (after a reopen)."""

    repository: str
    commit: str


@dataclass(frozen=True, slots=True)
class Start:
    attempt: int
    adapter_id: str
    timeout_seconds: float
    #: Extra input for the adapter: the previous attempt's gate failure, when retried for it.
    feedback: str | None = None
    #: Start from this commit instead of the task's base (None: the task's base commit).
    base: BaseRef | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    reason: str
    cause: WaitCause
    #: When to look again; None: when a breaker may admit work (the driver knows when).
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    state: TaskState
    failure_class: FailureClass | None
    message: str
    #: Why no further attempt is made (the retry policy's or the budget's reason).
    why: str = ""
    budget_exhausted: bool = False

    @property
    def succeeded(self) -> bool:
        return self.state is TaskState.COMPLETED


Step = Start | Wait | Finish


def failure_of(result: AttemptResult) -> FailureClass | None:
    """What decides what follows an attempt: an integration verdict on its change, if any."""
    if result.integration is not None:
        return INTEGRATION_FAILURE_CLASSES[result.integration.outcome]
    return result.failure_class


def _verdict_of(result: AttemptResult) -> Classification:
    failure = failure_of(result)
    if failure is None:
        return Classification.success()
    integration = result.integration
    message = integration.message if integration is not None else result.failure_message
    return Classification.failure(failure, message)


def _history(results: Sequence[AttemptResult]) -> list[HistoryItem]:
    return [HistoryItem(a.attempt, a.adapter_id, _verdict_of(a)) for a in results]


def base_of(history: Sequence[AttemptResult]) -> BaseRef | None:
    """Where the next attempt starts: the latest integration rebase, else the task's base."""
    for result in reversed(history):
        verdict = result.integration
        if verdict is not None and verdict.rebase_commit and verdict.rebase_repository:
            return BaseRef(verdict.rebase_repository, verdict.rebase_commit)
    return None


def feedback_of(history: Sequence[AttemptResult]) -> str | None:
    """The next attempt's extra input: what was said about the last change made (the
    integration verdict's feedback, or the failed gate's). Attempts that failed for the
    platform (``infrastructure``: the pod never started, was evicted or lost) made no change
    to judge, so the feedback before them still holds -- as the integration head
    (:func:`base_of`) does: without it, the attempt after a lost one would start from the
    integration branch told nothing of why."""
    for result in reversed(history):
        if result.integration is not None:
            return result.integration.feedback
        if result.failure_class is FailureClass.GATE_FAILED and result.gate is not None:
            return gate_feedback(result.gate)
        if result.failure_class is not FailureClass.INFRASTRUCTURE:
            return None
    return None


def final_state(classification: Classification, *, budget_exhausted: bool) -> TaskState:
    """The one rule for a task's final state (see the module docstring)."""
    failure = classification.failure_class
    if failure is None:
        return TaskState.COMPLETED
    if failure is FailureClass.CANCELLED:
        return TaskState.CANCELLED
    if failure is FailureClass.ADAPTER_TIMEOUT or budget_exhausted:
        return TaskState.TIMEOUT
    return TaskState.FAILED


def budget_spent(plan: TaskPlan) -> str:
    return f"task budget of {plan.budget_seconds:g}s exhausted"


def next_step(
    plan: TaskPlan,
    history: Sequence[AttemptResult],
    *,
    now: datetime,
    admits: Mapping[str, bool],
) -> Step:
    """What to do with a task that has no attempt in flight.

    ``history``: its finished attempts, oldest first. ``admits``: whether each adapter's
    breaker admits work now (missing: admits).
    """
    if history and history[-1].final:
        last = history[-1]
        verdict = Classification.failure(last.failure_class, last.failure_message) if (
            last.failure_class
        ) else Classification.success()
        return Finish(
            final_state(verdict, budget_exhausted=False),
            last.failure_class,
            verdict.message if last.failure_class else "completed",
            why="already finished",
        )
    remaining = remaining_seconds(plan, history)
    feedback: str | None = None
    if not history:
        candidates = plan.chain.adapter_ids
        attempt = 1
    else:
        last = history[-1]
        not_before = last.finished_at + timedelta(seconds=last.backoff_seconds)
        if now < not_before:
            return Wait(
                f"retry of {last.failure_class} after a backoff, at {not_before.isoformat()}",
                WaitCause.BACKOFF,
                not_before,
            )
        switch = failure_of(last) in SWITCHING_CLASSES
        candidates = plan.chain.preference(last.adapter_id, switch=switch)
        attempt = last.attempt + 1
        feedback = feedback_of(history)
    if remaining < max(plan.retry.min_attempt_seconds, 0.0) or remaining <= 0:
        last_class = failure_of(history[-1]) if history else None
        return Finish(TaskState.TIMEOUT, last_class, budget_spent(plan), budget_spent(plan), True)
    selection = select_adapter(candidates, admits)
    if selection.waiting_for_breaker:
        return Wait(selection.reason, WaitCause.BREAKER)
    adapter = plan.adapters[selection.adapter_id]
    timeout = min(remaining, adapter.timeout_seconds)
    return Start(attempt, selection.adapter_id, timeout, feedback, base_of(history))


# --------------------------------------------------------------------------- evidence


@dataclass(frozen=True, slots=True)
class AttemptEvidence:
    """What a backend observed about one attempt; nothing interpreted yet."""

    attempt: int
    adapter_id: str
    started_at: datetime
    finished_at: datetime
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    start_error: str | None = None
    #: A platform failure (could not start, Job or pod lost, evicted, executor stopped...).
    infrastructure_reason: str | None = None
    output_tail: str = ""
    diff: DiffSummary | None = None
    gate: GateResult | None = None
    log_path: str | None = None
    log_bytes: int = 0
    log_truncated: bool = False
    #: Budget to charge when it is not ``finished_at - started_at`` (an interrupted attempt
    #: is charged what it ran, at most what it was granted).
    charged_seconds: float | None = None
    #: The adapter failed for a reason it named (an ``api`` adapter: HTTP error, no diff in
    #: the reply, a diff that does not apply): ``adapter_error`` with this message.
    adapter_error: str | None = None
    #: The server asked to wait this long before trying again (HTTP ``Retry-After``): the
    #: backoff after this attempt is at least this long.
    retry_after_seconds: float | None = None
    #: Tokens the endpoint reported (``api`` adapters).
    usage: TokenUsage | None = None
    #: How the attempt's processes were confined (sandbox, pod, none); None: not known.
    isolation: IsolationLevel | None = None

    @property
    def duration_seconds(self) -> float:
        if self.charged_seconds is not None:
            return max(0.0, self.charged_seconds)
        return max(0.0, (self.finished_at - self.started_at).total_seconds())


INTERRUPTED = "interrupted: the executor stopped during this attempt"


def interrupted_evidence(
    *,
    attempt: int,
    adapter_id: str,
    started_at: datetime,
    granted_seconds: float | None,
    now: datetime,
    reason: str = INTERRUPTED,
) -> AttemptEvidence:
    """An attempt whose driver died: a platform failure, charged what it ran (at most what
    it was granted, so the time the driver was down is not charged)."""
    ran = max(0.0, (now - started_at).total_seconds())
    charged = min(ran, granted_seconds) if granted_seconds is not None else ran
    return AttemptEvidence(
        attempt,
        adapter_id,
        started_at,
        now,
        infrastructure_reason=reason,
        charged_seconds=charged,
    )


def adapter_succeeded(evidence: AttemptEvidence) -> bool:
    """The adapter itself finished cleanly (exit 0, not stopped, timed out or failed to start)."""
    return (
        evidence.exit_code == 0
        and evidence.signal is None
        and not evidence.timed_out
        and not evidence.cancelled
        and evidence.start_error is None
        and evidence.infrastructure_reason is None
        and evidence.adapter_error is None
    )


def needs_gate(plan: TaskPlan, evidence: AttemptEvidence) -> bool:
    """Whether the test gate runs: the adapter succeeded and left a usable diff (one that
    was kept whole: a diff over the hard limit is not judged)."""
    if not adapter_succeeded(evidence) or evidence.diff is None or evidence.diff.truncated:
        return False
    return not evidence.diff.empty or plan.allow_empty_diff


def classify_attempt(plan: TaskPlan, evidence: AttemptEvidence) -> Classification:
    gate = evidence.gate
    return classify(
        FailureEvidence(
            exit_code=evidence.exit_code,
            signal=evidence.signal,
            timed_out=evidence.timed_out,
            cancelled=evidence.cancelled,
            start_error=evidence.start_error,
            infrastructure_reason=evidence.infrastructure_reason,
            adapter_error=evidence.adapter_error,
            diff_empty=evidence.diff.empty if evidence.diff is not None else None,
            diff_too_large_bytes=evidence.diff.bytes
            if evidence.diff is not None and evidence.diff.truncated
            else None,
            allow_empty_diff=plan.allow_empty_diff,
            gate_passed=gate.passed if gate is not None else None,
            gate_failed_checks=tuple(gate.blamed) if gate is not None else (),
            output_tail=evidence.output_tail,
        )
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """The recorded outcome of one attempt and what follows it."""

    result: AttemptResult
    classification: Classification
    #: None: the task is retried after ``result.backoff_seconds``.
    finish: Finish | None
    decision: RetryDecision


def conclude(
    plan: TaskPlan,
    history: Sequence[AttemptResult],
    evidence: AttemptEvidence,
    *,
    rng: random.Random,
    classification: Classification | None = None,
    redactor: Redactor = SHAPES_ONLY,
) -> Verdict:
    """Classify one finished attempt, decide retry or finish, and build its result.

    ``history``: the task's attempts finished before this one. ``classification``
    overrides the evidence's (only for an attempt the driver knows more about, e.g.
    interrupted by a stop request). ``redactor``: the attempt's (the secrets its adapter
    was given); known credential shapes are masked without one.
    """
    evidence = replace(
        evidence,
        output_tail=redactor(evidence.output_tail),
        start_error=redactor(evidence.start_error) if evidence.start_error else None,
        infrastructure_reason=redactor(evidence.infrastructure_reason)
        if evidence.infrastructure_reason
        else None,
    )
    verdict = classification or classify_attempt(plan, evidence)
    verdict = replace(verdict, message=redactor(verdict.message))
    duration = evidence.duration_seconds
    remaining = plan.budget_seconds - spent_seconds(history) - duration
    decision = decide_retry(
        plan.retry,
        plan.chain,
        [*_history(history), HistoryItem(evidence.attempt, evidence.adapter_id, verdict)],
        remaining_seconds=remaining,
        schedule=BackoffSchedule(plan.retry, rng),
        min_attempt_seconds=plan.retry.min_attempt_seconds,
        min_delay_seconds=evidence.retry_after_seconds or 0.0,
    )
    decision = replace(decision, reason=redactor(decision.reason))
    finish: Finish | None = None
    if not decision.retry:
        exhausted = decision.budget_exhausted
        state = final_state(verdict, budget_exhausted=exhausted)
        message = verdict.message if not verdict.succeeded else "completed"
        if exhausted:
            message = f"{message}; {budget_spent(plan)}"
        finish = Finish(state, verdict.failure_class, message, decision.reason, exhausted)
    result = redactor.model(
        AttemptResult(
            attempt=evidence.attempt,
            adapter_id=evidence.adapter_id,
            state=task_state(verdict),
            failure_class=verdict.failure_class,
            failure_message="" if verdict.succeeded else verdict.message,
            exit_code=evidence.exit_code,
            signal=evidence.signal,
            timed_out=evidence.timed_out,
            started_at=evidence.started_at,
            finished_at=evidence.finished_at,
            duration_seconds=round(duration, 3),
            log_path=evidence.log_path,
            log_bytes=evidence.log_bytes,
            log_truncated=evidence.log_truncated,
            diff=evidence.diff,
            gate=evidence.gate,
            isolation=evidence.isolation,
            final=finish is not None,
            task_final_state=finish.state if finish is not None else None,
            backoff_seconds=round(decision.delay_seconds, 3) if finish is None else 0.0,
            usage=evidence.usage,
        )
    )
    return Verdict(result, verdict, finish, decision)


# --------------------------------------------------------------------------- integration


@dataclass(frozen=True, slots=True)
class Reopening:
    """The lifecycle's answer to an integration verdict on a completed task."""

    #: The completed attempt as it is to be recorded now (not final, with the verdict and
    #: the backoff before the next attempt); None: the task stays COMPLETED.
    result: AttemptResult | None
    decision: RetryDecision

    @property
    def reopened(self) -> bool:
        return self.result is not None


def reopen(
    plan: TaskPlan,
    history: Sequence[AttemptResult],
    failure: IntegrationFailure,
    *,
    rng: random.Random,
) -> Reopening:
    """Decide whether a completed task whose change failed integration is tried again.

    ``history``: the task's attempts, the completed one last. The same rules as for a failed
    attempt (:func:`~core.engine.resilience.retry.decide_retry`): the verdict's class must be
    in the policy's ``retry_on``, attempts and budget must allow another attempt; it is made on
    the same adapter (like ``gate_failed``), after a backoff.
    """
    if not history or history[-1].failure_class is not None or history[-1].integration:
        raise ValueError("reopen needs a task whose last attempt completed")
    last = history[-1]
    verdict = Classification.failure(INTEGRATION_FAILURE_CLASSES[failure.outcome], failure.message)
    decision = decide_retry(
        plan.retry,
        plan.chain,
        [*_history(history[:-1]), HistoryItem(last.attempt, last.adapter_id, verdict)],
        remaining_seconds=plan.budget_seconds - spent_seconds(history),
        schedule=BackoffSchedule(plan.retry, rng),
        min_attempt_seconds=plan.retry.min_attempt_seconds,
    )
    if not decision.retry:
        return Reopening(None, decision)
    amended = last.model_copy(
        update={
            "final": False,
            "task_final_state": None,
            "backoff_seconds": round(decision.delay_seconds, 3),
            "integration": failure,
        }
    )
    return Reopening(amended, decision)

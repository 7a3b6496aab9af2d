"""A TaskExecution's attempts: evidence from Jobs and pod logs in, status out (pure).

The operator's side of the one lifecycle: what an adapter or gate Job showed becomes
:class:`~core.engine.lifecycle.AttemptEvidence` (the lifecycle classifies it), and what the
recorder wrote becomes the TaskExecution's ``status`` (a projection of the database record,
never a second source of decisions). Kept apart from the reconciler so the mapping is
unit-tested without a cluster.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from core.engine.lifecycle import AttemptEvidence, Finish
from core.kube.conditions import reason_for
from core.kube.jobs import job_failure_reason
from core.kube.queueing import queue_wait_seconds
from core.models import (
    AttemptResult,
    CheckResult,
    CheckStatus,
    DiffSummary,
    GateResult,
    IsolationLevel,
    TaskState,
    TestNames,
)
from core.resources import (
    STATUS_TEST_NAMES,
    AttemptStatus,
    CheckSummary,
    DiffStatus,
    GateSummary,
    TamperSummary,
    TaskExecutionStatus,
    TestList,
    diff_status,
    usage_of,
    usage_status,
)
from core.runner.protocol import RunnerResult

#: Why a runner that reported ``cancelled`` stopped: nobody but the platform sends SIGTERM to
#: a pod of a TaskExecution that still exists (deleted, evicted, node drained).
POD_STOPPED = "the pod was stopped (deleted or evicted) before the adapter finished"
#: Why an attempt whose pod went over its own disk limits failed (the kubelet's words follow).
DISK_LIMIT = "the pod exceeded its local disk limit and was evicted"


def parse_time(value: str | None) -> datetime:
    if not value:
        return datetime.now(UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def job_finished_at(job: dict[str, Any] | None) -> datetime | None:
    """When a finished Job finished, as the Job controller recorded it."""
    if job is None:
        return None
    status = job.get("status") or {}
    if status.get("completionTime"):
        return parse_time(status["completionTime"])
    for cond in status.get("conditions") or []:
        done = cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True"
        if done and cond.get("lastTransitionTime"):
            return parse_time(cond["lastTransitionTime"])
    return None


# --------------------------------------------------------------------------- evidence


def adapter_evidence(
    current: AttemptStatus,
    job: dict[str, Any] | None,
    result: RunnerResult | None,
    *,
    now: datetime,
    log_path: str,
    runner_error: str | None = None,
    evicted: str | None = None,
) -> AttemptEvidence:
    """What the adapter Job of ``current`` showed (``job`` None: it is gone).

    The attempt is charged from its container's start (``pod_started_at``): pulling the
    image and scheduling the pod do not eat the adapter's budget. ``runner_error``: the
    runner's own words when it failed before reporting (a clone that failed, say).
    ``evicted``: the kubelet's message when the pod was evicted for going over its own disk
    limits (:func:`core.kube.pods.storage_eviction`): the adapter filled its disk, an
    ``adapter_error`` (it moves to the fallback adapter and feeds the breaker), whatever the
    runner managed to say while it was being killed.
    """
    started = current.pod_started_at or current.started_at or now
    if current.pod_started_at is None and job is not None:
        # the pod ended before the operator saw it running: a Kueue queue's wait is still
        # not charged (the Job's admission, not its creation, starts the clock)
        started += timedelta(seconds=queue_wait_seconds(job))
    finished = min(job_finished_at(job) or now, now)
    base = AttemptEvidence(
        attempt=current.attempt,
        adapter_id=current.adapter,
        started_at=started,
        finished_at=max(finished, started),
        log_path=log_path,
        isolation=IsolationLevel.POD,
    )
    if evicted is not None:
        return replace(
            base,
            adapter_error=f"{DISK_LIMIT}: {evicted}",
            output_tail=evicted,
            log_bytes=result.log_bytes if result else 0,
            log_truncated=bool(result and result.log_truncated),
        )
    if result is None:
        if job is None:
            reason = f"adapter Job {current.job_name} was deleted before it reported"
        elif runner_error:
            reason = f"the runner failed: {runner_error}"
        else:
            reason = job_failure_reason(job) or "the runner reported no result (pod lost)"
        if "DeadlineExceeded" in reason:  # the Job's backstop deadline: the budget ran out
            return replace(base, timed_out=True, output_tail=reason)
        return replace(base, infrastructure_reason=reason)
    return replace(
        base,
        exit_code=result.exit_code,
        signal=result.signal,
        timed_out=result.timed_out,
        start_error=result.start_error,
        infrastructure_reason=POD_STOPPED if result.cancelled else result.infrastructure_reason,
        output_tail=result.output_tail,
        diff=result.diff,
        adapter_error=result.adapter_error,
        retry_after_seconds=result.retry_after_seconds,
        usage=result.usage,
        log_bytes=result.log_bytes,
        log_truncated=result.log_truncated,
    )


def gate_evidence(
    current: AttemptStatus,
    job: dict[str, Any] | None,
    result: RunnerResult | None,
    *,
    now: datetime,
    log_path: str,
    runner_error: str | None = None,
    evicted: str | None = None,
) -> AttemptEvidence:
    """The attempt after its gate Job: the adapter's part comes from ``current`` (what
    :func:`gate_started` kept of the adapter's evidence: exit code, diff, log, token usage).
    ``evicted``: the gate pod went over its own disk limits while the checks ran on the
    change: a failed gate (check ``local-disk``), not a platform failure.
    The time the gate Job waited for a Kueue queue's admission is not charged."""
    started = current.pod_started_at or current.started_at or now
    finished = max(min(job_finished_at(job) or now, now), started)
    queued = queue_wait_seconds(job) if job is not None else 0.0
    base = AttemptEvidence(
        attempt=current.attempt,
        adapter_id=current.adapter,
        started_at=started,
        finished_at=finished,
        charged_seconds=(finished - started).total_seconds() - queued if queued else None,
        exit_code=current.exit_code if current.exit_code is not None else 0,
        diff=summary_from_status(current.diff),
        log_path=log_path,
        log_bytes=current.log_bytes + (result.log_bytes if result else 0),
        log_truncated=current.log_truncated or bool(result and result.log_truncated),
        usage=usage_of(current.usage),
        isolation=IsolationLevel.POD,
    )
    if evicted is not None:
        return replace(base, gate=disk_limit_gate(evicted))
    if result is None or result.gate is None:
        reason = (
            (f"the runner failed: {runner_error}" if runner_error else None)
            or (job_failure_reason(job) if job else None)
            or "gate Job lost before it reported"
        )
        return replace(base, infrastructure_reason=f"test gate: {reason}")
    return replace(base, gate=result.gate)


def disk_limit_gate(message: str) -> GateResult:
    """The verdict on a gate whose pod the kubelet evicted for exceeding its disk limits."""
    return GateResult(
        passed=False,
        applied=False,  # unknown: the pod may have been evicted while cloning
        checks=[
            CheckResult(
                name="local-disk",
                status=CheckStatus.ERROR,
                exit_code=None,
                duration_seconds=0.0,
                output_tail=f"{DISK_LIMIT}: {message}",
            )
        ],
    )


def diff_too_large(limit: int) -> GateResult:
    """The gate's verdict on a diff the operator could not carry to the gate Job."""
    return GateResult(
        passed=False,
        applied=False,
        checks=[
            CheckResult(
                name="diff-too-large",
                status=CheckStatus.ERROR,
                exit_code=None,
                duration_seconds=0.0,
                output_tail=f"the diff exceeds the operator's limit of {limit} bytes",
            )
        ],
    )


# --------------------------------------------------------------------------- status


def attempt_started(
    status: TaskExecutionStatus,
    *,
    attempt: int,
    adapter: str,
    job_name: str,
    trial: bool,
    now: datetime,
) -> TaskExecutionStatus:
    attempts = [
        *(a for a in status.attempts if a.attempt < attempt),
        AttemptStatus(
            attempt=attempt,
            adapter=adapter,
            job_name=job_name,
            state=TaskState.IN_PROGRESS,
            started_at=now,
            trial=trial,
        ),
    ]
    return status.model_copy(
        update={
            "state": TaskState.IN_PROGRESS,
            "attempt": attempt,
            "adapter": adapter,
            "job_name": job_name,
            "gate_job_name": None,
            "started_at": status.started_at or now,
            "not_before": None,
            "reason": "AdapterRunning",
            "message": f"attempt {attempt} on adapter {adapter} (Job {job_name})",
            "attempts": attempts,
        }
    )


def gate_started(
    status: TaskExecutionStatus, evidence: AttemptEvidence, gate_job: str
) -> TaskExecutionStatus:
    attempts = list(status.attempts)
    current = attempts[-1]
    charged_from: dict[str, datetime] = {}
    unseen = current.pod_started_at is None and current.started_at is not None
    if unseen and current.started_at is not None and evidence.started_at > current.started_at:
        # the adapter's pod ended unseen: its charge began at the queue's admission
        charged_from["pod_started_at"] = evidence.started_at
    attempts[-1] = current.model_copy(
        update={
            **charged_from,
            "gate_job_name": gate_job,
            "exit_code": evidence.exit_code,
            "diff": diff_status(evidence.diff),
            "log_bytes": evidence.log_bytes,
            "log_truncated": evidence.log_truncated,
            "usage": usage_status(evidence.usage),
        }
    )
    return status.model_copy(
        update={
            "state": TaskState.VALIDATING,
            "gate_job_name": gate_job,
            "diff": diff_status(evidence.diff),
            "reason": "Validating",
            "message": f"test gate Job {gate_job}",
            "attempts": attempts,
        }
    )


def attempt_recorded(
    status: TaskExecutionStatus, result: AttemptResult, finish: Finish | None, why: str
) -> TaskExecutionStatus:
    """The status once ``result`` is recorded: terminal with ``finish``, else waiting for
    the retry after the result's backoff."""
    attempts = [
        a.model_copy(
            update={
                "state": result.state,
                "failure_class": result.failure_class,
                "message": result.failure_message,
                "finished_at": result.finished_at,
                "exit_code": result.exit_code,
                "diff": diff_status(result.diff),
                "gate": gate_summary(result.gate),
                "log_bytes": result.log_bytes,
                "log_truncated": result.log_truncated,
                "usage": usage_status(result.usage),
            }
        )
        if a.attempt == result.attempt
        else a
        for a in status.attempts
    ]
    update: dict[str, Any] = {
        "attempts": attempts,
        "failure_class": result.failure_class,
        "diff": diff_status(result.diff),
        "gate": gate_summary(result.gate),
        "gate_job_name": None,
    }
    if finish is not None:
        update |= {
            "state": finish.state,
            "finished_at": result.finished_at,
            "not_before": None,
            "reason": finish_reason(finish),
            "message": finish.message if not finish.succeeded else "completed",
        }
    else:
        update |= {
            "state": TaskState.PENDING,
            "not_before": result.finished_at + timedelta(seconds=result.backoff_seconds),
            "reason": "RetryScheduled",
            "message": why,
        }
    return status.model_copy(update=update)


def task_ended(status: TaskExecutionStatus, finish: Finish, now: datetime) -> TaskExecutionStatus:
    """The status of a task that ended without another attempt."""
    return status.model_copy(
        update={
            "state": finish.state,
            "finished_at": now,
            "not_before": None,
            "failure_class": finish.failure_class or status.failure_class,
            "reason": finish_reason(finish),
            "message": finish.message,
        }
    )


def finish_reason(finish: Finish) -> str:
    if finish.budget_exhausted:
        return "BudgetExhausted"
    return reason_for(finish.state, finish.failure_class)


def _test_list(names: TestNames) -> TestList | None:
    if not names:
        return None
    return TestList(count=names.count, names=names.names[:STATUS_TEST_NAMES])


def _test_names(listed: TestList | None) -> TestNames:
    return TestNames() if listed is None else TestNames(count=listed.count, names=listed.names)


def gate_summary(gate: GateResult | None) -> GateSummary | None:
    """The gate as status carries it: counts exact, at most STATUS_TEST_NAMES names a list."""
    if gate is None:
        return None
    t = gate.tamper
    return GateSummary(
        passed=gate.passed,
        applied=gate.applied,
        apply_method=gate.apply_method,
        checks=[
            CheckSummary(
                name=c.name,
                status=c.status.value,
                exit_code=c.exit_code,
                duration_seconds=c.duration_seconds,
                granularity=c.granularity,
                tests=c.tests.total if c.tests else None,
                new_failures=_test_list(c.new_failures),
                pre_existing_failures=_test_list(c.pre_existing_failures),
                fixed=_test_list(c.fixed),
                flaky=_test_list(c.flaky),
                removed_failing=_test_list(c.removed_failing),
                note=c.note,
            )
            for c in gate.checks
        ],
        tamper=TamperSummary(
            flagged=t.flagged,
            fails_gate=t.fails_gate,
            modified_files=t.modified_files[:STATUS_TEST_NAMES],
            deleted_test_files=t.deleted_test_files[:STATUS_TEST_NAMES],
            removed_failing_tests=_test_list(t.removed_failing_tests),
        )
        if t.flagged
        else None,
    )


def gate_result(summary: GateSummary) -> GateResult:
    """Back from status: what status kept, no more."""
    return GateResult(
        passed=summary.passed,
        applied=summary.applied,
        apply_method=summary.apply_method,
        checks=[
            CheckResult(
                name=c.name,
                status=CheckStatus(c.status),
                exit_code=c.exit_code,
                duration_seconds=c.duration_seconds,
                granularity=c.granularity,
                new_failures=_test_names(c.new_failures),
                pre_existing_failures=_test_names(c.pre_existing_failures),
                fixed=_test_names(c.fixed),
                flaky=_test_names(c.flaky),
                removed_failing=_test_names(c.removed_failing),
                note=c.note,
            )
            for c in summary.checks
        ],
    )


def summary_from_status(diff: DiffStatus | None) -> DiffSummary | None:
    """Inverse of :func:`core.resources.diff_status` (the per-file list is not in status)."""
    return None if diff is None else DiffSummary.model_validate(diff.model_dump())

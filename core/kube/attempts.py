"""Pure helpers of the reconciler: a TaskExecution's status <-> the engine's models.

Kept apart from the reconciler so the mapping (history for retry decisions, attempt state,
gate and diff summaries) is unit-tested without a cluster.
"""

from __future__ import annotations

from datetime import UTC, datetime

from core.engine.resilience.classification import Classification
from core.engine.resilience.retry import AttemptOutcome as HistoryItem
from core.models import (
    CheckResult,
    CheckStatus,
    DiffSummary,
    GateResult,
    TaskState,
)
from core.resources import CheckSummary, DiffStatus, GateSummary, TaskExecutionStatus


def parse_time(value: str | None) -> datetime:
    if not value:
        return datetime.now(UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def history_of(status: TaskExecutionStatus, upto: int | None = None) -> list[HistoryItem]:
    items = []
    for a in status.attempts[:upto]:
        if a.state in (TaskState.IN_PROGRESS, TaskState.VALIDATING):
            continue
        c = (
            Classification.failure(a.failure_class, a.message)
            if a.failure_class
            else Classification.success()
        )
        items.append(HistoryItem(a.attempt, a.adapter, c))
    return items


def gate_summary(gate: GateResult | None) -> GateSummary | None:
    if gate is None:
        return None
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
            )
            for c in gate.checks
        ],
    )


def gate_result(summary: GateSummary) -> GateResult:
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
            )
            for c in summary.checks
        ],
    )


def summary_from_status(diff: DiffStatus | None) -> DiffSummary | None:
    """Inverse of :func:`core.resources.diff_status` (the per-file list is not in status)."""
    return None if diff is None else DiffSummary.model_validate(diff.model_dump())

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
    TestNames,
)
from core.resources import (
    STATUS_TEST_NAMES,
    CheckSummary,
    DiffStatus,
    GateSummary,
    TamperSummary,
    TaskExecutionStatus,
    TestList,
)


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
    """Back from status (for the next attempt's feedback): what status kept, no more."""
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

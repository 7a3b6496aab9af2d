"""``.state/integration_results.json``: the run's integration branch as the database knows it.

A projection, rebuilt whole after every integration run from the ``integrations`` row, the
verdicts and the tasks' states (written atomically and validated like the other state files):
every task of the run in queue order with its latest verdict, or ``skipped`` with the reason
it was not a candidate (not COMPLETED). The stats compare the gate runs the merge queue made
with what one-by-one integration would have needed (one per change that applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from core.db.integration_rows import IntegrationState, VerdictRow
from core.db.store import TaskRecord
from core.engine.state_files import STATE_DIR, write_model
from core.integration_models import IntegrationStats, IntegrationTaskResult
from core.models import IntegrationOutcome, IntegrationResults, TaskState

INTEGRATION_RESULTS = "integration_results.json"


def task_result(record: TaskRecord, verdict: VerdictRow | None) -> IntegrationTaskResult:
    if verdict is None:
        why = f"the task is {record.status.value}"
        if record.wait_reason:
            why += f" ({record.wait_reason})"
        if record.status is TaskState.COMPLETED:
            why = "not integrated yet"
        return IntegrationTaskResult(
            task_id=record.task_id,
            outcome=IntegrationOutcome.SKIPPED,
            task_state=record.status.value,
            reason=why,
        )
    reason = verdict.reason
    if verdict.reopened:
        now = "next" if record.attempts <= verdict.attempt else record.status.value
        reason += f"; sent back to {verdict.adapter_id}: attempt {verdict.attempt + 1} is {now}"
    return IntegrationTaskResult(
        task_id=record.task_id,
        outcome=verdict.outcome,
        commit=verdict.commit,
        attempt=verdict.attempt,
        adapter_id=verdict.adapter_id,
        task_state=record.status.value,
        reason=reason,
        reopened=verdict.reopened,
    )


def stats_of(
    state: IntegrationState, verdicts: Sequence[VerdictRow], tasks: Sequence[IntegrationTaskResult]
) -> IntegrationStats:
    counts = {o: sum(1 for t in tasks if t.outcome is o) for o in IntegrationOutcome}
    merged = sum(1 for v in verdicts if v.outcome is IntegrationOutcome.MERGED)
    failed = sum(1 for v in verdicts if v.outcome is IntegrationOutcome.GATE_FAILED)
    one_by_one = merged + failed
    return IntegrationStats(
        merged=counts[IntegrationOutcome.MERGED],
        conflict=counts[IntegrationOutcome.CONFLICT],
        gate_failed=counts[IntegrationOutcome.GATE_FAILED],
        skipped=counts[IntegrationOutcome.SKIPPED],
        batches=state.batches,
        gate_runs=state.gate_runs,
        one_by_one_gate_runs=one_by_one,
        gate_runs_per_merge=round(state.gate_runs / merged, 3) if merged else None,
        one_by_one_gate_runs_per_merge=round(one_by_one / merged, 3) if merged else None,
    )


def build_results(
    state: IntegrationState,
    verdicts: Sequence[VerdictRow],
    records: Sequence[TaskRecord],
    now: datetime,
) -> IntegrationResults:
    """``verdicts`` in ledger order (a later attempt's verdict on a task wins)."""
    latest = {v.key: v for v in verdicts}
    tasks = [task_result(r, latest.get(r.key)) for r in records]
    pushed = state.pushed_commit is not None and state.pushed_commit == state.head_commit
    return IntegrationResults(
        run_id=state.run_id,
        repository=state.pushed_to if pushed and state.pushed_to else state.repository,
        local_repository=state.repository,
        pushed=pushed,
        branch=state.branch,
        base_commit=state.base_commit,
        head_commit=state.head_commit,
        generated_at=now,
        stats=stats_of(state, verdicts, tasks),
        tasks=tasks,
    )


def write_results(workdir: Path, results: IntegrationResults) -> Path:
    path = workdir / STATE_DIR / INTEGRATION_RESULTS
    write_model(path, results)
    return path

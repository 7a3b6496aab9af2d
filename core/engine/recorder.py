"""The one path that writes what happened to a task, for both backends.

Order of writes for a finished attempt, each idempotent per (task identity, attempt):

0. (before: the backend put the full diff in the evidence store; the result references it)
1. the patch ledger (fsynced; the leader, from which the database mirror can be repaired);
2. the database in one transaction: task row, ``execution_log`` event, ``patch_history``
   mirror and the adapter's circuit breaker (so a replay never counts a failure twice);
   then the gate's per-test outcomes (keyed rows: ``gate_test_results``);
3. ``logs/executor.jsonl`` (repaired from the database after a crash; the append lock of
   :mod:`core.engine.log_lock` is held from the commit to the line);
4. metrics, breaker transitions and ``logs/resilience.jsonl``, only when step 2 was new,
   so a replayed attempt is never counted twice; then the escalations the attempt raises
   (``core.engine.escalation``: keyed, so nobody is told twice).

Drivers (the embedded executor, the operator) call :meth:`Recorder.begin` when an attempt
starts, :meth:`Recorder.record` when the lifecycle concluded it, :meth:`Recorder.end` when a
task ends without another attempt, and :meth:`Recorder.park` when it has to wait. They add
their own projections afterwards (the results file, the TaskExecution status and Events).
The integration worker calls :meth:`Recorder.reopen` after the ledger holds its verdict on a
completed task that the lifecycle's ``reopen`` sends back to its adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from core.db.store import Event, Recorded, Store, TaskRecord
from core.db.test_history import record_gate_tests
from core.engine.escalation import EscalationPolicy, Escalations
from core.engine.events import EventLog
from core.engine.evidence import EvidenceStore, local_store
from core.engine.lifecycle import Finish, Start, Verdict, final_state
from core.engine.log_lock import APPEND_LOCK, AppendLock
from core.engine.monitoring.metrics import Metrics
from core.engine.patch_ledger import PatchLedger
from core.engine.resilience.breaker_store import CircuitBreakers
from core.engine.resilience.circuit_breaker import BreakerTransition
from core.engine.resilience.classification import Classification
from core.engine.state_files import PATCH_LEDGER, STATE_DIR
from core.identity import TaskKey
from core.models import AttemptResult, LedgerEntry, TaskState


class ResilienceLog:
    """``logs/resilience.jsonl``: retries, breaker transitions, recovered attempts."""

    def __init__(self, path: Path, clock: Callable[[], datetime]) -> None:
        self.path = path
        self.clock = clock

    def write(self, event: str, **fields: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"ts": self.clock().isoformat(), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


@dataclass(frozen=True)
class Outcome:
    """A recorded attempt: the entry, the task's record now, and whether the write was new."""

    entry: LedgerEntry
    record: TaskRecord
    events: list[Event]
    new: bool
    finish: Finish | None


class Recorder:
    def __init__(
        self,
        store: Store,
        workdir: Path,
        *,
        metrics: Metrics,
        clock: Callable[[], datetime],
        dedupe_events: bool = True,
        escalation: EscalationPolicy | None = None,
        evidence: EvidenceStore | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.evidence = evidence or local_store(workdir)
        self.ledger = PatchLedger(workdir / STATE_DIR / PATCH_LEDGER, self.evidence, clock)
        self.events = EventLog(workdir / "logs" / "executor.jsonl", dedupe=dedupe_events)
        self.resilience = ResilienceLog(workdir / "logs" / "resilience.jsonl", clock)
        #: Held shared from a commit to its lines, exclusive by a repair.
        self.lock = AppendLock(workdir / APPEND_LOCK)
        self.escalations = Escalations(
            store.engine, workdir, metrics=metrics, clock=clock, policy=escalation
        )

    def on_breaker_transition(self, transition: BreakerTransition) -> None:
        """Give this to :class:`CircuitBreakers` as its ``on_transition``."""
        self.metrics.breaker(transition.adapter_id, transition.to_state.value)
        self.resilience.write("circuit_breaker", **transition.to_record())

    # ------------------------------------------------------------------ attempts

    def begin(self, key: TaskKey, start: Start, *, started_at: datetime | None = None) -> None:
        self.commit_events(
            lambda: self.store.begin_attempt(
                key,
                start.attempt,
                start.adapter_id,
                timeout_seconds=start.timeout_seconds,
                started_at=started_at,
            )
        )

    def commit_events(self, commit: Callable[[], list[Event]]) -> list[Event]:
        """Run ``commit`` (a database write returning its new events), then append them: the
        append lock held shared from the one to the other."""
        with self.lock.shared():
            events = commit()
            self.events.write(events)
        return events

    def record(
        self,
        key: TaskKey,
        base_commit: str,
        verdict: Verdict,
        *,
        breakers: CircuitBreakers,
        trial: bool,
        patch: bytes | None = None,
    ) -> Outcome:
        entry = self.ledger.append(
            key=key, base_commit=base_commit, result=verdict.result, patch=patch
        )
        # a replay records what the ledger already holds
        return self._commit(
            key,
            entry,
            verdict.classification,
            finish_of(entry.result, verdict),
            breakers=breakers,
            trial=trial,
            why=verdict.decision.reason,
        )

    def replay(self, key: TaskKey, entry: LedgerEntry, *, breakers: CircuitBreakers) -> Outcome:
        """Finish the database write of an attempt the ledger holds (a crash came between)."""
        result = entry.result
        classification = (
            Classification.failure(result.failure_class, result.failure_message)
            if result.failure_class
            else Classification.success()
        )
        return self._commit(
            key,
            entry,
            classification,
            finish_of(result),
            breakers=breakers,
            trial=False,  # unknown after a crash: a held trial slot is reclaimed by its lease
            why="replayed from the ledger",
        )

    def _commit(
        self,
        key: TaskKey,
        entry: LedgerEntry,
        classification: Classification,
        finish: Finish | None,
        *,
        breakers: CircuitBreakers,
        trial: bool,
        why: str,
    ) -> Outcome:
        result = entry.result
        feed = breakers.feed(result.adapter_id, classification, trial=trial)
        with self.lock.shared():
            recorded: Recorded = self.store.finish_attempt(
                key,
                result,
                final_state=finish.state if finish else None,
                final_message=finish.message if finish else "",
                entry=entry,
                breaker=feed,
            )
            self.events.write(recorded.events)
        # per-test gate outcomes: keyed rows, so a replay adds (and counts) nothing
        record_gate_tests(self.store.engine, key, result.attempt, result.gate, self.metrics)
        record = recorded.record or self.store.task(key)
        if recorded.new:
            feed.announce()
            if result.usage is not None:
                self.metrics.tokens(result.adapter_id, result.usage)
            if result.gate is not None:
                self.metrics.gate_finished(result.gate.passed)
            if finish is not None:
                self.metrics.task_finished(
                    result.adapter_id, record.status, record.duration_seconds
                )
            else:
                self._retry_scheduled(key, result, str(result.failure_class), why)
            self.escalations.attempt_recorded(
                key,
                result,
                final_state=finish.state if finish is not None else None,
                ledger_seq=entry.seq,
                transitions=feed.transitions,
            )
        return Outcome(entry, record, recorded.events, recorded.new, finish)

    def end(self, key: TaskKey, finish: Finish) -> TaskRecord:
        """End a task without another attempt (budget spent while waiting, cancelled...)."""
        events = self.commit_events(
            lambda: self.store.end_task(key, finish.state, finish.failure_class, finish.message)
        )
        record = self.store.task(key)
        if events:
            adapter = record.current_adapter_id or record.adapter_id
            self.metrics.task_finished(adapter, record.status, record.duration_seconds)
            self.escalations.task_ended(key, record.status, adapter, finish.message)
        return record

    def reopen(self, key: TaskKey, result: AttemptResult, *, why: str) -> TaskRecord:
        """A completed task sent back by the integration worker (the ledger already holds the
        verdict): PENDING again with ``result`` (its amended last attempt) and TASK_REOPENED
        in one transaction; counted as a retry only when that write was new."""
        events = self.commit_events(lambda: self.store.reopen_task(key, result))
        if events:
            failure = events[0].payload.get("failure_class")
            self._retry_scheduled(key, result, str(failure), why)
        return self.store.task(key)

    def _retry_scheduled(
        self, key: TaskKey, result: AttemptResult, failure: str, why: str
    ) -> None:
        self.metrics.retry(result.adapter_id, failure)
        self.resilience.write(
            "retry_scheduled",
            run_id=key.run_id,
            task_id=key.task_id,
            task_uid=key.uid or None,
            attempt=result.attempt,
            reason=why,
        )

    def park(self, key: TaskKey, reason: str) -> TaskRecord:
        self.store.set_waiting(key, reason)
        return self.store.task(key)

    # ------------------------------------------------------------------ crash repair

    def repair(self, run_id: str | None = None) -> None:
        """Bring the JSONL logs and the DB ledger mirror up to date after a crash."""
        self.repair_logs(run_id)
        mirrored = self.store.mirrored_seqs()
        for entry in self.ledger.entries():
            # integration verdicts are mirrored by the integration worker, not patch_history
            if entry.kind == "attempt" and entry.seq not in mirrored:
                self.store.mirror_ledger(entry, entry.scope or "")

    def repair_logs(self, run_id: str | None = None) -> tuple[int, int]:
        """Append what the database holds and ``logs/executor.jsonl`` (the events of
        ``run_id``; None: all) and ``logs/escalations.jsonl`` lack; safe beside live
        writers. Returns (event lines, escalation lines) appended."""
        events = self.events.repair(lambda: self.store.iter_events(run_id), self.lock)
        with self.lock.exclusive():  # few rows: the whole comparison under the lock
            escalations = self.escalations.repair()
        return events, escalations


def finish_of(recorded: AttemptResult, verdict: Verdict | None = None) -> Finish | None:
    """The task's end as the ledger recorded it (on a replay the ledger's word wins)."""
    if not recorded.final:
        return None
    if (
        verdict is not None
        and verdict.finish is not None
        and verdict.finish.state is recorded.task_final_state
    ):
        return verdict.finish
    state = recorded.task_final_state or final_state(
        Classification.failure(recorded.failure_class, recorded.failure_message)
        if recorded.failure_class
        else Classification.success(),
        budget_exhausted=False,
    )
    message = recorded.failure_message if state is not TaskState.COMPLETED else "completed"
    return Finish(state, recorded.failure_class, message, "as recorded in the ledger")

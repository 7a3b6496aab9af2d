"""The integration worker's rows: ``integrations`` (a run's branch and head) and
``integration_tasks`` (one verdict per completed attempt), with their events.

Why a module of its own (like :mod:`core.db.test_history`): the integration is a separate
concern from the attempt lifecycle that :mod:`core.db.store` records, and it is written by one
driver only. The same rules hold: every write is keyed and idempotent, and a verdict's row,
its event and the branch head it moves are written in one transaction, mirroring the ledger
entry that was fsynced before (``ledger_seq``/``entry_hash``, which ``ledger verify`` uses as
the anchor of the ledger's tail, as it uses ``patch_history`` for attempts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, select
from sqlalchemy.orm import Session

from core.db.insert import insert_ignore
from core.db.store import Event
from core.db.tables import ExecutionLog, Integration, IntegrationTask
from core.identity import EMBEDDED_SCOPE, TaskKey
from core.models import EventName, IntegrationOutcome, LedgerEntry

#: The event each verdict is announced with.
VERDICT_EVENTS = {
    IntegrationOutcome.MERGED: EventName.INTEGRATION_MERGED,
    IntegrationOutcome.CONFLICT: EventName.INTEGRATION_CONFLICT,
    IntegrationOutcome.GATE_FAILED: EventName.INTEGRATION_GATE_FAILED,
    IntegrationOutcome.SKIPPED: EventName.INTEGRATION_SKIPPED,
}
MAX_EVENT_REASON = 500


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass(frozen=True)
class IntegrationState:
    """A run's integration branch: where it lives, its base and its head."""

    run_id: str
    source: str
    repository: str
    branch: str
    base_commit: str
    head_commit: str
    pushed_to: str | None = None
    pushed_commit: str | None = None
    gate_runs: int = 0
    batches: int = 0
    scope: str = EMBEDDED_SCOPE


@dataclass(frozen=True)
class VerdictRow:
    key: TaskKey
    attempt: int
    adapter_id: str
    outcome: IntegrationOutcome
    commit: str | None
    parent_commit: str
    reason: str
    reopened: bool
    batch: int
    gate_runs: int
    ledger_seq: int
    recorded_at: datetime


def _state(row: Integration) -> IntegrationState:
    return IntegrationState(
        run_id=row.run_id,
        source=row.source,
        repository=row.repository,
        branch=row.branch,
        base_commit=row.base_commit,
        head_commit=row.head_commit,
        pushed_to=row.pushed_to,
        pushed_commit=row.pushed_commit,
        gate_runs=row.gate_runs,
        batches=row.batches,
        scope=row.scope,
    )


class IntegrationRows:
    def __init__(self, engine: Engine, now: Callable[[], datetime] = _utcnow) -> None:
        self.engine = engine
        self._now = now

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @staticmethod
    def _insert_ignore(session: Session, table: Table, values: dict[str, Any]) -> bool:
        return insert_ignore(session, table, values)

    # ------------------------------------------------------------------ the branch

    def state(self, run_id: str, scope: str = EMBEDDED_SCOPE) -> IntegrationState | None:
        with self._session() as s:
            row = s.get(Integration, (run_id, scope))
            return _state(row) if row is not None else None

    def start(self, state: IntegrationState) -> IntegrationState:
        """Create the run's integration (its head at its base); an existing one is kept."""
        now = self._now()
        with self._session() as s:
            self._insert_ignore(
                s,
                Integration.__table__,  # type: ignore[arg-type]
                {
                    "run_id": state.run_id,
                    "scope": state.scope,
                    "source": state.source,
                    "repository": state.repository,
                    "branch": state.branch,
                    "base_commit": state.base_commit,
                    "head_commit": state.base_commit,
                    "gate_runs": 0,
                    "batches": 0,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            row = s.get(Integration, (state.run_id, state.scope))
            assert row is not None
            return _state(row)

    def count(
        self, run_id: str, *, gate_runs: int, batches: int, scope: str = EMBEDDED_SCOPE
    ) -> None:
        """Add the gate runs and batches an integration run made."""
        with self._session() as s:
            row = s.get(Integration, (run_id, scope), with_for_update=True)
            if row is None:
                return
            row.gate_runs += gate_runs
            row.batches += batches
            row.updated_at = self._now()

    def pushed(self, run_id: str, url: str, commit: str, *, scope: str = EMBEDDED_SCOPE) -> None:
        with self._session() as s:
            row = s.get(Integration, (run_id, scope), with_for_update=True)
            if row is not None:
                row.pushed_to, row.pushed_commit, row.updated_at = url, commit, self._now()

    # ------------------------------------------------------------------ verdicts

    def record(self, key: TaskKey, entry: LedgerEntry) -> list[Event]:
        """Mirror an integration ledger entry: its row, its event and (merged) the new head,
        in one transaction. Returns the event when the row was new, else nothing."""
        verdict = entry.integration
        if verdict is None:
            raise ValueError(f"ledger entry {entry.seq} is not an integration verdict")
        now = self._now()
        with self._session() as s:
            added = self._insert_ignore(
                s,
                IntegrationTask.__table__,  # type: ignore[arg-type]
                {
                    "run_id": key.run_id,
                    "task_id": key.task_id,
                    "task_uid": key.uid,
                    "scope": key.scope,
                    "attempt": entry.attempt,
                    "adapter_id": entry.adapter_id,
                    "outcome": verdict.outcome.value,
                    "commit": verdict.commit,
                    "parent_commit": verdict.parent_commit,
                    "base_commit": entry.base_commit,
                    "reason": verdict.reason,
                    "reopened": verdict.reopened,
                    "batch": verdict.batch,
                    "gate_runs": verdict.gate_runs,
                    "ledger_seq": entry.seq,
                    "entry_hash": entry.hash,
                    "recorded_at": entry.recorded_at,
                },
            )
            if not added:
                return []
            if verdict.outcome is IntegrationOutcome.MERGED and verdict.commit is not None:
                row = s.get(Integration, (key.run_id, key.scope), with_for_update=True)
                if row is not None and row.head_commit == verdict.parent_commit:
                    row.head_commit, row.updated_at = verdict.commit, now
            name = VERDICT_EVENTS[verdict.outcome]
            event = Event(
                key=f"{key.qualified}/{entry.attempt}/{name.value}",
                run_id=key.run_id,
                task_id=key.task_id,
                attempt=entry.attempt,
                event=name.value,
                state=entry.state.value,
                payload={
                    "adapter_id": entry.adapter_id,
                    "outcome": verdict.outcome.value,
                    "branch": verdict.branch,
                    "commit": verdict.commit,
                    "parent_commit": verdict.parent_commit,
                    "reason": verdict.reason[:MAX_EVENT_REASON],
                    "conflict_files": verdict.conflict_files[:20],
                    "batch": verdict.batch,
                    "gate_runs": verdict.gate_runs,
                    "reopened": verdict.reopened,
                    "next_attempt": verdict.next_attempt,
                    "diff_sha256": entry.diff_sha256,
                },
                created_at=now,
                task_uid=key.uid,
            )
            self._insert_ignore(
                s,
                ExecutionLog.__table__,  # type: ignore[arg-type]
                {
                    "event_key": event.key,
                    "run_id": event.run_id,
                    "task_id": event.task_id,
                    "task_uid": event.task_uid,
                    "attempt": event.attempt,
                    "event": event.event,
                    "state": event.state,
                    "payload": event.payload,
                    "created_at": now,
                },
            )
            return [event]

    def verdicts(self, run_id: str, scope: str = EMBEDDED_SCOPE) -> list[VerdictRow]:
        """A run's verdicts in the order they were recorded (the ledger's)."""
        with self._session() as s:
            rows = s.scalars(
                select(IntegrationTask)
                .where(IntegrationTask.run_id == run_id, IntegrationTask.scope == scope)
                .order_by(IntegrationTask.ledger_seq)
            )
            return [
                VerdictRow(
                    key=TaskKey(r.run_id, r.task_id, r.task_uid, r.scope),
                    attempt=r.attempt,
                    adapter_id=r.adapter_id,
                    outcome=IntegrationOutcome(r.outcome),
                    commit=r.commit,
                    parent_commit=r.parent_commit,
                    reason=r.reason,
                    reopened=r.reopened,
                    batch=r.batch,
                    gate_runs=r.gate_runs,
                    ledger_seq=r.ledger_seq,
                    recorded_at=_aware(r.recorded_at),
                )
                for r in rows
            ]

    def mirrored_seqs(self) -> set[int]:
        with self._session() as s:
            return set(s.scalars(select(IntegrationTask.ledger_seq)))

    def ledger_anchor(self) -> list[tuple[int, str]]:
        """(seq, hash) of every integration entry: with ``patch_history``'s, the ledger's anchor."""
        with self._session() as s:
            rows = s.execute(select(IntegrationTask.ledger_seq, IntegrationTask.entry_hash))
            return [(seq, digest) for seq, digest in rows]

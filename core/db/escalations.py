"""The ``escalations`` table, and the attempt history escalation rules read.

Apart from :mod:`core.db.store` because escalations are a projection of what the store
recorded: the engine's escalation module (``core.engine.escalation``) decides, this module
only inserts keyed rows (ON CONFLICT DO NOTHING: a replay adds nothing), records webhook
deliveries and the operator's Warning Events, and answers "how many of an adapter's latest
attempts failed the same way".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db.tables import Escalation, PatchHistory


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class Streak:
    """The newest run of an adapter's attempts that all ended in one failure class."""

    count: int
    #: Ledger seq of the oldest attempt of the run (names the run: stable on a replay).
    first_seq: int | None


class EscalationRows:
    def __init__(self, engine: Engine, now: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self._now = now or (lambda: datetime.now(UTC))

    def insert(self, values: dict[str, Any]) -> bool:
        """Insert one escalation; False when its key is already there."""
        with Session(self.engine) as s, s.begin():
            dialect = s.get_bind().dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            # RETURNING, not rowcount: with psycopg an INSERT that fetches its new id reports
            # rowcount -1, conflict or not; a conflict returns no row
            statement = (
                insert(Escalation)
                .values(**values)
                .on_conflict_do_nothing()
                .returning(Escalation.id)
            )
            return s.execute(statement).first() is not None

    def notified(self, key: str, error: str | None) -> None:
        """Record a webhook delivery (``error`` None) or its final failure."""
        values: dict[str, Any] = {"notify_error": error}
        if error is None:
            values["notified_at"] = self._now()
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(Escalation).where(Escalation.escalation_key == key).values(**values)
            )

    def rows(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Escalations, oldest first (optionally of one run)."""
        query = select(Escalation).order_by(Escalation.id)
        if run_id is not None:
            query = query.where(Escalation.run_id == run_id)
        with Session(self.engine) as s:
            return [_as_dict(r) for r in s.scalars(query)]

    def undelivered(self, limit: int = 100) -> list[dict[str, Any]]:
        """Escalations no webhook took yet, oldest first."""
        query = (
            select(Escalation)
            .where(Escalation.notified_at.is_(None))
            .order_by(Escalation.id)
            .limit(limit)
        )
        with Session(self.engine) as s:
            return [_as_dict(r) for r in s.scalars(query)]

    def events_pending(
        self, scopes: tuple[str, ...] = (), limit: int = 100
    ) -> list[dict[str, Any]]:
        """Escalations of Kubernetes namespaces (``scopes``; empty: every namespace, never the
        embedded backend's) whose Warning Events were not posted yet, oldest first."""
        query = select(Escalation).where(
            Escalation.event_posted_at.is_(None), Escalation.scope != ""
        )
        if scopes:
            query = query.where(Escalation.scope.in_(scopes))
        with Session(self.engine) as s:
            return [_as_dict(r) for r in s.scalars(query.order_by(Escalation.id).limit(limit))]

    def event_posted(self, key: str) -> None:
        """Record that the escalation's Warning Events were posted (or had nothing to go on)."""
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(Escalation)
                .where(Escalation.escalation_key == key)
                .values(event_posted_at=self._now())
            )

    def streak(
        self, scope: str, adapter_id: str, failure_class: str, *, limit: int = 1000
    ) -> Streak:
        """How many of the adapter's newest recorded attempts (ledger order) ended in
        ``failure_class`` in a row, and where that run began."""
        query = (
            select(PatchHistory.seq, PatchHistory.failure_class)
            .where(PatchHistory.scope == scope, PatchHistory.adapter_id == adapter_id)
            .order_by(PatchHistory.seq.desc())
            .limit(limit)
        )
        count, first = 0, None
        with Session(self.engine) as s:
            for seq, cls in s.execute(query):
                if cls != failure_class:
                    break
                count, first = count + 1, seq
        return Streak(count, first)


def _as_dict(row: Escalation) -> dict[str, Any]:
    return {
        "escalation_key": row.escalation_key,
        "reason": row.reason,
        "severity": row.severity,
        "run_id": row.run_id,
        "task_id": row.task_id,
        "task_uid": row.task_uid,
        "scope": row.scope,
        "attempt": row.attempt,
        "adapter_id": row.adapter_id,
        "message": row.message,
        "evidence": row.evidence,
        "created_at": _aware(row.created_at),
        "notified_at": _aware(row.notified_at),
        "notify_error": row.notify_error,
        "event_posted_at": _aware(row.event_posted_at),
    }

"""Circuit-breaker snapshots in the ``adapters`` table, shared by every executor process.

Compare-and-set on ``breaker_version``: an UPDATE that names the version it read changes one
row or none, so two executors (or an executor and the operator) never lose each other's
counts; the loser re-reads and recomputes (see ``CircuitBreakers._mutate``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from core.db.tables import Adapter
from core.engine.resilience.circuit_breaker import BreakerSnapshot

_COLUMNS = (
    "breaker_state",
    "breaker_failures",
    "breaker_opened_at",
    "breaker_half_open_in_flight",
    "breaker_version",
    "breaker_tripped_at",
    "breaker_updated_at",
    "breaker_window",
)


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class SqlBreakerStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self, adapter_id: str) -> BreakerSnapshot:
        with Session(self.engine) as s:
            row = s.execute(
                select(*(getattr(Adapter, c) for c in _COLUMNS)).where(Adapter.id == adapter_id)
            ).one_or_none()
        if row is None:
            return BreakerSnapshot(adapter_id)
        return BreakerSnapshot.from_columns(
            adapter_id, {c: _aware(v) for c, v in zip(_COLUMNS, row, strict=True)}
        )

    def compare_and_set(self, snapshot: BreakerSnapshot) -> BreakerSnapshot | None:
        stored = replace(snapshot, version=snapshot.version + 1)
        with Session(self.engine) as s, s.begin():
            result = s.execute(
                update(Adapter)
                .where(Adapter.id == snapshot.adapter_id)
                .where(Adapter.breaker_version == snapshot.version)
                .values(**stored.to_columns(), updated_at=datetime.now(UTC))
            )
            if getattr(result, "rowcount", 0) != 1:
                return None
        return stored

"""Circuit-breaker columns of the ``adapters`` table, as plain dicts, with compare-and-set.

Why dicts: the breaker's arithmetic lives in :mod:`core.engine.resilience`, a layer above the
database; this module only persists the ``breaker_*`` columns of one scope's adapters.

Compare-and-set on ``breaker_version``: an UPDATE that names the version it read changes one
row or none, so two executors (or an executor and the operator) never lose each other's
counts; the loser re-reads and recomputes (see ``CircuitBreakers._mutate``). Finishing an
attempt updates the same columns inside the attempt's own transaction
(:meth:`core.db.store.Store.finish_attempt`), bumping the same version.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, select, update
from sqlalchemy.orm import Session

from core.db.tables import Adapter

#: The ``adapters`` columns that hold a breaker.
BREAKER_COLUMNS = (
    "breaker_state",
    "breaker_failures",
    "breaker_opened_at",
    "breaker_half_open_in_flight",
    "breaker_version",
    "breaker_tripped_at",
    "breaker_updated_at",
    "breaker_window",
)


_ADAPTERS = Adapter.__table__
#: Built once (the breaker is read before every attempt): a statement built per call costs
#: SQLAlchemy more Python than SQLite takes to run it.
_LOAD = select(*(_ADAPTERS.c[c] for c in BREAKER_COLUMNS)).where(
    (_ADAPTERS.c.scope == bindparam("scope")) & (_ADAPTERS.c.id == bindparam("adapter_id"))
)


_LOCK = _LOAD.with_for_update()
_FEED = (
    update(cast(Table, _ADAPTERS))
    .where((_ADAPTERS.c.scope == bindparam("w_scope")) & (_ADAPTERS.c.id == bindparam("w_id")))
    .values(
        {
            **{c: bindparam(f"new_{c}", type_=_ADAPTERS.c[c].type) for c in BREAKER_COLUMNS},
            _ADAPTERS.c.updated_at: bindparam("now", type_=_ADAPTERS.c.updated_at.type),
        }
    )
)


def aware(value: Any) -> Any:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def breaker_columns(row: Adapter) -> dict[str, Any]:
    return {c: aware(getattr(row, c)) for c in BREAKER_COLUMNS}


def feed(
    session: Session,
    scope: str,
    adapter_id: str,
    update_columns: Callable[[dict[str, Any]], dict[str, Any] | None],
    now: datetime,
) -> None:
    """Apply ``update_columns`` to an adapter's breaker inside ``session``'s transaction
    (the row locked until it ends, the version bumped); nothing when there is no row or
    nothing changes. Two built statements rather than an ORM load and flush of the whole row:
    this runs with every finished attempt (issue 17)."""
    params = {"scope": scope, "adapter_id": adapter_id}
    row = session.execute(_LOCK, params).first()
    if row is None:
        return
    loaded = {c: aware(v) for c, v in zip(BREAKER_COLUMNS, row, strict=True)}
    columns = update_columns(loaded)
    if columns is None:
        return
    version = loaded["breaker_version"]
    values = {**loaded, **columns, "breaker_version": version + 1}
    new = {f"new_{c}": values[c] for c in BREAKER_COLUMNS}
    session.execute(_FEED, {"w_scope": scope, "w_id": adapter_id, "now": now, **new})


class SqlBreakerRows:
    """The breaker columns of the adapters of one scope ('' embedded, else a namespace)."""

    def __init__(self, engine: Engine, scope: str = "") -> None:
        self.engine = engine
        self.scope = scope

    def load(self, adapter_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(_LOAD, {"scope": self.scope, "adapter_id": adapter_id}).first()
        if row is None:
            return None
        return {c: aware(v) for c, v in zip(BREAKER_COLUMNS, row, strict=True)}

    def compare_and_set(self, adapter_id: str, version: int, columns: dict[str, Any]) -> bool:
        """Write ``columns`` (with ``breaker_version = version + 1``) iff the row is at
        ``version``; False when another writer got there first (or there is no row)."""
        values = {**columns, "breaker_version": version + 1}
        with Session(self.engine) as s, s.begin():
            result = s.execute(
                update(Adapter)
                .where(Adapter.scope == self.scope, Adapter.id == adapter_id)
                .where(Adapter.breaker_version == version)
                .values(**values, updated_at=datetime.now(UTC))
            )
            return getattr(result, "rowcount", 0) == 1

"""Migration 0006 (integration tables) on SQLite and PostgreSQL: it creates exactly the
tables of the models, keeps existing rows, and downgrades cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from core.db.database import alembic_config, make_engine, upgrade
from core.db.tables import Base

TABLES = ("integrations", "integration_tasks")


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'o.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_0006_creates_the_integration_tables_of_the_models(url: str) -> None:
    upgrade(url, "0003")
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO adapters (scope, id, kind, spec, breaker_state, breaker_failures, "
                "breaker_half_open_in_flight, breaker_version, breaker_window, updated_at) "
                "VALUES ('', 'a', 'patch', '{}', 'CLOSED', 0, 0, 0, '', '2026-01-01')"
            )
        )
    upgrade(url, "0006")
    assert set(TABLES) <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diffs if any(t in repr(d) for t in TABLES)] == []
        assert conn.execute(text("SELECT id FROM adapters")).all() == [("a",)]
    command.downgrade(alembic_config(url), "0003")
    assert not set(TABLES) & set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM adapters")).all() == [("a",)]
    engine.dispose()

"""Migrations carry existing databases over without losing rows (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from core.db.database import alembic_config, make_engine, upgrade
from core.db.store import Store
from core.identity import TaskKey
from core.models import AdapterSpec, TaskSpec

NOW = "2026-01-01 00:00:00+00:00"
COMMIT = "c" * 40
SPEC = TaskSpec(task_id="twin", prompt="p", repo="r", base_commit=COMMIT)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _seed_0001(url: str) -> None:
    upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO adapters (id, kind, spec, breaker_state, breaker_failures, "
                "breaker_half_open_in_flight, breaker_version, breaker_window, updated_at) "
                "VALUES ('fake-ai', 'process', '{}', 'OPEN', 3, 0, 7, 'FFF', :now)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "INSERT INTO tasks (run_id, task_id, seq, adapter_id, status, attempts, spec, "
                "result, updated_at) VALUES ('k8s', 'twin', 1, 'fake-ai', 'COMPLETED', 1, "
                ":spec, '{\"attempts\": []}', :now)"
            ),
            {"now": NOW, "spec": SPEC.model_dump_json()},
        )
        c.execute(
            text(
                "INSERT INTO execution_log (event_key, run_id, task_id, attempt, event, state, "
                "payload, created_at) VALUES ('k8s/twin/1/TASK_STARTED', 'k8s', 'twin', 1, "
                "'TASK_STARTED', 'IN_PROGRESS', '{}', :now)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "INSERT INTO patch_history (seq, run_id, task_id, attempt, adapter_id, "
                "base_commit, state, diff_bytes, files_changed, insertions, deletions, "
                "truncated, prev_hash, entry_hash, recorded_at) VALUES (1, 'k8s', 'twin', 1, "
                "'fake-ai', :commit, 'COMPLETED', 0, 0, 0, 0, false, :zero, :hash, :now)"
            ),
            {"now": NOW, "commit": COMMIT, "zero": "0" * 64, "hash": "1" * 64},
        )
    engine.dispose()


def test_0002_keeps_every_row_and_separates_identities(url: str) -> None:
    _seed_0001(url)
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as c:
        assert c.execute(text("SELECT scope, id, breaker_state, breaker_version FROM adapters")).all() == [
            ("", "fake-ai", "OPEN", 7)
        ]
        assert c.execute(text("SELECT run_id, task_id, uid, scope, status FROM tasks")).all() == [
            ("k8s", "twin", "", "", "COMPLETED")
        ]
        assert c.execute(text("SELECT event_key, task_uid FROM execution_log")).all() == [
            ("k8s/twin/1/TASK_STARTED", "")
        ]
        assert c.execute(text("SELECT run_id, task_id, task_uid, scope FROM patch_history")).all() == [
            ("k8s", "twin", "", "")
        ]

    # the same task name in two namespaces, and an adapter name in two scopes, now coexist
    store = Store(engine)
    adapter = AdapterSpec(id="fake-ai", kind="patch")
    spec = SPEC
    for ns in ("team-a", "team-b"):
        store.sync_adapters(ns, [adapter])
        store.sync_tasks([(TaskKey("k8s", "twin", f"uid-{ns}", ns), 1, spec, "fake-ai")])
    keys = {(r.key.uid, r.key.scope, r.status.value) for r in store.tasks("k8s")}
    assert keys == {("", "", "COMPLETED"), ("uid-team-a", "team-a", "PENDING"), ("uid-team-b", "team-b", "PENDING")}
    assert {(a.scope, a.id) for a in store.adapters()} == {
        ("", "fake-ai"),
        ("team-a", "fake-ai"),
        ("team-b", "fake-ai"),
    }
    # a task row still needs its adapter in its own scope
    with pytest.raises(IntegrityError):
        store.sync_tasks([(TaskKey("k8s", "orphan", "u-x", "team-c"), 2, spec, "fake-ai")])
    engine.dispose()


def test_0002_downgrades_while_identities_do_not_collide(url: str) -> None:
    _seed_0001(url)
    upgrade(url)
    command.downgrade(alembic_config(url), "0001")
    engine = make_engine(url)
    with engine.connect() as c:
        assert c.execute(text("SELECT run_id, task_id, status FROM tasks")).all() == [
            ("k8s", "twin", "COMPLETED")
        ]
        assert c.execute(text("SELECT id, breaker_version FROM adapters")).all() == [("fake-ai", 7)]
    engine.dispose()
    upgrade(url)

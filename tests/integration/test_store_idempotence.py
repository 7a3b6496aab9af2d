"""Keyed inserts report a duplicate as a duplicate, on SQLite and on PostgreSQL.

psycopg reports rowcount -1 for INSERT ... ON CONFLICT DO NOTHING, which once made every
replayed event, gate flake and verdict look new on PostgreSQL (counted and appended twice).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.db.database import make_engine, upgrade
from core.db.store import Store
from core.db.test_history import TestHistory
from core.identity import TaskKey
from core.models import CheckResult, CheckStatus, EventName, GateResult, TestNames


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    target = (
        f"sqlite:///{tmp_path / 'db.sqlite'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    upgrade(target)
    return target


def test_a_replayed_event_is_not_new(url: str) -> None:
    store = Store(make_engine(url))
    first = store.run_event("r", EventName.EXECUTION_FINISHED, {"n": 1}, key="r//X")
    again = store.run_event("r", EventName.EXECUTION_FINISHED, {"n": 1}, key="r//X")
    assert [e.key for e in first] == ["r//X"] and again == []
    assert [e.key for e in store.events("r")] == ["r//X"]


def test_a_replayed_gate_flake_is_not_counted_twice(url: str) -> None:
    history = TestHistory(make_engine(url))
    check = CheckResult(
        name="u",
        status=CheckStatus.PASSED,
        exit_code=0,
        duration_seconds=1.0,
        flaky=TestNames(count=1, names=["t::a"]),
    )
    gate = GateResult(passed=True, applied=True, checks=[check])
    assert history.record(TaskKey("r", "t"), 1, gate) == {("u", "flaky"): 1}
    assert history.record(TaskKey("r", "t"), 1, gate) == {}

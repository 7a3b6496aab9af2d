"""The writes of one attempt, on SQLite and PostgreSQL: each state change as the database
holds it afterwards, replays that change nothing, and refusals of illegal moves.

The hot ones are single statements built once (``core.db.store``); these tests hold them to
the same contract as the full read-check-write they replaced.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.breaker_rows import SqlBreakerRows
from core.db.database import make_engine, upgrade
from core.db.store import Store
from core.db.tables import Adapter, Task
from core.errors import IllegalTransitionError
from core.identity import TaskKey
from core.models import AdapterSpec, AttemptResult, TaskSpec, TaskState

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
KEY = TaskKey("r", "t1")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = (
        f"sqlite:///{tmp_path / 'db.sqlite'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    upgrade(url)
    store = Store(make_engine(url), now=lambda: T0)
    adapter = AdapterSpec(id="a", kind="process", command=["true"])
    spec = TaskSpec(task_id="t1", prompt="p", repo="repo", base_commit="0" * 40)
    store.sync_inputs("r", [adapter], [(0, spec, "a")])
    return store


def _row(store: Store) -> Task:
    with Session(store.engine) as s:
        row = s.scalars(select(Task).where(Task.task_id == "t1")).one()
        s.expunge(row)
        return row


def test_an_attempt_moves_through_its_states(store: Store) -> None:
    assert store.begin_attempt(KEY, 1, "a", timeout_seconds=30, started_at=T0)
    assert store.begin_attempt(KEY, 1, "a", timeout_seconds=30, started_at=T0) == []  # replay
    store.set_process(KEY, 4242, "/w/tree")
    row = _row(store)
    assert (row.status, row.pid, row.workspace) == ("IN_PROGRESS", 4242, "/w/tree")
    assert store.task(KEY).pid == 4242 and store.task(KEY).workspace == "/w/tree"

    store.set_validating(KEY)
    store.set_validating(KEY)  # a replay is a no-op, not an error
    assert _row(store).status == "VALIDATING" and store.task(KEY).status is TaskState.VALIDATING

    result = AttemptResult(
        attempt=1,
        adapter_id="a",
        state=TaskState.COMPLETED,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=2),
        duration_seconds=2.0,
        final=True,
        task_final_state=TaskState.COMPLETED,
    )
    recorded = store.finish_attempt(KEY, result, final_state=TaskState.COMPLETED, entry=None)
    assert recorded.new and recorded.record is not None
    # the record handed back is the row as a fresh read sees it
    assert recorded.record == store.task(KEY)
    again = store.finish_attempt(KEY, result, final_state=TaskState.COMPLETED, entry=None)
    assert not again.new and again.events == [] and again.record == store.task(KEY)
    row = _row(store)
    assert (row.status, row.pid, row.workspace) == ("COMPLETED", None, None)


def test_illegal_moves_are_refused(store: Store) -> None:
    with pytest.raises(IllegalTransitionError):
        store.set_validating(KEY)  # PENDING -> VALIDATING skips IN_PROGRESS
    assert _row(store).status == "PENDING"
    with pytest.raises(KeyError):
        store.set_validating(TaskKey("r", "nope"))
    with pytest.raises(KeyError):
        store.task(TaskKey("r", "nope"))


def _finished(attempt: int) -> AttemptResult:
    return AttemptResult(
        attempt=attempt,
        adapter_id="a",
        state=TaskState.FAILED,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1),
        duration_seconds=1.0,
        final=False,
    )


def test_finishing_an_attempt_feeds_the_breaker_in_the_same_transaction(store: Store) -> None:
    """The breaker columns as the update proposes them, the version bumped and the row's
    updated_at set; an update that changes nothing writes nothing."""
    rows = SqlBreakerRows(store.engine)
    before = rows.load("a")
    assert before is not None and before["breaker_version"] == 0
    seen: list[dict[str, Any] | None] = []

    def trip(columns: dict[str, Any] | None) -> dict[str, Any] | None:
        seen.append(columns)
        assert columns is not None
        return {
            **columns,
            "breaker_state": "OPEN",
            "breaker_failures": 3,
            "breaker_opened_at": T0,
            "breaker_tripped_at": T0 - timedelta(minutes=1),
            "breaker_updated_at": T0,
            "breaker_window": "FFF",
        }

    store.begin_attempt(KEY, 1, "a", started_at=T0)
    store.finish_attempt(KEY, _finished(1), final_state=None, entry=None, breaker=trip)
    assert seen == [before]
    after = rows.load("a")
    assert after == {
        **before,
        "breaker_state": "OPEN",
        "breaker_failures": 3,
        "breaker_opened_at": T0,
        "breaker_tripped_at": T0 - timedelta(minutes=1),
        "breaker_updated_at": T0,
        "breaker_window": "FFF",
        "breaker_version": 1,
    }
    with Session(store.engine) as s:
        adapter = s.get(Adapter, ("", "a"))
        assert adapter is not None and adapter.updated_at.replace(tzinfo=UTC) == T0

    # nothing proposed: the row (and its version) stay as they are
    store.begin_attempt(KEY, 2, "a", started_at=T0)
    store.finish_attempt(KEY, _finished(2), final_state=None, entry=None, breaker=lambda c: None)
    assert rows.load("a") == after


def test_beginning_an_attempt_writes_the_row_and_its_event(store: Store) -> None:
    """The second attempt keeps the task's first start, replaces the attempt's fields and
    clears what the last one left (process, wait reason); a replay and an illegal start
    change nothing."""
    t1, t2 = T0 + timedelta(seconds=10), T0 + timedelta(minutes=5)
    assert [e.event for e in store.begin_attempt(KEY, 1, "a", started_at=t1)] == ["TASK_STARTED"]
    store.set_process(KEY, 4242, "/w/tree")
    store.finish_attempt(KEY, _finished(1), final_state=None, entry=None)
    store.set_waiting(KEY, "backoff")
    [started] = store.begin_attempt(KEY, 2, "b", timeout_seconds=90, started_at=t2)
    assert (started.attempt, started.state, started.payload) == (
        2,
        "IN_PROGRESS",
        {"adapter_id": "b"},
    )
    row = _row(store)
    assert (row.status, row.attempts, row.current_adapter_id) == ("IN_PROGRESS", 2, "b")
    assert (row.pid, row.workspace, row.wait_reason) == (None, None, None)
    assert row.started_at.replace(tzinfo=UTC) == t1  # the task's first start stays
    assert row.attempt_started_at.replace(tzinfo=UTC) == t2
    assert row.attempt_timeout_seconds == 90
    assert row.updated_at.replace(tzinfo=UTC) == T0
    assert store.begin_attempt(KEY, 2, "b", started_at=t2) == []  # replay
    with pytest.raises(IllegalTransitionError):
        store.begin_attempt(KEY, 3, "b")  # IN_PROGRESS -> IN_PROGRESS
    assert _row(store).attempts == 2
    keys = [e.key for e in store.events("r") if e.event == "TASK_STARTED"]
    assert keys == [f"{KEY.qualified}/1/TASK_STARTED", f"{KEY.qualified}/2/TASK_STARTED"]

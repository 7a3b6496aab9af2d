"""core.db.test_history: per-test gate outcomes in a real (migrated) database, and the metric.

SQLite here; tests/integration/test_gate_per_test_run.py records through the executor and
also on PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client import generate_latest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from core.db.database import current_revision, head_revision, make_engine, upgrade
from core.db.tables import Base, GateTestResult
from core.db.test_history import TestHistory, key_of, record_gate_tests
from core.engine.monitoring.metrics import Metrics
from core.identity import TaskKey
from core.models import CheckResult, CheckStatus, GateResult, TestNames


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(url)
    return make_engine(url)


def gate(flaky: list[str], new: list[str] = (), check: str = "pytest") -> GateResult:  # type: ignore[assignment]
    result = CheckResult(
        name=check,
        status=CheckStatus.FAILED if new else CheckStatus.PASSED,
        exit_code=1,
        duration_seconds=1.0,
        granularity="test",
        flaky=TestNames.of(flaky),
        new_failures=TestNames.of(new),
        pre_existing_failures=TestNames.of(["t::old"]),
        baseline_flaky=TestNames.of(["t::wobbly"]),
    )
    return GateResult(passed=not new, applied=True, checks=[result])


def test_the_migration_creates_exactly_the_table_of_the_model(engine: Engine) -> None:
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "gate_test_results" in repr(d)] == []


def test_recording_is_idempotent_and_feeds_the_metric_once(engine: Engine) -> None:
    metrics = Metrics()
    g = gate(["t::flaky"], ["t::broken"])
    record_gate_tests(engine, TaskKey("run", "task"), 1, g, metrics)
    record_gate_tests(engine, TaskKey("run", "task"), 1, g, metrics)  # a replayed recording
    record_gate_tests(engine, TaskKey("run", "task"), 1, None, metrics)  # no gate ran: nothing
    history = TestHistory(engine)
    assert history.results("run") == [
        ("task", 1, "pytest", "t::wobbly", "baseline_flaky"),
        ("task", 1, "pytest", "t::flaky", "flaky"),
        ("task", 1, "pytest", "t::broken", "new_failure"),
        ("task", 1, "pytest", "t::old", "pre_existing"),
    ]
    text = generate_latest(metrics.registry).decode()
    assert 'gate_flaky_tests_total{check="pytest"} 2.0' in text
    assert 'gate_test_results_total{check="pytest",outcome="new_failure"} 1.0' in text
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(GateTestResult)) == 4
        key = s.scalar(select(GateTestResult.test_key).where(GateTestResult.test_id == "t::flaky"))
    assert key == key_of("t::flaky") and len(key or "") == 64


def test_flake_history_counts_across_runs_most_frequent_first(engine: Engine) -> None:
    clock = iter(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i) for i in range(10))
    history = TestHistory(engine, now=lambda: next(clock))
    history.record(TaskKey("r1", "a"), 1, gate(["t::flaky", "t::rare"]))
    history.record(TaskKey("r1", "b"), 1, gate(["t::flaky"]))
    history.record(TaskKey("r2", "a"), 1, gate(["t::flaky"]))
    history.record(TaskKey("r2", "a"), 2, gate([], check="lint"))
    everything = history.flaky_tests()
    assert [(f.check, f.test_id, f.times) for f in everything] == [
        ("pytest", "t::flaky", 3),
        ("pytest", "t::wobbly", 3),  # baseline flakes count too
        ("lint", "t::wobbly", 1),
        ("pytest", "t::rare", 1),
    ]
    flaky = everything[0]
    assert (flaky.last_run, flaky.last_task) == ("r2", "a")
    assert flaky.last_seen == datetime(2026, 1, 1, 0, 2, tzinfo=UTC)
    # per run: the tests flaky in that run, with their whole history
    assert [(f.test_id, f.times) for f in history.flaky_tests(run_id="r2")][:2] == [
        ("t::flaky", 3),
        ("t::wobbly", 3),
    ]
    assert [f.test_id for f in history.flaky_tests(run_id="r1", limit=10)] == [
        "t::flaky",
        "t::wobbly",
        "t::rare",
    ]
    long_id = "tests/test_x.py::test_param[" + "x" * 5000 + "]"
    history.record(TaskKey("r3", "a"), 1, gate([long_id]))
    assert any(f.test_id == long_id for f in history.flaky_tests(run_id="r3"))

"""Per-test gate outcomes in the ``gate_test_results`` table, and the flake history they make.

The recorder calls :func:`record_gate_tests` once per finished attempt, after the attempt's
own rows: every test of the gate's result that did not simply pass becomes one row (names as
bounded by the result, :data:`core.models.MAX_TEST_NAMES` per list and check). Rows are keyed
by (run, task, uid, attempt, check, test, outcome) and inserted with ON CONFLICT DO NOTHING, so
recording an attempt again (a restarted executor or operator) adds nothing and counts no flake
twice. :meth:`TestHistory.flaky_tests` is what ``orchestrator status`` shows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from core.db.tables import GateTestResult
from core.identity import TaskKey
from core.models import CheckResult, GateResult

#: CheckResult list -> outcome stored.
OUTCOMES = {
    "new_failures": "new_failure",
    "pre_existing_failures": "pre_existing",
    "fixed": "fixed",
    "flaky": "flaky",
    "baseline_flaky": "baseline_flaky",
    "removed_failing": "removed",
}
FLAKY_OUTCOMES = ("flaky", "baseline_flaky")


class FlakyCounter(Protocol):
    """What the recorder's metrics offer (``core.engine.monitoring.metrics.Metrics``)."""

    def gate_tests(self, check: str, outcome: str, count: int) -> None: ...


@dataclass(frozen=True)
class FlakyTest:
    check: str
    test_id: str
    times: int
    last_seen: datetime
    last_run: str
    last_task: str


def key_of(test_id: str) -> str:
    """The short unique key of a test id (ids can be kilobytes long)."""
    return hashlib.sha256(test_id.encode("utf-8", errors="surrogateescape")).hexdigest()


def _rows(check: CheckResult) -> Iterator[tuple[str, str]]:
    for attr, outcome in OUTCOMES.items():
        for test in getattr(check, attr).names:
            yield test, outcome


class TestHistory:
    __test__ = False  # not a pytest test class

    def __init__(self, engine: Engine, now: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self._now = now or (lambda: datetime.now(UTC))

    def record(self, key: TaskKey, attempt: int, gate: GateResult) -> dict[tuple[str, str], int]:
        """Store the gate's per-test outcomes; returns rows *added* per (check, outcome)."""
        added: dict[tuple[str, str], int] = {}
        now = self._now()
        with Session(self.engine) as s, s.begin():
            dialect = s.get_bind().dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            for check in gate.checks:
                for test, outcome in _rows(check):
                    result = s.execute(
                        insert(GateTestResult)
                        .values(
                            run_id=key.run_id,
                            task_id=key.task_id,
                            task_uid=key.uid,
                            scope=key.scope,
                            attempt=attempt,
                            check_name=check.name,
                            test_key=key_of(test),
                            test_id=test,
                            outcome=outcome,
                            recorded_at=now,
                        )
                        .on_conflict_do_nothing()
                    )
                    if getattr(result, "rowcount", 0):
                        kind = (check.name, outcome)
                        added[kind] = added.get(kind, 0) + 1
        return added

    def results(
        self, run_id: str, task_id: str | None = None
    ) -> list[tuple[str, int, str, str, str]]:
        """(task, attempt, check, test, outcome) rows of a run, in a stable order."""
        query = select(
            GateTestResult.task_id,
            GateTestResult.attempt,
            GateTestResult.check_name,
            GateTestResult.test_id,
            GateTestResult.outcome,
        ).where(GateTestResult.run_id == run_id)
        if task_id is not None:
            query = query.where(GateTestResult.task_id == task_id)
        query = query.order_by(
            GateTestResult.task_id,
            GateTestResult.attempt,
            GateTestResult.check_name,
            GateTestResult.outcome,
            GateTestResult.test_id,
        )
        with Session(self.engine) as s:
            return [tuple(r) for r in s.execute(query)]  # type: ignore[misc]

    def flaky_tests(self, *, run_id: str | None = None, limit: int = 20) -> list[FlakyTest]:
        """Tests seen flaky, most often first; with ``run_id``, those flaky in that run, with
        their history across all runs."""
        r = GateTestResult
        flaky = r.outcome.in_(FLAKY_OUTCOMES)
        query = (
            select(r.check_name, r.test_key, func.count(), func.max(r.recorded_at))
            .where(flaky)
            .group_by(r.check_name, r.test_key)
        )
        if run_id is not None:
            same = aliased(GateTestResult)
            query = query.where(
                select(same.id)
                .where(
                    same.outcome.in_(FLAKY_OUTCOMES),
                    same.run_id == run_id,
                    same.check_name == r.check_name,
                    same.test_key == r.test_key,
                )
                .exists()
            )
        query = query.order_by(
            func.count().desc(),
            func.max(r.recorded_at).desc(),
            r.check_name,
            func.min(r.test_id),
        ).limit(limit)
        out = []
        with Session(self.engine) as s:
            for check, key, times, last in s.execute(query):
                latest = s.execute(
                    select(r.test_id, r.run_id, r.task_id)
                    .where(flaky, r.check_name == check, r.test_key == key)
                    .order_by(r.recorded_at.desc(), r.id.desc())
                    .limit(1)
                ).one()
                out.append(
                    FlakyTest(
                        check=check,
                        test_id=latest.test_id,
                        times=times,
                        last_seen=last if last.tzinfo else last.replace(tzinfo=UTC),
                        last_run=latest.run_id,
                        last_task=latest.task_id,
                    )
                )
        return out


def record_gate_tests(
    engine: Engine,
    key: TaskKey,
    attempt: int,
    gate: GateResult | None,
    metrics: FlakyCounter | None = None,
) -> None:
    """The recorder's one call: rows for the gate's per-test outcomes, metrics for new rows."""
    if gate is None:
        return
    added = TestHistory(engine).record(key, attempt, gate)
    if metrics is not None:
        for (check, outcome), n in sorted(added.items()):
            metrics.gate_tests(check, outcome, n)

"""Escalations on the embedded backend: a crashing adapter opens its breaker, another keeps
failing the test gate; the escalation file, the database, the metric and a real local webhook
receiver (127.0.0.1, scripted replies) all get them, once, also when the run is replayed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from core.db.database import default_url, make_engine, upgrade
from core.db.escalations import EscalationRows
from core.engine.alert_webhook import WebhookConfig
from core.engine.escalation import EscalationPolicy
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress
from core.models import TaskState
from tests.http_server import Reply, scripted_server
from tests.workdirs import fake_ai_adapter, make_workdir

GATE = [{"name": "answer", "command": ["{python}", "-c", "import answer; assert answer.X == 42"]}]


def workdir_with_trouble(root: Path) -> Path:
    broken = {
        "id": "broken",
        "kind": "process",
        "command": [sys.executable, "-c", "import sys; sys.exit('tool crashed')"],
        "retry": {"max_attempts": 1},
        "breaker": {"failure_threshold": 2, "cooldown_seconds": 3600},
    }
    sloppy = fake_ai_adapter("sloppy", retry={"max_attempts": 1}, gate=GATE)
    wrong = "fake-ai: write answer.py :: X = 41"
    return make_workdir(
        root,
        run_id="trouble",
        tasks=[
            {"task_id": "c1", "prompt": "Crash 1."},
            {"task_id": "c2", "prompt": "Crash 2."},
            {"task_id": "g1", "prompt": f"Answer 1.\n{wrong}"},
            {"task_id": "g2", "prompt": f"Answer 2.\n{wrong}"},
        ],
        adapters=[broken, sloppy],
        routes={"c1": "broken", "c2": "broken", "g1": "sloppy", "g2": "sloppy"},
    )


def execute(workdir: Path, policy: EscalationPolicy, url: str | None = None):
    url = url or default_url(workdir)
    upgrade(url)
    metrics = Metrics()
    executor = build_executor(
        ExecutorConfig(run_id="trouble", workdir=workdir, database_url=url, escalation=policy),
        progress=SilentProgress(),
        metrics=metrics,
        clocks=Clocks(sleep=lambda _: None),
    )
    return executor.run(), metrics


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return default_url(tmp_path / "w")
    return str(request.getfixturevalue("postgres_url"))


def test_breaker_open_and_repeated_gate_failures_reach_file_db_metric_and_webhook(
    tmp_path: Path, url: str
) -> None:
    workdir = workdir_with_trouble(tmp_path / "w")
    # the receiver fails the first delivery: the sender retries it
    with scripted_server(Reply(status=503, body={}), Reply(status=200, body={})) as receiver:
        webhook = WebhookConfig(url=receiver.url + "/hooks/escalations", backoff_seconds=0.05)
        policy = EscalationPolicy(gate_failures=2, webhook=webhook)
        results, metrics = execute(workdir, policy, url)
        assert [t.state for t in results.tasks] == [TaskState.FAILED] * 4

        records = lines(workdir / "logs/escalations.jsonl")
        reasons = [r["reason"] for r in records]
        assert sorted(reasons) == [
            "adapter_crash",
            "adapter_crash",
            "breaker_open",
            "gate_failed_repeatedly",
        ]
        opened = next(r for r in records if r["reason"] == "breaker_open")
        assert opened["event"] == "ESCALATION" and opened["adapter_id"] == "broken"
        assert opened["task_id"] == "c2" and opened["severity"] == "warning"
        assert "2 consecutive failure(s) (threshold 2)" in opened["message"]
        assert opened["evidence"]["resilience_log"].startswith("logs/resilience.jsonl")
        assert opened["evidence"]["task_log"] == "logs/execution/c2.jsonl"
        assert opened["evidence"]["ledger"] == ".state/patch_ledger.jsonl seq 2"
        gates = next(r for r in records if r["reason"] == "gate_failed_repeatedly")
        assert gates["adapter_id"] == "sloppy" and gates["task_id"] == "g2"
        assert "failed 2 times in a row" in gates["message"]
        assert gates["evidence"]["ledger_streak_from_seq"] == "3"

        # the database holds the same, and the webhook took every one of them
        rows = EscalationRows(make_engine(url)).rows("trouble")
        assert [r["escalation_key"] for r in rows] == [r["escalation_key"] for r in records]
        assert all(r["notified_at"] is not None and r["notify_error"] is None for r in rows)
        delivered = [s.json() for s in receiver.seen]
        assert len(delivered) == len(records) + 1  # one retried after the 503
        assert delivered[0] == delivered[1]  # the same record, sent again
        assert {d["escalation_key"] for d in delivered} == {r["escalation_key"] for r in records}
        assert all(s.path == "/hooks/escalations" for s in receiver.seen)

        text = generate_latest(metrics.registry).decode()
        assert 'escalations_total{reason="breaker_open"} 1.0' in text
        assert 'escalations_total{reason="gate_failed_repeatedly"} 1.0' in text
        assert 'escalations_total{reason="adapter_crash"} 2.0' in text

        # a second execution (a restart, a replay) tells nobody again
        seen_before = len(receiver.seen)
        _, again = execute(workdir, policy, url)
        assert lines(workdir / "logs/escalations.jsonl") == records
        assert len(receiver.seen) == seen_before
        assert "escalations_total{" not in generate_latest(again.registry).decode()


def test_alertmanager_format_and_a_lost_file_repaired_from_the_database(tmp_path: Path) -> None:
    workdir = workdir_with_trouble(tmp_path / "w")
    with scripted_server(Reply(status=200, body={})) as alertmanager:
        webhook = WebhookConfig(url=alertmanager.url + "/api/v2/alerts", format="alertmanager")
        execute(workdir, EscalationPolicy(webhook=webhook, reasons=frozenset({"breaker_open"})))
    [request] = alertmanager.seen
    [alert] = request.json()
    assert alert["labels"] == {
        "alertname": "OrchestratorEscalation",
        "reason": "breaker_open",
        "severity": "warning",
        "run_id": "trouble",
        "task_id": "c2",
        "adapter_id": "broken",
    }
    assert alert["annotations"]["summary"].startswith("circuit breaker of adapter broken opened")
    assert "resilience_log" in json.loads(alert["annotations"]["evidence"])
    assert alert["startsAt"].startswith("20")
    # the file is a projection of the database: lost, it comes back on the next start
    path = workdir / "logs/escalations.jsonl"
    before = lines(path)
    path.unlink()
    with scripted_server(Reply(status=200, body={})) as alertmanager:
        execute(workdir, EscalationPolicy(webhook=webhook, reasons=frozenset({"breaker_open"})))
    assert lines(path) == before
    assert alertmanager.seen == []  # delivered before: not sent again


def test_escalation_rows_on_postgresql(postgres_url: str) -> None:
    """The keyed insert, the delivery record and the gate-failure streak on PostgreSQL."""
    from datetime import UTC, datetime

    from core.db.store import Store
    from core.models import AttemptResult, LedgerEntry

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    rows = EscalationRows(engine)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    row = {
        "escalation_key": "task_timeout/run/t", "reason": "task_timeout", "severity": "warning",
        "run_id": "run", "task_id": "t", "message": "m", "evidence": {"a": "b"}, "created_at": now,
    }
    assert rows.insert(row) and not rows.insert(row)
    rows.notified("task_timeout/run/t", None)
    [stored] = rows.rows("run")
    assert stored["notified_at"] is not None and rows.undelivered() == []
    store = Store(engine)
    for seq, cls in enumerate(["adapter_error", "gate_failed", "gate_failed"], start=1):
        result = AttemptResult(
            attempt=seq, adapter_id="a", state=TaskState.FAILED, failure_class=cls,
            started_at=now, finished_at=now, duration_seconds=0,
        )
        entry = LedgerEntry(
            seq=seq, run_id="run", task_id="t", attempt=seq, adapter_id="a", base_commit="c" * 40,
            state=TaskState.FAILED, failure_class=cls, result=result, recorded_at=now,
            prev_hash=str(seq - 1) * 64, hash=str(seq) * 64,
        )
        store.mirror_ledger(entry)
    streak = rows.streak("", "a", "gate_failed")
    assert (streak.count, streak.first_seq) == (2, 2)
    engine.dispose()

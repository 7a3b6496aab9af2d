"""Escalation rules and their keys, on a real (SQLite) database: each trigger fires once per
fact, a replay of the same facts raises nothing, thresholds are honoured; webhook delivery
against a real local receiver (retries on 5xx, none on 4xx)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client import generate_latest

from core.db.database import current_revision, default_url, head_revision, make_engine, upgrade
from core.db.tables import Base
from core.engine.alert_webhook import WebhookConfig, WebhookSender, alertmanager_payload
from core.engine.escalation import EscalationPolicy, Escalations, is_crash
from core.engine.monitoring.metrics import Metrics
from core.engine.resilience.circuit_breaker import BreakerSnapshot, BreakerState, BreakerTransition
from core.identity import TaskKey
from core.models import AttemptResult, FailureClass, TaskState
from tests.http_server import Reply, scripted_server

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = TaskKey("run", "task")


@pytest.fixture
def escalations(tmp_path: Path) -> Escalations:
    upgrade(default_url(tmp_path))
    return Escalations(
        make_engine(default_url(tmp_path)),
        tmp_path,
        metrics=Metrics(),
        clock=lambda: NOW,
        policy=EscalationPolicy(breaker_open_seconds=600),
    )


def result(**fields: object) -> AttemptResult:
    base = {
        "attempt": 1,
        "adapter_id": "tool",
        "state": TaskState.FAILED,
        "started_at": NOW,
        "finished_at": NOW,
        "duration_seconds": 1.0,
        "log_path": "logs/execution/task.jsonl",
    }
    return AttemptResult.model_validate({**base, **fields})


def reasons(escalations: Escalations) -> list[str]:
    return [r["reason"] for r in escalations.rows.rows()]


def test_crash_and_timeout_escalate_once_however_often_they_are_recorded(
    escalations: Escalations,
) -> None:
    crashed = result(failure_class=FailureClass.ADAPTER_ERROR, exit_code=3)
    timed_out = result(attempt=2, failure_class=FailureClass.ADAPTER_TIMEOUT, timed_out=True)
    for _ in range(2):  # the second round is a replay
        escalations.attempt_recorded(KEY, crashed, final_state=None, ledger_seq=1)
        escalations.attempt_recorded(KEY, timed_out, final_state=TaskState.TIMEOUT, ledger_seq=2)
    assert reasons(escalations) == ["adapter_crash", "task_timeout"]
    lines = (escalations.path).read_text().splitlines()
    assert [json.loads(x)["reason"] for x in lines] == ["adapter_crash", "task_timeout"]
    text = generate_latest(escalations.metrics.registry).decode()
    assert 'escalations_total{reason="task_timeout"} 1.0' in text
    # a budget spent while waiting (no attempt) is the same task_timeout: not raised again
    assert escalations.task_ended(KEY, TaskState.TIMEOUT, "tool", "budget") == []


def test_a_named_api_error_is_not_a_crash() -> None:
    assert is_crash(result(failure_class=FailureClass.ADAPTER_ERROR, signal=9))
    assert not is_crash(result(failure_class=FailureClass.ADAPTER_ERROR, exit_code=None))
    assert not is_crash(result(failure_class=FailureClass.GATE_FAILED, exit_code=0))


def test_breaker_open_once_per_trip_and_too_long_after_the_threshold(
    escalations: Escalations,
) -> None:
    tripped = BreakerTransition("tool", BreakerState.CLOSED, BreakerState.OPEN, "3 failures", NOW, 3)
    reopened = BreakerTransition(
        "tool", BreakerState.HALF_OPEN, BreakerState.OPEN, "trial failed", NOW, 4
    )
    failed = result(failure_class=FailureClass.ADAPTER_ERROR)
    escalations.attempt_recorded(KEY, failed, final_state=None, ledger_seq=1, transitions=[tripped])
    escalations.attempt_recorded(KEY, failed, final_state=None, ledger_seq=1, transitions=[tripped])
    escalations.attempt_recorded(
        KEY, result(attempt=2, failure_class=FailureClass.ADAPTER_ERROR), final_state=None,
        ledger_seq=2, transitions=[reopened],
    )
    assert reasons(escalations) == ["breaker_open"]  # a failed trial is the same outage
    snap = BreakerSnapshot("tool", BreakerState.HALF_OPEN, 4, NOW, 0, 3, NOW, NOW)
    assert escalations.breakers_seen([snap], NOW + timedelta(seconds=599)) == []
    assert len(escalations.breakers_seen([snap], NOW + timedelta(seconds=600))) == 1
    assert escalations.breakers_seen([snap], NOW + timedelta(seconds=900)) == []
    assert reasons(escalations) == ["breaker_open", "breaker_open_too_long"]
    assert escalations.breakers_seen([BreakerSnapshot("tool")], NOW + timedelta(days=1)) == []


def test_safe_mode_escalates_each_time_it_is_entered(escalations: Escalations) -> None:
    assert escalations.safe_mode_entered("run", ["all adapters unavailable"], NOW.isoformat())
    assert not escalations.safe_mode_entered("run", ["again"], NOW.isoformat())
    later = (NOW + timedelta(hours=1)).isoformat()
    assert escalations.safe_mode_entered("run", ["all adapters unavailable"], later)
    [first, _] = escalations.rows.rows()
    assert first["severity"] == "critical" and "all adapters unavailable" in first["message"]


def test_disabled_reasons_raise_nothing(tmp_path: Path) -> None:
    upgrade(default_url(tmp_path))
    quiet = Escalations(
        make_engine(default_url(tmp_path)),
        tmp_path,
        metrics=Metrics(),
        clock=lambda: NOW,
        policy=EscalationPolicy(reasons=frozenset({"task_timeout"})),
    )
    crashed = result(failure_class=FailureClass.ADAPTER_ERROR, exit_code=1)
    assert quiet.attempt_recorded(KEY, crashed, final_state=None, ledger_seq=1) == []
    assert not quiet.path.exists()


def test_the_sender_retries_server_errors_and_gives_up_on_refusals() -> None:
    record = {"escalation_key": "k", "reason": "task_timeout", "message": "m", "ts": "t"}
    outcomes: list[tuple[str, str | None]] = []
    sleeps: list[float] = []
    with scripted_server(Reply(status=500), Reply(status=502), Reply(status=204, body=b"")) as hook:
        sender = WebhookSender(
            WebhookConfig(url=hook.url, token="hook-token"),
            lambda key, error: outcomes.append((key, error)),
            sleep=sleeps.append,
        )
        sender.send(record)
        assert sender.flush(30)
        assert outcomes == [("k", None)] and len(hook.seen) == 3 and len(sleeps) == 2
        assert sender.close() and not any(t.name == "escalation-webhook" for t in threading.enumerate())
        sender.send({**record, "escalation_key": "k2"})  # a closed sender starts again
        assert sender.close()
    assert outcomes == [("k", None), ("k2", None)] and len(hook.seen) == 4
    assert hook.seen[0].headers["authorization"] == "Bearer hook-token"
    assert hook.seen[2].json() == record
    assert "hook-token" not in repr(sender.config)
    with scripted_server(Reply(status=400, body={"error": "bad"})) as hook:
        sender = WebhookSender(WebhookConfig(url=hook.url, attempts=5), lambda k, e: None)
        error = sender.deliver(record)
    assert error is not None and error.startswith("refused: HTTP 400") and len(hook.seen) == 1
    with scripted_server(Reply(status=503)) as hook:
        sender = WebhookSender(WebhookConfig(url=hook.url, attempts=2), lambda k, e: None, sleep=sleeps.append)
        error = sender.deliver(record)
    assert error == "not delivered after 2 attempts: HTTP 503" and len(hook.seen) == 2


def test_alertmanager_alert_shape() -> None:
    [alert] = alertmanager_payload(
        {"escalation_key": "k", "reason": "breaker_open", "severity": "warning", "message": "m",
         "run_id": "r", "task_id": None, "scope": "", "adapter_id": "a", "ts": "2026-01-01T00:00:00+00:00",
         "evidence": {"resilience_log": "logs/resilience.jsonl"}}
    )
    assert alert["labels"] == {
        "alertname": "OrchestratorEscalation", "reason": "breaker_open", "severity": "warning",
        "run_id": "r", "adapter_id": "a",
    }
    assert alert["startsAt"] == "2026-01-01T00:00:00+00:00"
    assert alert["annotations"]["description"] == "m\n\nEvidence:\nresilience_log: logs/resilience.jsonl"


def test_the_migration_creates_exactly_the_table_of_the_model(escalations: Escalations) -> None:
    engine = escalations.rows.engine
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "escalations" in repr(d)] == []

"""The seed's metrics, served over HTTP on loopback as `--metrics-port` does."""

from __future__ import annotations

import socket
import urllib.request

from core.engine.monitoring.metrics import Metrics
from core.models import TaskState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_serves_every_seed_metric() -> None:
    metrics = Metrics(clock=lambda: 1234.0)
    metrics.heartbeat()
    metrics.task_finished("aider", TaskState.COMPLETED, 12.5)
    metrics.task_finished("aider", TaskState.FAILED, 3.0)
    metrics.gate_finished(True)
    metrics.retry("aider", "adapter_error")
    metrics.breaker("aider", "OPEN")
    metrics.health("aider", False)
    port = free_port()
    metrics.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    expected = [
        'tasks_executed_total{adapter="aider",state="COMPLETED"} 1.0',
        "task_success_rate 0.5",
        'task_duration_seconds_count{adapter="aider"} 2.0',
        'circuit_breaker_state{adapter="aider"} 2.0',
        'retry_attempts_total{adapter="aider",failure_class="adapter_error"} 1.0',
        "acceptance_test_pass_rate 1.0",
        "executor_heartbeat 1234.0",
        'adapter_health_check{adapter="aider"} 0.0',
        'circuit_breaker_status{adapter="aider"} 0.0',
    ]
    for line in expected:
        assert line in body, line

"""The seed's metrics and health signals, with prometheus-client.

Each executor owns its own :class:`~prometheus_client.CollectorRegistry` (tests and several
executors in one process do not collide). ``--metrics-port`` serves it over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from core.models import TaskState

BREAKER_VALUES = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._clock = clock
        self._last_heartbeat = 0.0
        r = self.registry
        self.tasks_executed = Counter(
            "tasks_executed",
            "Tasks that reached a terminal state.",
            ["adapter", "state"],
            registry=r,
        )
        self.task_success_rate = Gauge(
            "task_success_rate", "COMPLETED / terminal tasks of this executor.", registry=r
        )
        self.task_duration = Histogram(
            "task_duration_seconds",
            "Wall time of a task, all attempts.",
            ["adapter"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.circuit_breaker_state = Gauge(
            "circuit_breaker_state", "0 closed, 1 half-open, 2 open.", ["adapter"], registry=r
        )
        self.retry_attempts = Counter(
            "retry_attempts", "Attempts beyond the first.", ["adapter", "failure_class"], registry=r
        )
        self.acceptance_test_pass_rate = Gauge(
            "acceptance_test_pass_rate", "Passed / run test gates of this executor.", registry=r
        )
        self.executor_heartbeat = Gauge(
            "executor_heartbeat", "Unix time of the executor's last loop.", registry=r
        )
        self.adapter_health_check = Gauge(
            "adapter_health_check", "1 healthy, 0 unhealthy (last probe).", ["adapter"], registry=r
        )
        self.circuit_breaker_status = Gauge(
            "circuit_breaker_status",
            "1 when the adapter's breaker admits work.",
            ["adapter"],
            registry=r,
        )
        self.safe_mode = Gauge("executor_safe_mode", "1 while in safe mode.", registry=r)
        self.gate_test_results = Counter(
            "gate_test_results",
            "Tests of gate checks that did not simply pass, by outcome (new_failure, "
            "pre_existing, fixed, flaky, baseline_flaky, removed).",
            ["check", "outcome"],
            registry=r,
        )
        self.gate_flaky_tests = Counter(
            "gate_flaky_tests",
            "Tests that failed in a gate and passed when rerun alone (baseline included).",
            ["check"],
            registry=r,
        )
        self.integration_queue_depth = Gauge(
            "integration_queue_depth",
            "Completed changes waiting in the integration worker's merge queue.",
            registry=r,
        )
        self.integration_merge_latency = Histogram(
            "integration_merge_latency_seconds",
            "From a task's completion to its change's merge onto the integration branch.",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600),
            registry=r,
        )
        self.integration_gate_runs = Counter(
            "integration_gate_runs", "Gate runs on merged trees (integration).", registry=r
        )
        self.integration_gate_runs_per_merge = Gauge(
            "integration_gate_runs_per_merge",
            "Merged-tree gate runs per merged change, this run (one-by-one integration: >= 1).",
            registry=r,
        )
        self.integration_outcomes = Counter(
            "integration_outcomes",
            "Integration verdicts by outcome (merged, conflict, gate_failed, skipped).",
            ["outcome"],
            registry=r,
        )
        self._terminal = self._completed = self._gates = self._gates_passed = 0

    def heartbeat(self) -> None:
        self._last_heartbeat = self._clock()
        self.executor_heartbeat.set(self._last_heartbeat)

    @property
    def last_heartbeat(self) -> float:
        """The value of ``executor_heartbeat`` (0 before the first beat)."""
        return self._last_heartbeat

    def task_finished(self, adapter: str, state: TaskState, duration: float | None) -> None:
        self.tasks_executed.labels(adapter, state.value).inc()
        self._terminal += 1
        self._completed += state is TaskState.COMPLETED
        self.task_success_rate.set(self._completed / self._terminal)
        if duration is not None:
            self.task_duration.labels(adapter).observe(duration)

    def gate_finished(self, passed: bool) -> None:
        self._gates += 1
        self._gates_passed += passed
        self.acceptance_test_pass_rate.set(self._gates_passed / self._gates)

    def gate_tests(self, check: str, outcome: str, count: int) -> None:
        """Per-test gate outcomes newly recorded (see ``core.db.test_history``)."""
        self.gate_test_results.labels(check, outcome).inc(count)
        if outcome in ("flaky", "baseline_flaky"):
            self.gate_flaky_tests.labels(check).inc(count)

    def integration_verdict(self, outcome: str, latency_seconds: float | None) -> None:
        """A new integration verdict; ``latency_seconds``: completion to merge (merged)."""
        self.integration_outcomes.labels(outcome).inc()
        if latency_seconds is not None:
            self.integration_merge_latency.observe(max(0.0, latency_seconds))

    def integration_gate_run(self) -> None:
        self.integration_gate_runs.inc()

    def integration_progress(self, depth: int, gate_runs: int, merged: int) -> None:
        self.integration_queue_depth.set(depth)
        if merged:
            self.integration_gate_runs_per_merge.set(gate_runs / merged)

    def retry(self, adapter: str, failure_class: str) -> None:
        self.retry_attempts.labels(adapter, failure_class).inc()

    def breaker(self, adapter: str, state: str) -> None:
        self.circuit_breaker_state.labels(adapter).set(BREAKER_VALUES[state])
        self.circuit_breaker_status.labels(adapter).set(0 if state == "OPEN" else 1)

    def health(self, adapter: str, healthy: bool) -> None:
        self.adapter_health_check.labels(adapter).set(1 if healthy else 0)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

"""Adapter health and safe mode, as the executor consults them before taking work.

Health probes (the seed's ``adapter_health_check``) are optional per adapter: a command with a
timeout, run before the adapter's first use and then periodically while its breaker is not
CLOSED or its last probe failed (:func:`probe_due`). Results go to the ``adapters`` table,
the metrics and ``logs/resilience.jsonl``. An unhealthy adapter admits no work, like an open
breaker, so tasks move to a fallback or wait.

A probe runs in the executor's sandbox like the adapter itself (:mod:`core.engine.sandbox`:
its scratch HOME writable, network as ``sandbox.network``).

Safe mode (the seed's ``ai_safe_mode_conditions``) is evaluated from the same facts; while it
is active the executor takes no new task, and it leaves safe mode on its own when the
conditions clear.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path

from core.db.store import Store
from core.engine.command_line import base_path, expand_argv
from core.engine.monitoring.metrics import Metrics
from core.engine.process_group import run_process_group
from core.engine.redaction import adapter_redactor
from core.engine.resilience.breaker_store import CircuitBreakers
from core.engine.resilience.circuit_breaker import BreakerSnapshot
from core.engine.resilience.health import HealthResult, probe_due, probe_result
from core.engine.resilience.safe_mode import (
    AdapterCondition,
    SafeMode,
    SafeModeConfig,
    evaluate_safe_mode,
    safe_mode_change,
)
from core.engine.sandbox import Confinement, Sandbox
from core.models import AdapterSpec

Announce = Callable[[str, dict[str, object]], None]
#: Receives the breakers each safe-mode check looked at (the escalations' "open too long").
BreakerWatch = Callable[[list[BreakerSnapshot], datetime], object]


class _TailSink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, stream: str, text: str) -> None:
        self.lines = [*self.lines[-20:], text]


class AdapterHealth:
    def __init__(
        self,
        adapters: Mapping[str, AdapterSpec],
        *,
        store: Store,
        breakers: CircuitBreakers,
        metrics: Metrics,
        announce: Announce,
        wall: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
        safe_mode: SafeModeConfig | None = None,
        watch: BreakerWatch | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.adapters = adapters
        self.watch = watch
        self.sandbox = sandbox
        self.store = store
        self.breakers = breakers
        self.metrics = metrics
        self.announce = announce
        self.wall = wall
        self.monotonic = monotonic
        self.safe_mode_config = safe_mode or SafeModeConfig()
        self.last: dict[str, HealthResult] = {}
        self.safe_mode: SafeMode | None = None

    def probe(self, adapter_id: str) -> HealthResult | None:
        """Run the adapter's probe if one is due; the latest result (None: no probe)."""
        spec = self.adapters[adapter_id]
        state = self.breakers.view(adapter_id).state
        if probe_due(spec.health_check, self.last.get(adapter_id), state, self.wall()):
            assert spec.health_check is not None
            self.last[adapter_id] = result = self._run(spec)
            self.store.set_health(adapter_id, result.healthy, result.message, result.checked_at)
            self.metrics.health(adapter_id, result.healthy)
            self.announce(result.event, result.to_record())
        return self.last.get(adapter_id)

    def _run(self, spec: AdapterSpec) -> HealthResult:
        assert spec.health_check is not None
        sink = _TailSink()
        checked_at, started = self.wall(), self.monotonic()
        with tempfile.TemporaryDirectory(prefix="probe-") as home:
            proc = run_process_group(
                expand_argv(spec.health_check.command, {"python": sys.executable}),
                cwd=Path(home),
                env={"PATH": base_path(), "HOME": home, "LANG": "C.UTF-8", **spec.env},
                timeout=spec.health_check.timeout_seconds,
                sink=sink,
                grace_seconds=1.0,
                sandbox=self.sandbox,
                confinement=Confinement((Path(home),), network=spec.sandbox.network),
            )
        return probe_result(
            spec.id,
            checked_at=checked_at,
            duration_seconds=self.monotonic() - started,
            exit_code=proc.exit_code,
            timed_out=proc.timed_out,
            start_error=proc.start_error,
            # the probe's output reaches the DB, the resilience log and events: masked
            output_tail=adapter_redactor(spec, os.environ)("\n".join(sink.lines)),
        )

    def healthy(self, adapter_id: str) -> bool:
        result = self.probe(adapter_id)
        return result is None or result.healthy

    def admits_map(self, adapter_ids: Iterable[str]) -> dict[str, bool]:
        """Breaker admits work *and* the last probe (if any) passed."""
        return {a: self.breakers.admits(a) and self.healthy(a) for a in adapter_ids}

    def check_safe_mode(self) -> SafeMode:
        conditions = [
            AdapterCondition(
                adapter_id,
                healthy=self.last[adapter_id].healthy if adapter_id in self.last else None,
                breaker=self.breakers.view(adapter_id),
            )
            for adapter_id in self.adapters
        ]
        now = self.wall()
        if self.watch is not None:
            self.watch([c.breaker for c in conditions if c.breaker is not None], now)
        current = evaluate_safe_mode(conditions, now, self.safe_mode_config)
        change = safe_mode_change(self.safe_mode, current, now)
        self.safe_mode = current
        self.metrics.safe_mode.set(1 if current.active else 0)
        if change is not None:
            self.announce(change.event, change.to_record())
        return current

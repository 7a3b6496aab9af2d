"""Adapter health probes: when to run one and what its result means (seed: adapter_health_check).

Why separate from the breaker: a probe is cheap evidence gathered *without* spending a task
(``aider --version``, an API ping). It runs before an adapter's first use and periodically
while the adapter's breaker is not CLOSED or its last probe failed, so ``orchestrator
adapters``, the metrics and safe mode can tell "down" from "flaky". Probe results never feed
the breaker: only real attempts do. Running the command is the process spawner's job; this
module decides *when* and turns the raw result into a :class:`HealthResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from core.engine.resilience.circuit_breaker import BreakerState
from core.models import HealthProbe

_MAX_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class HealthResult:
    adapter_id: str
    healthy: bool
    message: str
    checked_at: datetime
    duration_seconds: float

    event: ClassVar[str] = "adapter_health_check"

    def to_record(self) -> dict[str, object]:
        """Fields of the log line / metric labels; the caller adds ts/run/event keys."""
        return {
            "adapter_id": self.adapter_id,
            "healthy": self.healthy,
            "message": self.message,
            "checked_at": self.checked_at.isoformat(),
            "duration_seconds": round(self.duration_seconds, 3),
        }


def probe_due(
    probe: HealthProbe | None,
    last: HealthResult | None,
    breaker_state: BreakerState,
    now: datetime,
) -> bool:
    """Whether to run ``probe`` now.

    Before first use (no result yet): yes. Afterwards only while the breaker is not CLOSED or
    the last probe failed, every ``probe.interval_seconds``. No probe configured: never.
    """
    if probe is None:
        return False
    if last is None:
        return True
    if breaker_state is BreakerState.CLOSED and last.healthy:
        return False
    return (now - last.checked_at).total_seconds() >= probe.interval_seconds


def probe_result(
    adapter_id: str,
    *,
    checked_at: datetime,
    duration_seconds: float,
    exit_code: int | None,
    timed_out: bool = False,
    start_error: str | None = None,
    output_tail: str = "",
) -> HealthResult:
    """Interpret a finished probe command: healthy iff it started, finished in time, exit 0."""
    if start_error is not None:
        healthy, message = False, f"probe could not start: {start_error}"
    elif timed_out:
        healthy, message = False, "probe timed out"
    elif exit_code != 0:
        healthy, message = False, f"probe exited with code {exit_code}"
    else:
        healthy, message = True, "probe succeeded"
    tail = output_tail.strip().splitlines()[-1:] if not healthy else []
    if tail:
        message += f": {tail[0]}"
    return HealthResult(
        adapter_id, healthy, message[:_MAX_MESSAGE], checked_at, max(0.0, duration_seconds)
    )

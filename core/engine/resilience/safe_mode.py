"""Safe mode: when to stop taking new tasks, evaluated purely from the current facts.

Why: the seed's ``ai_safe_mode_conditions`` (all adapters unhealthy, a circuit breaker open
for an extended period, the execution environment unavailable) describe situations where
starting more tasks only burns budget and produces noise. The executor evaluates this before
taking each task and on every heartbeat; since it is a pure function of the facts, safe mode
ends on its own as soon as they clear -- no latch for a human to reset.

An adapter counts as *unavailable* when its health probe failed or its breaker is OPEN (a
HALF_OPEN breaker admits trials, so it is available). An adapter without a probe result is
not counted as unhealthy. "Open for an extended period" measures from ``tripped_at`` (when
the breaker first left CLOSED), so a breaker that keeps failing its trials and re-opening
still counts as one long outage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from core.engine.resilience.circuit_breaker import BreakerSnapshot, BreakerState

#: Default "extended period" for an open breaker.
DEFAULT_MAX_OPEN_SECONDS = 900.0


@dataclass(frozen=True, slots=True)
class SafeModeConfig:
    #: A breaker that has not been CLOSED for this long triggers safe mode; None: never.
    max_open_seconds: float | None = DEFAULT_MAX_OPEN_SECONDS
    #: Whether "every adapter unavailable" triggers safe mode.
    all_unavailable: bool = True


@dataclass(frozen=True, slots=True)
class AdapterCondition:
    """What is known about one adapter right now."""

    adapter_id: str
    #: Result of the last health probe; None: no probe configured or not run yet.
    healthy: bool | None = None
    breaker: BreakerSnapshot | None = None
    health_message: str = ""

    @property
    def unavailable(self) -> bool:
        return self.healthy is False or (
            self.breaker is not None and self.breaker.state is BreakerState.OPEN
        )


@dataclass(frozen=True, slots=True)
class SafeMode:
    active: bool
    reasons: tuple[str, ...] = ()

    def summary(self) -> str:
        if not self.active:
            return "safe mode off"
        return "safe mode: " + "; ".join(self.reasons)


@dataclass(frozen=True, slots=True)
class SafeModeChange:
    """Safe mode was entered or left (emit an event / log line)."""

    entered: bool
    current: SafeMode
    at: datetime

    @property
    def event(self) -> str:
        return "safe_mode_entered" if self.entered else "safe_mode_left"

    def to_record(self) -> dict[str, object]:
        """Fields of the log line / event payload; the caller adds ts/run/event keys."""
        return {
            "active": self.current.active,
            "reasons": list(self.current.reasons),
            "at": self.at.isoformat(),
        }


def evaluate_safe_mode(
    adapters: Sequence[AdapterCondition],
    now: datetime,
    config: SafeModeConfig | None = None,
    environment_problems: Sequence[str] = (),
) -> SafeMode:
    """Whether the executor should stop taking new tasks, and why.

    ``environment_problems``: what the executor found wrong with its execution environment
    (work dir not writable, git missing, cluster unreachable...); any problem activates.
    """
    cfg = config or SafeModeConfig()
    reasons = [f"execution environment unavailable: {p}" for p in environment_problems]
    if cfg.all_unavailable and adapters and all(a.unavailable for a in adapters):
        details = ", ".join(
            f"{a.adapter_id} ({'breaker open' if a.healthy is not False else 'probe failed'})"
            for a in adapters
        )
        reasons.append(f"all adapters unavailable: {details}")
    if cfg.max_open_seconds is not None:
        for a in adapters:
            snap = a.breaker
            if snap is None or snap.state is BreakerState.CLOSED:
                continue
            since = snap.tripped_at or snap.opened_at
            if since is None:
                continue
            open_for = (now - since).total_seconds()
            if open_for >= cfg.max_open_seconds:
                reasons.append(
                    f"circuit breaker of {a.adapter_id} not closed for {open_for:.0f}s "
                    f"(limit {cfg.max_open_seconds:g}s)"
                )
    return SafeMode(bool(reasons), tuple(reasons))


def safe_mode_change(
    previous: SafeMode | None, current: SafeMode, now: datetime
) -> SafeModeChange | None:
    """The change to announce, if safe mode was entered or left since ``previous``."""
    was_active = previous is not None and previous.active
    if was_active == current.active:
        return None
    return SafeModeChange(current.active, current, now)

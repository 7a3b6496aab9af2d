"""Per-adapter circuit breaker as pure state and pure transition functions.

Why pure: the breaker's state lives in the ``adapters`` table and is shared by every executor
process (and mirrored into the Adapter resource on Kubernetes). A breaker object holding state
in memory would disagree with its siblings after the first update. Here a
:class:`BreakerSnapshot` is a row, every function maps ``(row, config, now)`` to a new row plus
the :class:`BreakerTransition` records to log, and :mod:`.breaker_store` writes the row back
with compare-and-set. No timers: OPEN -> HALF_OPEN is computed lazily from ``opened_at`` and an
injected wall clock whenever somebody looks.

States::

    CLOSED --N consecutive counted failures (or failure rate over a window)--> OPEN
    OPEN --cooldown elapsed (lazily)--> HALF_OPEN
    HALF_OPEN --trial success--> CLOSED        HALF_OPEN --trial failure--> OPEN

Only attempts admitted as *trials* decide a HALF_OPEN breaker; outcomes of attempts that
started before the breaker opened are ignored while it is OPEN or HALF_OPEN. Neutral outcomes
(infrastructure, cancelled, gate_failed, empty_diff) never feed the breaker; a neutral trial
just gives its slot back. A trial whose executor died would hold its slot forever, so slots
are reclaimed after ``trial_lease_seconds`` without any update.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from core.engine.resilience.classification import Classification
from core.models import BreakerPolicy


class BreakerState(StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


#: Values of the ``circuit_breaker_state`` gauge.
STATE_GAUGE: dict[BreakerState, int] = {
    BreakerState.CLOSED: 0,
    BreakerState.HALF_OPEN: 1,
    BreakerState.OPEN: 2,
}


#: Default trial lease: longer than the default adapter timeout (1800 s). A too-short lease
#: only lets one extra trial in; a missing one can wedge a breaker in HALF_OPEN forever.
DEFAULT_TRIAL_LEASE_SECONDS = 3600.0

#: Longest rate window (the ``breaker_window`` column is a 100-character string).
MAX_WINDOW_SIZE = 100


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


def outcome_of(classification: Classification) -> Outcome:
    """How an attempt's classification feeds its adapter's breaker."""
    if classification.failure_class is None:
        return Outcome.SUCCESS
    return Outcome.FAILURE if classification.counts_against_adapter else Outcome.NEUTRAL


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """:class:`core.models.BreakerPolicy` plus the (proposed) rate window and trial lease."""

    failure_threshold: int = 3
    cooldown_seconds: float = 60.0
    half_open_max_trials: int = 1
    #: Counted outcomes kept for the rate rule; 0 disables it.
    window_size: int = 0
    #: Trip when the window is full and at least this fraction of it failed.
    failure_rate_threshold: float = 1.0
    #: Reclaim HALF_OPEN trial slots after this long without an update (a trial whose
    #: executor died would otherwise hold its slot forever); None: never.
    trial_lease_seconds: float | None = DEFAULT_TRIAL_LEASE_SECONDS

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.half_open_max_trials < 1:
            raise ValueError("failure_threshold and half_open_max_trials must be >= 1")
        if self.cooldown_seconds < 0 or self.window_size < 0:
            raise ValueError("cooldown_seconds and window_size must be >= 0")
        if self.window_size > MAX_WINDOW_SIZE:
            raise ValueError(f"window_size must be <= {MAX_WINDOW_SIZE}")
        if self.trial_lease_seconds is not None and self.trial_lease_seconds <= 0:
            raise ValueError("trial_lease_seconds must be > 0 (or None to disable)")
        if not 0.0 < self.failure_rate_threshold <= 1.0:
            raise ValueError("failure_rate_threshold must be in (0, 1]")

    @classmethod
    def from_policy(cls, policy: BreakerPolicy) -> BreakerConfig:
        return cls(
            failure_threshold=policy.failure_threshold,
            cooldown_seconds=policy.cooldown_seconds,
            half_open_max_trials=policy.half_open_max_trials,
            window_size=policy.window_size,
            failure_rate_threshold=policy.failure_rate_threshold,
            trial_lease_seconds=policy.trial_lease_seconds,
        )


def _config(policy: BreakerPolicy | BreakerConfig) -> BreakerConfig:
    return policy if isinstance(policy, BreakerConfig) else BreakerConfig.from_policy(policy)


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """One adapter's breaker; each field is one column of the ``adapters`` table."""

    adapter_id: str
    state: BreakerState = BreakerState.CLOSED  # breaker_state
    consecutive_failures: int = 0  # breaker_failures
    opened_at: datetime | None = None  # breaker_opened_at: last time it (re)opened
    half_open_in_flight: int = 0  # breaker_half_open_in_flight
    version: int = 0  # breaker_version: bumped by every compare-and-set save
    tripped_at: datetime | None = None  # breaker_tripped_at: left CLOSED at (for safe mode)
    updated_at: datetime | None = None  # breaker_updated_at: last change (trial lease)
    window: str = ""  # breaker_window: recent counted outcomes, "S"/"F", newest last

    def violations(self, policy: BreakerPolicy | BreakerConfig) -> list[str]:
        """Broken invariants (empty when the snapshot is legal)."""
        cfg = _config(policy)
        problems: list[str] = []
        if self.consecutive_failures < 0 or self.half_open_in_flight < 0 or self.version < 0:
            problems.append("negative counter")
        if self.state is BreakerState.CLOSED:
            if self.opened_at is not None or self.tripped_at is not None:
                problems.append("CLOSED with opened_at/tripped_at")
            if self.half_open_in_flight:
                problems.append("CLOSED with trials in flight")
        else:
            if self.opened_at is None or self.tripped_at is None:
                problems.append(f"{self.state} without opened_at/tripped_at")
            elif self.tripped_at > self.opened_at:
                problems.append("tripped_at after opened_at")
        if self.state is BreakerState.OPEN and self.half_open_in_flight:
            problems.append("OPEN with trials in flight")
        if self.half_open_in_flight > cfg.half_open_max_trials:
            problems.append("more trials in flight than half_open_max_trials")
        if set(self.window) - {"S", "F"} or len(self.window) > cfg.window_size:
            problems.append(f"bad window {self.window!r}")
        return problems

    def to_columns(self) -> dict[str, Any]:
        """The ``adapters`` columns of this snapshot (``breaker_*``)."""
        return {
            "breaker_state": self.state.value,
            "breaker_failures": self.consecutive_failures,
            "breaker_opened_at": self.opened_at,
            "breaker_half_open_in_flight": self.half_open_in_flight,
            "breaker_version": self.version,
            "breaker_tripped_at": self.tripped_at,
            "breaker_updated_at": self.updated_at,
            "breaker_window": self.window,
        }

    @classmethod
    def from_columns(cls, adapter_id: str, row: dict[str, Any]) -> BreakerSnapshot:
        """Inverse of :meth:`to_columns`; the proposed columns may be missing."""
        return cls(
            adapter_id=adapter_id,
            state=BreakerState(row.get("breaker_state") or BreakerState.CLOSED),
            consecutive_failures=int(row.get("breaker_failures") or 0),
            opened_at=row.get("breaker_opened_at"),
            half_open_in_flight=int(row.get("breaker_half_open_in_flight") or 0),
            version=int(row.get("breaker_version") or 0),
            tripped_at=row.get("breaker_tripped_at") or row.get("breaker_opened_at"),
            updated_at=row.get("breaker_updated_at"),
            window=str(row.get("breaker_window") or ""),
        )


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change, for ``logs/resilience.jsonl`` and the ``circuit_breaker_state`` gauge.

    ``from_state == to_state`` marks a reclaim of stale HALF_OPEN trial slots.
    """

    adapter_id: str
    from_state: BreakerState
    to_state: BreakerState
    reason: str
    at: datetime
    consecutive_failures: int = 0

    @property
    def gauge(self) -> int:
        return STATE_GAUGE[self.to_state]

    @property
    def event(self) -> str:
        """Suggested event name for the log line (not part of :meth:`to_record`)."""
        return "circuit_breaker_transition"

    def to_record(self) -> dict[str, Any]:
        """Fields of the ``logs/resilience.jsonl`` line; the caller adds ts/run/event keys."""
        return {
            "adapter_id": self.adapter_id,
            "from": self.from_state.value,
            "to": self.to_state.value,
            "reason": self.reason,
            "at": self.at.isoformat(),
            "consecutive_failures": self.consecutive_failures,
            "circuit_breaker_state": self.gauge,
        }


@dataclass(frozen=True, slots=True)
class BreakerUpdate:
    snapshot: BreakerSnapshot
    transitions: tuple[BreakerTransition, ...] = ()
    #: The snapshot differs from the input: save it (compare-and-set).
    changed: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    #: The attempt holds a HALF_OPEN trial slot; pass ``trial=True`` when recording it.
    trial: bool
    update: BreakerUpdate
    reason: str
    #: When asking again makes sense (None: when a running trial finishes).
    retry_after_seconds: float | None = None


def _seconds(since: datetime, now: datetime) -> float:
    return (now - since).total_seconds()


def _move(
    snap: BreakerSnapshot, to: BreakerState, reason: str, now: datetime, **changes: Any
) -> tuple[BreakerSnapshot, BreakerTransition]:
    new = replace(snap, state=to, updated_at=now, **changes)
    return new, BreakerTransition(
        snap.adapter_id, snap.state, to, reason, now, new.consecutive_failures
    )


def refresh(
    snapshot: BreakerSnapshot, policy: BreakerPolicy | BreakerConfig, now: datetime
) -> BreakerUpdate:
    """Apply the passage of time: end an elapsed cool-down, reclaim stale trial slots."""
    cfg = _config(policy)
    snap = snapshot
    if (
        snap.state is BreakerState.OPEN
        and snap.opened_at is not None
        and _seconds(snap.opened_at, now) >= cfg.cooldown_seconds
    ):
        snap, moved = _move(
            snap,
            BreakerState.HALF_OPEN,
            f"cool-down of {cfg.cooldown_seconds:g}s elapsed; admitting trial tasks",
            now,
            half_open_in_flight=0,
        )
        return BreakerUpdate(snap, (moved,), True)
    if (
        snap.state is BreakerState.HALF_OPEN
        and snap.half_open_in_flight > 0
        and cfg.trial_lease_seconds is not None
    ):
        since = snap.updated_at or snap.opened_at
        if since is not None and _seconds(since, now) >= cfg.trial_lease_seconds:
            snap, moved = _move(
                snap,
                BreakerState.HALF_OPEN,
                f"reclaimed {snap.half_open_in_flight} trial slot(s) idle for "
                f"{cfg.trial_lease_seconds:g}s (executor gone?)",
                now,
                half_open_in_flight=0,
            )
            return BreakerUpdate(snap, (moved,), True)
    return BreakerUpdate(snap)


def _retry_after(snap: BreakerSnapshot, cfg: BreakerConfig, now: datetime) -> float | None:
    if snap.state is BreakerState.OPEN and snap.opened_at is not None:
        return max(0.0, cfg.cooldown_seconds - _seconds(snap.opened_at, now))
    full = snap.half_open_in_flight >= cfg.half_open_max_trials
    if snap.state is BreakerState.HALF_OPEN and full:
        if cfg.trial_lease_seconds is None:
            return None
        since = snap.updated_at or snap.opened_at
        elapsed = 0.0 if since is None else _seconds(since, now)
        return max(0.0, cfg.trial_lease_seconds - elapsed)
    return 0.0


def retry_after(
    snapshot: BreakerSnapshot, policy: BreakerPolicy | BreakerConfig, now: datetime
) -> float | None:
    """Seconds until the breaker may admit work: 0 now, None when a trial's end decides."""
    cfg = _config(policy)
    return _retry_after(refresh(snapshot, cfg, now).snapshot, cfg, now)


def would_admit(
    snapshot: BreakerSnapshot, policy: BreakerPolicy | BreakerConfig, now: datetime
) -> bool:
    """Whether :func:`acquire` would admit an attempt now (a peek: nothing changes)."""
    return retry_after(snapshot, policy, now) == 0.0


def acquire(
    snapshot: BreakerSnapshot, policy: BreakerPolicy | BreakerConfig, now: datetime
) -> Admission:
    """Ask to start an attempt on this adapter; in HALF_OPEN this takes a trial slot."""
    cfg = _config(policy)
    refreshed = refresh(snapshot, cfg, now)
    snap = refreshed.snapshot
    if snap.state is BreakerState.CLOSED:
        return Admission(True, False, refreshed, "circuit breaker closed")
    if snap.state is BreakerState.HALF_OPEN and snap.half_open_in_flight < cfg.half_open_max_trials:
        taken = replace(snap, half_open_in_flight=snap.half_open_in_flight + 1, updated_at=now)
        update = BreakerUpdate(taken, refreshed.transitions, True)
        slot = f"{taken.half_open_in_flight} of {cfg.half_open_max_trials}"
        return Admission(True, True, update, f"circuit breaker half-open: trial {slot}")
    wait = _retry_after(snap, cfg, now)
    if snap.state is BreakerState.OPEN:
        reason = f"circuit breaker open after {snap.consecutive_failures} failure(s)"
    else:
        reason = f"circuit breaker half-open with {snap.half_open_in_flight} trial(s) running"
    return Admission(False, False, refreshed, reason, wait)


def _rate_tripped(window: str, cfg: BreakerConfig) -> bool:
    if cfg.window_size == 0 or len(window) < cfg.window_size:
        return False
    return window.count("F") / len(window) >= cfg.failure_rate_threshold


def record(
    snapshot: BreakerSnapshot,
    policy: BreakerPolicy | BreakerConfig,
    now: datetime,
    outcome: Outcome,
    *,
    trial: bool,
) -> BreakerUpdate:
    """Feed one finished attempt's outcome to the breaker (``trial`` from its Admission)."""
    cfg = _config(policy)
    refreshed = refresh(snapshot, cfg, now)
    snap, transitions = refreshed.snapshot, refreshed.transitions
    changed = refreshed.changed
    if snap.state is BreakerState.CLOSED and outcome is not Outcome.NEUTRAL:
        mark = "S" if outcome is Outcome.SUCCESS else "F"
        window = (snap.window + mark)[-cfg.window_size :] if cfg.window_size else ""
        failures = 0 if outcome is Outcome.SUCCESS else snap.consecutive_failures + 1
        new = replace(snap, consecutive_failures=failures, window=window)
        if outcome is Outcome.FAILURE and (
            failures >= cfg.failure_threshold or _rate_tripped(window, cfg)
        ):
            why = (
                f"{failures} consecutive failure(s) (threshold {cfg.failure_threshold})"
                if failures >= cfg.failure_threshold
                else f"failure rate {window.count('F')}/{len(window)} reached "
                f"{cfg.failure_rate_threshold:.0%}"
            )
            new, moved = _move(
                new, BreakerState.OPEN, why, now, opened_at=now, tripped_at=now, window=""
            )
            return BreakerUpdate(new, (*transitions, moved), True)
        if new != snap:
            return BreakerUpdate(replace(new, updated_at=now), transitions, True)
        return BreakerUpdate(snap, transitions, changed)
    if snap.state is BreakerState.HALF_OPEN and trial:
        if outcome is Outcome.SUCCESS:
            new, moved = _move(
                snap,
                BreakerState.CLOSED,
                "trial attempt succeeded",
                now,
                consecutive_failures=0,
                opened_at=None,
                tripped_at=None,
                half_open_in_flight=0,
                window="",
            )
            return BreakerUpdate(new, (*transitions, moved), True)
        if outcome is Outcome.FAILURE:
            new, moved = _move(
                snap,
                BreakerState.OPEN,
                "trial attempt failed",
                now,
                consecutive_failures=snap.consecutive_failures + 1,
                opened_at=now,
                half_open_in_flight=0,
            )
            return BreakerUpdate(new, (*transitions, moved), True)
        if snap.half_open_in_flight > 0:
            new = replace(snap, half_open_in_flight=snap.half_open_in_flight - 1, updated_at=now)
            return BreakerUpdate(new, transitions, True)
    # OPEN, or a stale (non-trial) outcome while HALF_OPEN: nothing to learn from it.
    return BreakerUpdate(snap, transitions, changed)


def status(
    snapshot: BreakerSnapshot, policy: BreakerPolicy | BreakerConfig, now: datetime
) -> dict[str, Any]:
    """The ``circuit_breaker_status`` health record of one adapter (as of ``now``)."""
    cfg = _config(policy)
    snap = refresh(snapshot, cfg, now).snapshot
    return {
        "adapter_id": snap.adapter_id,
        "state": snap.state.value,
        "circuit_breaker_state": STATE_GAUGE[snap.state],
        "consecutive_failures": snap.consecutive_failures,
        "opened_at": snap.opened_at.isoformat() if snap.opened_at else None,
        "tripped_at": snap.tripped_at.isoformat() if snap.tripped_at else None,
        "half_open_in_flight": snap.half_open_in_flight,
        "admits_work": _retry_after(snap, cfg, now) == 0.0,
        "retry_after_seconds": _retry_after(snap, cfg, now),
    }

"""Safe mode and adapter health probes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.engine.resilience.circuit_breaker import BreakerSnapshot, BreakerState
from core.engine.resilience.health import probe_due, probe_result
from core.engine.resilience.safe_mode import (
    AdapterCondition,
    SafeMode,
    SafeModeConfig,
    evaluate_safe_mode,
    safe_mode_change,
)
from core.models import HealthProbe

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def breaker(
    state: BreakerState, opened: float = 0, tripped: float | None = None
) -> BreakerSnapshot:
    if state is BreakerState.CLOSED:
        return BreakerSnapshot("x")
    return BreakerSnapshot(
        "x",
        state=state,
        consecutive_failures=3,
        opened_at=at(opened),
        tripped_at=at(opened if tripped is None else tripped),
    )


def test_all_healthy_is_not_safe_mode() -> None:
    mode = evaluate_safe_mode([AdapterCondition("a", True), AdapterCondition("b", None)], T0)
    assert mode == SafeMode(False, ())
    assert mode.summary() == "safe mode off"


def test_no_adapters_is_not_safe_mode() -> None:
    assert not evaluate_safe_mode([], T0).active


def test_all_probes_failing_activates() -> None:
    mode = evaluate_safe_mode([AdapterCondition("a", False), AdapterCondition("b", False)], T0)
    assert mode.active
    assert "all adapters unavailable" in mode.reasons[0]
    assert "a (probe failed)" in mode.reasons[0]


def test_one_available_adapter_keeps_working() -> None:
    conditions = [AdapterCondition("a", False), AdapterCondition("b", None)]
    assert not evaluate_safe_mode(conditions, T0).active


def test_all_breakers_open_counts_as_unavailable_but_half_open_does_not() -> None:
    cfg = SafeModeConfig(max_open_seconds=None)
    all_open = [
        AdapterCondition("a", True, breaker(BreakerState.OPEN)),
        AdapterCondition("b", None, breaker(BreakerState.OPEN)),
    ]
    mode = evaluate_safe_mode(all_open, at(5), cfg)
    assert mode.active and "breaker open" in mode.summary()
    one_half = [all_open[0], AdapterCondition("b", None, breaker(BreakerState.HALF_OPEN))]
    assert not evaluate_safe_mode(one_half, at(5), cfg).active


def test_breaker_open_for_extended_period_activates() -> None:
    cfg = SafeModeConfig(max_open_seconds=600)
    conditions = [
        AdapterCondition("a", True, breaker(BreakerState.OPEN)),
        AdapterCondition("b", True),
    ]
    assert not evaluate_safe_mode(conditions, at(599), cfg).active
    mode = evaluate_safe_mode(conditions, at(600), cfg)
    assert mode.active
    assert "circuit breaker of a not closed for 600s" in mode.reasons[0]


def test_reopening_breaker_measures_from_first_trip() -> None:
    cfg = SafeModeConfig(max_open_seconds=600)
    # re-opened 10 s ago after failed trials, but first tripped 700 s ago
    flapping = AdapterCondition("a", True, breaker(BreakerState.OPEN, opened=690, tripped=0))
    assert evaluate_safe_mode([flapping, AdapterCondition("b")], at(700), cfg).active


def test_extended_period_can_be_disabled() -> None:
    cfg = SafeModeConfig(max_open_seconds=None)
    conditions = [AdapterCondition("a", True, breaker(BreakerState.OPEN)), AdapterCondition("b")]
    assert not evaluate_safe_mode(conditions, at(10**6), cfg).active


def test_environment_problems_activate() -> None:
    mode = evaluate_safe_mode(
        [AdapterCondition("a", True)], T0, environment_problems=["git not found"]
    )
    assert mode.reasons == ("execution environment unavailable: git not found",)


def test_safe_mode_resumes_when_conditions_clear() -> None:
    down = [AdapterCondition("a", False)]
    up = [AdapterCondition("a", True)]
    first = evaluate_safe_mode(down, at(0))
    entered = safe_mode_change(None, first, at(0))
    assert entered is not None and entered.entered
    assert entered.event == "safe_mode_entered"
    assert entered.to_record()["reasons"] == list(first.reasons)
    assert safe_mode_change(first, evaluate_safe_mode(down, at(1)), at(1)) is None
    cleared = evaluate_safe_mode(up, at(2))
    left = safe_mode_change(first, cleared, at(2))
    assert left is not None and not left.entered and not cleared.active
    assert left.event == "safe_mode_left"
    assert left.to_record()["active"] is False
    assert safe_mode_change(None, cleared, at(3)) is None


# --------------------------------------------------------------------------- health probes

PROBE = HealthProbe(command=["aider", "--version"], timeout_seconds=5, interval_seconds=30)


def test_probe_runs_before_first_use_only_if_configured() -> None:
    assert probe_due(PROBE, None, BreakerState.CLOSED, T0)
    assert not probe_due(None, None, BreakerState.CLOSED, T0)


def test_probe_repeats_only_while_breaker_open_or_unhealthy() -> None:
    good = probe_result("a", checked_at=T0, duration_seconds=0.2, exit_code=0)
    bad = probe_result("a", checked_at=T0, duration_seconds=0.2, exit_code=1)
    assert not probe_due(PROBE, good, BreakerState.CLOSED, at(3600))
    assert not probe_due(PROBE, good, BreakerState.OPEN, at(29))
    assert probe_due(PROBE, good, BreakerState.OPEN, at(30))
    assert probe_due(PROBE, bad, BreakerState.CLOSED, at(30))
    assert not probe_due(PROBE, bad, BreakerState.CLOSED, at(10))


def test_probe_result_interpretation() -> None:
    ok = probe_result("a", checked_at=T0, duration_seconds=0.5, exit_code=0, output_tail="v1")
    assert ok.healthy and ok.message == "probe succeeded"
    failed = probe_result(
        "a",
        checked_at=T0,
        duration_seconds=0.5,
        exit_code=2,
        output_tail="line1\nauth error: invalid key\n",
    )
    assert (
        not failed.healthy and failed.message == "probe exited with code 2: auth error: invalid key"
    )
    assert not probe_result(
        "a", checked_at=T0, duration_seconds=5, exit_code=None, timed_out=True
    ).healthy
    missing = probe_result(
        "a", checked_at=T0, duration_seconds=0, exit_code=None, start_error="aider: not found"
    )
    assert "could not start" in missing.message
    assert missing.to_record()["healthy"] is False
    assert missing.event == "adapter_health_check"

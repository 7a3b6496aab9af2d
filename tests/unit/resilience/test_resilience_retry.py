"""Retry decisions, the backoff schedule, the adapter chain, gate feedback and the task budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.engine.resilience.budget import TaskBudget
from core.engine.resilience.classification import Classification
from core.engine.resilience.retry import (
    AdapterChain,
    AttemptOutcome,
    BackoffSchedule,
    decide_retry,
    first_adapter,
    gate_feedback,
)
from core.models import CheckResult, CheckStatus, FailureClass, GateResult, RetryPolicy

NO_JITTER = RetryPolicy(
    max_attempts=5,
    backoff_initial_seconds=1.0,
    backoff_multiplier=2.0,
    backoff_max_seconds=10.0,
    jitter_seconds=0.0,
)
CHAIN = AdapterChain.of("aider", ["claude", "codex"])


def failed(cls: FailureClass, adapter: str = "aider", attempt: int = 1) -> AttemptOutcome:
    return AttemptOutcome(attempt, adapter, Classification.failure(cls, f"{cls} happened"))


def history(*items: tuple[FailureClass, str]) -> list[AttemptOutcome]:
    return [failed(cls, adapter, i + 1) for i, (cls, adapter) in enumerate(items)]


# --------------------------------------------------------------------------- schedule


def test_backoff_is_exponential_and_capped_without_jitter() -> None:
    schedule = BackoffSchedule(NO_JITTER, random.Random(0))
    assert [schedule.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_is_bounded_and_reproducible() -> None:
    policy = NO_JITTER.model_copy(update={"jitter_seconds": 0.5})
    a = [BackoffSchedule(policy, random.Random(42)).delay(2) for _ in range(3)]
    b = [BackoffSchedule(policy, random.Random(42)).delay(2) for _ in range(3)]
    assert a == b
    assert all(2.0 <= d <= 2.5 for d in a)
    assert len({BackoffSchedule(policy, random.Random(s)).delay(1) for s in range(20)}) > 1


def test_cap_applies_after_jitter() -> None:
    policy = NO_JITTER.model_copy(update={"jitter_seconds": 100.0})
    schedule = BackoffSchedule(policy, random.Random(1))
    assert all(schedule.delay(n) <= 10.0 for n in range(1, 30))


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert BackoffSchedule(NO_JITTER, random.Random(0)).delay(10_000) == 10.0


def test_retry_number_starts_at_one() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        BackoffSchedule(NO_JITTER).delay(0)


@given(
    initial=st.floats(0, 100),
    multiplier=st.floats(1, 10),
    cap=st.floats(0, 1000),
    jitter=st.floats(0, 100),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 200),
)
def test_property_schedule_never_exceeds_cap(
    initial: float, multiplier: float, cap: float, jitter: float, seed: int, n: int
) -> None:
    policy = RetryPolicy(
        backoff_initial_seconds=initial,
        backoff_multiplier=multiplier,
        backoff_max_seconds=cap,
        jitter_seconds=jitter,
    )
    delay = BackoffSchedule(policy, random.Random(seed)).delay(n)
    assert 0.0 <= delay <= cap


@given(initial=st.floats(0, 100), multiplier=st.floats(1, 10), cap=st.floats(0, 1000))
def test_property_schedule_without_jitter_never_shrinks(
    initial: float, multiplier: float, cap: float
) -> None:
    policy = RetryPolicy(
        backoff_initial_seconds=initial,
        backoff_multiplier=multiplier,
        backoff_max_seconds=cap,
        jitter_seconds=0,
    )
    schedule = BackoffSchedule(policy, random.Random(0))
    delays = [schedule.delay(n) for n in range(1, 40)]
    assert delays == sorted(delays)


# --------------------------------------------------------------------------- chain


def test_chain_dedupes_and_orders() -> None:
    chain = AdapterChain.of("a", ["b", "a", "c", "b"])
    assert chain.adapter_ids == ("a", "b", "c")
    assert chain.primary == "a"
    assert chain.preference("b", switch=True) == ("c", "b", "a")
    assert chain.preference("b", switch=False) == ("b", "c", "a")
    assert chain.preference("zzz", switch=True) == ("a", "b", "c")


def test_chain_rejects_empty_and_duplicates() -> None:
    with pytest.raises(ValueError):
        AdapterChain(())
    with pytest.raises(ValueError):
        AdapterChain(("a", "a"))


def test_first_adapter_prefers_primary_then_fallback_then_waits() -> None:
    assert first_adapter(CHAIN, {}).adapter_id == "aider"
    chosen = first_adapter(CHAIN, {"aider": False})
    assert (chosen.adapter_id, chosen.waiting_for_breaker) == ("claude", False)
    blocked = first_adapter(CHAIN, {"aider": False, "claude": False, "codex": False})
    assert (blocked.adapter_id, blocked.waiting_for_breaker) == ("aider", True)
    assert "open" in blocked.reason


# --------------------------------------------------------------------------- decisions


def test_success_is_not_retried() -> None:
    ok = AttemptOutcome(1, "aider", Classification.success())
    d = decide_retry(NO_JITTER, CHAIN, [ok], remaining_seconds=1000)
    assert not d.retry and d.reason == "attempt succeeded"
    assert d.next_adapter_id is None and d.failure_class is None


def test_cancelled_is_never_retried_even_if_listed() -> None:
    policy = NO_JITTER.model_copy(update={"retry_on": list(FailureClass)})
    d = decide_retry(policy, CHAIN, [failed(FailureClass.CANCELLED)], remaining_seconds=1e6)
    assert not d.retry
    assert "cancelled" in d.reason


def test_infrastructure_retries_same_adapter() -> None:
    d = decide_retry(
        NO_JITTER,
        CHAIN,
        [failed(FailureClass.INFRASTRUCTURE)],
        remaining_seconds=1000,
        schedule=BackoffSchedule(NO_JITTER, random.Random(0)),
    )
    assert d.retry
    assert d.next_adapter_id == "aider"
    assert d.next_attempt == 2
    # at least infrastructure_backoff_seconds (default 10): a dependency may still be starting
    assert d.delay_seconds == 10.0
    assert "same adapter" in d.reason
    assert not d.include_gate_feedback


def test_infrastructure_backoff_floor_doubles_and_is_capped() -> None:
    policy = NO_JITTER.model_copy(
        update={"infrastructure_backoff_seconds": 4.0, "backoff_max_seconds": 10.0}
    )
    history = [failed(FailureClass.INFRASTRUCTURE)]
    delays = []
    for n in range(1, 4):
        attempts = [failed(FailureClass.INFRASTRUCTURE, attempt=i) for i in range(1, n + 1)]
        schedule = BackoffSchedule(policy, random.Random(0))
        d = decide_retry(policy, CHAIN, attempts, remaining_seconds=1000, schedule=schedule)
        delays.append(d.delay_seconds)
    assert delays == [4.0, 8.0, 10.0]
    off = NO_JITTER.model_copy(update={"infrastructure_backoff_seconds": 0.0})
    d = decide_retry(off, CHAIN, history, remaining_seconds=1000, schedule=BackoffSchedule(off))
    assert d.delay_seconds == 1.0


@pytest.mark.parametrize("cls", [FailureClass.ADAPTER_ERROR, FailureClass.ADAPTER_TIMEOUT])
def test_adapter_failures_move_to_next_fallback(cls: FailureClass) -> None:
    d = decide_retry(NO_JITTER, CHAIN, [failed(cls)], remaining_seconds=1000)
    assert d.retry and d.next_adapter_id == "claude"
    assert "fallback adapter claude" in d.reason
    d2 = decide_retry(
        NO_JITTER, CHAIN, history((cls, "aider"), (cls, "claude")), remaining_seconds=1000
    )
    assert d2.next_adapter_id == "codex" and d2.next_attempt == 3


def test_adapter_error_on_last_fallback_stays_there() -> None:
    hist = history(
        (FailureClass.ADAPTER_ERROR, "aider"),
        (FailureClass.ADAPTER_ERROR, "claude"),
        (FailureClass.ADAPTER_ERROR, "codex"),
    )
    d = decide_retry(NO_JITTER, CHAIN, hist, remaining_seconds=1000)
    assert d.retry and d.next_adapter_id == "codex"


def test_adapter_error_without_fallback_retries_same_adapter() -> None:
    solo = AdapterChain.of("aider")
    d = decide_retry(NO_JITTER, solo, [failed(FailureClass.ADAPTER_ERROR)], remaining_seconds=99)
    assert d.retry and d.next_adapter_id == "aider"


def test_gate_failed_is_not_retried_by_default() -> None:
    d = decide_retry(
        RetryPolicy(max_attempts=3),
        CHAIN,
        [failed(FailureClass.GATE_FAILED)],
        remaining_seconds=1000,
    )
    assert not d.retry
    assert "gate_failed is not retried" in d.reason


def test_gate_failed_retry_when_enabled_carries_feedback() -> None:
    policy = NO_JITTER.model_copy(
        update={"retry_on": [FailureClass.GATE_FAILED, FailureClass.INFRASTRUCTURE]}
    )
    d = decide_retry(policy, CHAIN, [failed(FailureClass.GATE_FAILED)], remaining_seconds=1000)
    assert d.retry and d.next_adapter_id == "aider"
    assert d.include_gate_feedback


def test_empty_diff_not_retried_by_default_and_switches_when_enabled() -> None:
    assert not decide_retry(
        NO_JITTER, CHAIN, [failed(FailureClass.EMPTY_DIFF)], remaining_seconds=1000
    ).retry
    policy = NO_JITTER.model_copy(update={"retry_on": [FailureClass.EMPTY_DIFF]})
    d = decide_retry(policy, CHAIN, [failed(FailureClass.EMPTY_DIFF)], remaining_seconds=1000)
    assert d.retry and d.next_adapter_id == "claude"


def test_max_attempts_counts_all_adapters_and_classes() -> None:
    policy = NO_JITTER.model_copy(update={"max_attempts": 3})
    hist = history(
        (FailureClass.INFRASTRUCTURE, "aider"),
        (FailureClass.ADAPTER_ERROR, "aider"),
        (FailureClass.INFRASTRUCTURE, "claude"),
    )
    d = decide_retry(policy, CHAIN, hist, remaining_seconds=1000)
    assert not d.retry
    assert "attempts exhausted (3 of max_attempts=3)" in d.reason


def test_default_policy_retries_infrastructure_up_to_three_attempts() -> None:
    policy = RetryPolicy()
    first = decide_retry(
        policy, CHAIN, [failed(FailureClass.INFRASTRUCTURE)], remaining_seconds=1000
    )
    assert first.retry and first.next_adapter_id == "aider"
    third = decide_retry(
        policy,
        CHAIN,
        [failed(FailureClass.INFRASTRUCTURE, attempt=n) for n in (1, 2, 3)],
        remaining_seconds=1000,
    )
    assert not third.retry and "attempts exhausted (3 of max_attempts=3)" in third.reason


def test_no_retry_when_backoff_would_eat_the_budget() -> None:
    hist = history((FailureClass.ADAPTER_ERROR, "aider"), (FailureClass.ADAPTER_ERROR, "claude"))
    d = decide_retry(NO_JITTER, CHAIN, hist, remaining_seconds=2.0)  # delay would be 2.0
    assert not d.retry
    assert "budget exhausted" in d.reason
    d2 = decide_retry(NO_JITTER, CHAIN, hist, remaining_seconds=2.5)  # leaves 0.5 < 1.0 minimum
    assert not d2.retry
    d3 = decide_retry(NO_JITTER, CHAIN, hist, remaining_seconds=2.5, min_attempt_seconds=0.1)
    assert d3.retry and d3.delay_seconds == 2.0


def test_no_retry_with_zero_budget_even_without_delay() -> None:
    policy = NO_JITTER.model_copy(update={"backoff_initial_seconds": 0.0})
    d = decide_retry(
        policy,
        CHAIN,
        [failed(FailureClass.INFRASTRUCTURE)],
        remaining_seconds=0.0,
        min_attempt_seconds=0.0,
    )
    assert not d.retry


def test_fallback_with_open_breaker_is_skipped() -> None:
    d = decide_retry(
        NO_JITTER,
        CHAIN,
        [failed(FailureClass.ADAPTER_ERROR)],
        remaining_seconds=1000,
        admits={"claude": False},
    )
    assert d.retry and d.next_adapter_id == "codex" and not d.waiting_for_breaker


def test_infrastructure_on_open_adapter_moves_on() -> None:
    d = decide_retry(
        NO_JITTER,
        CHAIN,
        [failed(FailureClass.INFRASTRUCTURE)],
        remaining_seconds=1000,
        admits={"aider": False},
    )
    assert d.next_adapter_id == "claude" and not d.waiting_for_breaker


def test_every_breaker_open_means_wait_not_spin() -> None:
    d = decide_retry(
        NO_JITTER,
        CHAIN,
        [failed(FailureClass.ADAPTER_ERROR)],
        remaining_seconds=1000,
        admits={"aider": False, "claude": False, "codex": False},
    )
    assert d.retry and d.waiting_for_breaker
    assert d.next_adapter_id == "claude"
    assert "waiting" in d.reason
    assert d.alternatives == ("codex", "aider")


def test_empty_history_is_a_bug() -> None:
    with pytest.raises(ValueError):
        decide_retry(NO_JITTER, CHAIN, [], remaining_seconds=10)


classes = st.sampled_from([*FailureClass, None])


@given(
    outcomes=st.lists(classes, min_size=1, max_size=30),
    max_attempts=st.integers(1, 20),
    budget=st.floats(0, 500),
    durations=st.lists(st.floats(0, 60), min_size=30, max_size=30),
    jitter=st.floats(0, 5),
    seed=st.integers(0, 1000),
    admits=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.booleans()),
    retry_on=st.lists(st.sampled_from(list(FailureClass)), unique=True),
)
def test_property_attempt_loop_respects_max_attempts_and_budget(
    outcomes: list[FailureClass | None],
    max_attempts: int,
    budget: float,
    durations: list[float],
    jitter: float,
    seed: int,
    admits: dict[str, bool],
    retry_on: list[FailureClass],
) -> None:
    """Drive a whole task through decide_retry with a fake clock, as the executor will."""
    policy = RetryPolicy(
        max_attempts=max_attempts,
        backoff_initial_seconds=0.5,
        backoff_multiplier=3,
        backoff_max_seconds=20,
        jitter_seconds=jitter,
        retry_on=retry_on,
    )
    chain = AdapterChain.of("a", ["b", "c"])
    now = [0.0]
    task_budget = TaskBudget.start(max(budget, 0.001), clock=lambda: now[0])
    schedule = BackoffSchedule(policy, random.Random(seed))
    adapter = first_adapter(chain, admits).adapter_id
    hist: list[AttemptOutcome] = []
    for i, cls in enumerate(outcomes):
        timeout = task_budget.attempt_timeout(30.0)
        assert timeout <= task_budget.remaining()
        now[0] += min(durations[i], timeout)  # an attempt never outlives its timeout
        result = Classification.success() if cls is None else Classification.failure(cls, "x")
        hist.append(AttemptOutcome(len(hist) + 1, adapter, result))
        d = decide_retry(
            policy,
            chain,
            hist,
            remaining_seconds=task_budget.remaining(),
            admits=admits,
            schedule=schedule,
        )
        if not d.retry:
            break
        assert d.next_attempt == len(hist) + 1
        assert d.next_adapter_id in chain.adapter_ids
        assert 0 <= d.delay_seconds <= policy.backoff_max_seconds
        assert d.delay_seconds + 1.0 <= task_budget.remaining()
        now[0] += d.delay_seconds
        adapter = d.next_adapter_id
    assert len(hist) <= max_attempts
    assert now[0] <= max(budget, 0.001) + 1e-9  # attempts plus backoff stay inside the budget


# --------------------------------------------------------------------------- gate feedback


def _gate(*checks: CheckResult, applied: bool = True) -> GateResult:
    return GateResult(passed=False, applied=applied, checks=list(checks))


def _check(name: str, status: CheckStatus, tail: str = "", code: int | None = 1) -> CheckResult:
    return CheckResult(
        name=name, status=status, exit_code=code, duration_seconds=1.0, output_tail=tail
    )


def test_gate_feedback_names_failed_checks_with_output() -> None:
    text = gate_feedback(
        _gate(
            _check("ruff", CheckStatus.FAILED, "E501 line too long"),
            _check("pytest", CheckStatus.TIMEOUT, "", None),
            _check("mypy", CheckStatus.PASSED, "fine", 0),
            _check("imports", CheckStatus.PRE_EXISTING, "old failure"),
        )
    )
    assert "check 'ruff': failed, exit code 1" in text
    assert "check 'pytest': timeout" in text
    assert "E501 line too long" in text
    assert "mypy" not in text and "old failure" not in text


def test_gate_feedback_reports_unapplied_diff() -> None:
    assert "did not apply" in gate_feedback(_gate(applied=False))


def test_gate_feedback_is_bounded_and_keeps_the_end_of_output() -> None:
    long_tail = "noise\n" * 2000 + "AssertionError: expected 3"
    text = gate_feedback(_gate(_check("unit", CheckStatus.FAILED, long_tail)), max_chars=500)
    assert len(text) <= 500
    assert "check 'unit'" in text
    assert text.endswith("AssertionError: expected 3")


# --------------------------------------------------------------------------- budget


def test_budget_counts_down_and_never_goes_negative() -> None:
    now = [100.0]
    budget = TaskBudget.start(60, clock=lambda: now[0])
    assert budget.remaining() == 60
    now[0] += 45
    assert budget.remaining() == 15
    assert budget.spent() == 45
    assert budget.attempt_timeout(1800) == 15
    assert budget.attempt_timeout(10) == 10
    assert budget.attempt_timeout() == 15
    now[0] += 100
    assert budget.remaining() == 0.0
    assert budget.expired
    assert budget.spent() == 60


def test_budget_resume_after_restart() -> None:
    budget = TaskBudget.resume(600, spent_seconds=550, clock=lambda: 5.0)
    assert budget.remaining() == 50
    assert TaskBudget.resume(600, spent_seconds=-3, clock=lambda: 5.0).remaining() == 600
    assert TaskBudget.resume(600, spent_seconds=900, clock=lambda: 5.0).expired


@pytest.mark.parametrize("total", [0, -1, float("inf"), float("nan")])
def test_budget_must_be_positive_and_finite(total: float) -> None:
    with pytest.raises(ValueError):
        TaskBudget.start(total)

"""The resilience API wired into a reference attempt loop (what the executor does, minus I/O).

Fake adapters return evidence; clocks are fake; nothing sleeps. The scenarios are the issue's
integration scenarios at unit level: a flaky adapter completes on attempt 3, an always-failing
adapter opens its breaker and later tasks go to the fallback, throttling retries without
feeding the breaker, and an all-open chain parks the task instead of spinning.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.engine.resilience import (
    AdapterChain,
    AttemptOutcome,
    BackoffSchedule,
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CircuitBreakers,
    Classification,
    FailureEvidence,
    InMemoryBreakerStore,
    TaskBudget,
    classify,
    decide_retry,
    first_adapter,
)
from core.engine.resilience.plugins.builtin import BUILTIN_DETECTOR
from core.models import FailureClass, RetryPolicy

Adapter = Callable[[int], FailureEvidence]  # attempt number -> evidence
OK = FailureEvidence(exit_code=0, diff_empty=False, gate_passed=True)
CRASH = FailureEvidence(
    exit_code=1,
    output_tail="Traceback (most recent call last):\n"
    '  File "x", line 1\nRuntimeError: tool broke\n',
)


@dataclass
class World:
    """Fake time shared by the monotonic and the wall clock."""

    t: float = 0.0
    transitions: list[BreakerTransition] = field(default_factory=list)

    def mono(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=self.t)


@dataclass
class TaskRun:
    outcome: str  # COMPLETED / FAILED / PENDING
    history: list[AttemptOutcome]
    reason: str = ""


def run_task(
    world: World,
    breakers: CircuitBreakers,
    adapters: dict[str, Adapter],
    chain: AdapterChain,
    policy: RetryPolicy,
    budget_seconds: float = 3600,
    attempt_seconds: float = 10,
) -> TaskRun:
    """The executor's attempt loop, using only the public resilience API."""
    budget = TaskBudget.start(budget_seconds, clock=world.mono)
    schedule = BackoffSchedule(policy, random.Random(0))
    history: list[AttemptOutcome] = []
    selection = first_adapter(chain, breakers.admits_map(chain.adapter_ids))
    if selection.waiting_for_breaker:
        return TaskRun("PENDING", history, selection.reason)
    adapter_id = selection.adapter_id
    while True:
        admission = breakers.acquire(adapter_id)
        if not admission.admitted:
            return TaskRun("PENDING", history, admission.reason)
        timeout = budget.attempt_timeout(600)
        evidence = adapters[adapter_id](len(history) + 1)
        world.t += min(attempt_seconds, timeout)
        result = classify(evidence, detectors=[BUILTIN_DETECTOR])
        breakers.record(adapter_id, result, trial=admission.trial)
        history.append(AttemptOutcome(len(history) + 1, adapter_id, result))
        decision = decide_retry(
            policy,
            chain,
            history,
            remaining_seconds=budget.remaining(),
            admits=breakers.admits_map(chain.adapter_ids),
            schedule=schedule,
        )
        if not decision.retry:
            return TaskRun("COMPLETED" if result.succeeded else "FAILED", history, decision.reason)
        if decision.waiting_for_breaker:
            return TaskRun("PENDING", history, decision.reason)
        world.t += decision.delay_seconds  # the executor waits here (interruptibly)
        assert decision.next_adapter_id is not None
        adapter_id = decision.next_adapter_id


def make_breakers(world: World, threshold: int = 3) -> CircuitBreakers:
    cfg = BreakerConfig(failure_threshold=threshold, cooldown_seconds=300)
    return CircuitBreakers(
        InMemoryBreakerStore(), lambda _: cfg, world.wall, world.transitions.append
    )


POLICY = RetryPolicy(max_attempts=3, backoff_initial_seconds=2, jitter_seconds=1)


def test_flaky_adapter_completes_on_attempt_three() -> None:
    world = World()
    flaky: Adapter = lambda n: OK if n == 3 else CRASH  # noqa: E731
    run = run_task(world, make_breakers(world), {"flaky": flaky}, AdapterChain.of("flaky"), POLICY)
    assert run.outcome == "COMPLETED"
    assert [h.attempt for h in run.history] == [1, 2, 3]
    assert "RuntimeError: tool broke" in run.history[0].classification.message
    assert world.transitions == []  # 2 failures < threshold 3, then success reset


def test_always_failing_adapter_trips_and_fallback_takes_over() -> None:
    world = World()
    breakers = make_breakers(world, threshold=3)
    adapters: dict[str, Adapter] = {"broken": lambda n: CRASH, "backup": lambda n: OK}
    chain = AdapterChain.of("broken", ["backup"])
    runs = [run_task(world, breakers, adapters, chain, POLICY) for _ in range(6)]
    assert all(r.outcome == "COMPLETED" for r in runs)
    used = [[h.adapter_id for h in r.history] for r in runs]
    assert used[:3] == [["broken", "backup"]] * 3
    assert used[3:] == [["backup"]] * 3  # breaker open: straight to the fallback
    assert [(t.adapter_id, t.to_state) for t in world.transitions] == [
        ("broken", BreakerState.OPEN)
    ]
    assert breakers.view("backup").state is BreakerState.CLOSED


def test_breaker_half_opens_and_a_successful_trial_closes_it() -> None:
    world = World()
    breakers = make_breakers(world, threshold=1)
    healthy = [False]
    adapters: dict[str, Adapter] = {"a": lambda n: OK if healthy[0] else CRASH}
    chain = AdapterChain.of("a")
    assert run_task(world, breakers, adapters, chain, RetryPolicy(max_attempts=1)).outcome == "FAILED"
    parked = run_task(world, breakers, adapters, chain, RetryPolicy(max_attempts=1))
    assert parked.outcome == "PENDING" and "open" in parked.reason and parked.history == []
    world.t += 300
    healthy[0] = True
    assert run_task(world, breakers, adapters, chain, RetryPolicy(max_attempts=1)).outcome == "COMPLETED"
    assert [t.to_state for t in world.transitions] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_throttling_retries_same_adapter_without_feeding_breaker() -> None:
    world = World()
    breakers = make_breakers(world, threshold=1)
    throttled = FailureEvidence(exit_code=1, output_tail="Error: 429 Too Many Requests")
    adapters: dict[str, Adapter] = {
        "a": lambda n: OK if n == 3 else throttled,
        "b": lambda n: OK,
    }
    run = run_task(world, breakers, adapters, AdapterChain.of("a", ["b"]), POLICY)
    assert run.outcome == "COMPLETED"
    assert [h.adapter_id for h in run.history] == ["a", "a", "a"]
    assert run.history[0].classification.failure_class is FailureClass.INFRASTRUCTURE
    assert world.transitions == []


def test_budget_stops_retries_before_it_runs_out() -> None:
    world = World()
    policy = RetryPolicy(max_attempts=10, backoff_initial_seconds=5, jitter_seconds=0)
    run = run_task(
        world,
        make_breakers(world, threshold=100),
        {"a": lambda n: CRASH},
        AdapterChain.of("a"),
        policy,
        budget_seconds=60,
        attempt_seconds=10,
    )
    assert run.outcome == "FAILED"
    assert "budget exhausted" in run.reason
    assert world.t <= 60
    assert len(run.history) < 10


def test_gate_failure_is_final_by_default() -> None:
    world = World()
    gate_fail = FailureEvidence(
        exit_code=0, diff_empty=False, gate_passed=False, gate_failed_checks=("pytest",)
    )
    run = run_task(
        world, make_breakers(world), {"a": lambda n: gate_fail}, AdapterChain.of("a", ["b"]), POLICY
    )
    assert run.outcome == "FAILED" and len(run.history) == 1
    assert run.history[0].classification == Classification.failure(
        FailureClass.GATE_FAILED, "test gate failed: pytest"
    )

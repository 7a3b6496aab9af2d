"""The work queue of the control loop (core/kube/workqueue.py): client-go's guarantees.

Time is a FakeClock that the tests advance; nothing sleeps for real.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import QueueShutDownError
from core.kube.workqueue import (
    ItemExponentialBackoff,
    Later,
    MaxOf,
    Priority,
    TokenBucket,
    WorkQueue,
    default_rate_limiter,
    run_workers,
)
from core.testing.clock import FakeClock


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def queue_on(clock: FakeClock, **kwargs: Any) -> WorkQueue[str]:
    return WorkQueue(ItemExponentialBackoff(1.0, 60.0), clock=clock, **kwargs)


# --- the queue ---------------------------------------------------------------------------


def test_a_queued_key_is_queued_once() -> None:
    async def scenario() -> None:
        q = queue_on(FakeClock())
        for key in ("a", "b", "a", "a", "b", "c"):
            q.add(key)
        assert len(q) == 3
        assert [await q.get() for _ in range(3)] == ["a", "b", "c"]
        assert len(q) == 0

    run(scenario)


def test_a_key_being_processed_is_not_handed_to_a_second_worker() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        q.add("a")
        first = await q.get()
        q.add("a")  # dirty: added again while a worker holds it
        q.add("a")
        assert len(q) == 0
        second = asyncio.create_task(q.get())
        await clock.settle()
        assert not second.done(), "a second worker got a key that is being processed"
        q.done(first)
        await clock.settle()
        assert second.done() and second.result() == "a"
        q.done("a")
        assert len(q) == 0, "two adds during processing must requeue the key once"

    run(scenario)


def test_done_without_a_new_add_does_not_requeue_and_done_is_idempotent() -> None:
    async def scenario() -> None:
        q = queue_on(FakeClock())
        q.add("a")
        key = await q.get()
        q.done(key)
        q.done(key)
        q.done("never-seen")
        assert len(q) == 0
        q.add("a")
        assert len(q) == 1

    run(scenario)


def test_getters_wait_without_polling_and_each_key_wakes_one() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        getters = [asyncio.create_task(q.get()) for _ in range(3)]
        await clock.settle()
        assert not any(g.done() for g in getters)
        q.add("a")
        q.add("b")
        await clock.settle()
        assert sorted(g.result() for g in getters if g.done()) == ["a", "b"]
        assert sum(not g.done() for g in getters) == 1
        q.shutdown()
        await clock.settle()
        last = next(g for g in getters if g.exception() is not None)
        assert isinstance(last.exception(), QueueShutDownError)

    run(scenario)


def test_a_cancelled_getter_passes_its_key_on() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        first = asyncio.create_task(q.get())
        second = asyncio.create_task(q.get())
        await clock.settle()
        q.add("a")  # wakes `first` ...
        first.cancel()  # ... which is cancelled before it runs
        await clock.settle()
        assert first.cancelled()
        assert second.done() and second.result() == "a"

    run(scenario)


# --- lanes: HIGH work first, LOW work when HIGH work pauses -------------------------------


def test_low_keys_are_handed_out_after_every_ready_high_key() -> None:
    async def scenario() -> None:
        q = queue_on(FakeClock())
        q.add("poll-1", Priority.LOW)
        q.add("new-1")
        q.add("poll-2", Priority.LOW)
        q.add("new-2", Priority.HIGH)
        assert q.ready(Priority.HIGH) == 2 and q.ready(Priority.LOW) == 2 and len(q) == 4
        assert [await q.get() for _ in range(4)] == ["new-1", "new-2", "poll-1", "poll-2"]

    run(scenario)


def test_a_low_key_asked_for_at_high_priority_is_promoted_once() -> None:
    async def scenario() -> None:
        q = queue_on(FakeClock())
        q.add("a", Priority.LOW)
        q.add("b", Priority.LOW)
        q.add("b", Priority.HIGH)  # e.g. its Job finished while a poll of it waited
        q.add("b", Priority.LOW)  # a lower ask never demotes
        assert len(q) == 2
        assert [await q.get() for _ in range(2)] == ["b", "a"]
        assert len(q) == 0

    run(scenario)


def test_a_key_re_added_while_processing_keeps_the_highest_priority_asked() -> None:
    async def scenario() -> None:
        q = queue_on(FakeClock())
        q.add("a")
        key = await q.get()
        q.add("a", Priority.LOW)
        q.add("a", Priority.HIGH)
        q.add("z", Priority.LOW)
        q.done(key)
        assert [await q.get() for _ in range(2)] == ["a", "z"]

    run(scenario)


def test_with_defer_quiet_low_keys_wait_while_high_keys_keep_coming() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock, defer_quiet=0.5, defer_max=10.0)
        got: list[tuple[float, str]] = []
        start = clock.now()

        async def worker() -> None:
            while True:
                key = await q.get()
                got.append((clock.now() - start, key))
                q.done(key)

        task = asyncio.create_task(worker())
        q.add("status-0", Priority.LOW)
        for i in range(4):  # a burst: a HIGH key every 0.2 s
            q.add(f"new-{i}")
            await clock.run_for(0.2, step=0.1)
        await clock.run_for(1.0, step=0.1)
        lows = [t for t, k in got if k.startswith("status")]
        highs = [t for t, k in got if k.startswith("new")]
        assert [k for _, k in got] == ["new-0", "new-1", "new-2", "new-3", "status-0"]
        # released 0.5 s after the last HIGH key arrived (at 0.6 s), not before
        assert highs[-1] == pytest.approx(0.6) and lows == [pytest.approx(1.1)]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario)


def test_a_held_low_key_is_served_after_defer_max_even_if_the_burst_goes_on() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock, defer_quiet=1.0, defer_max=3.0)
        got: list[tuple[float, str]] = []
        start = clock.now()

        async def worker() -> None:
            while True:
                key = await q.get()
                got.append((clock.now() - start, key))
                q.done(key)

        task = asyncio.create_task(worker())
        q.add("status", Priority.LOW)
        for i in range(20):  # HIGH work never pauses for 1 s
            q.add(f"new-{i}")
            await clock.run_for(0.25, step=0.25)
        low = [t for t, k in got if k == "status"]
        assert low == [pytest.approx(3.0)], got
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario)


def test_shutdown_hands_out_held_low_keys() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock, defer_quiet=5.0)
        q.add("new")
        q.add("status", Priority.LOW)
        assert await q.get() == "new"
        waiting = asyncio.create_task(q.get())
        await clock.settle()
        assert not waiting.done(), "held back while HIGH work was just added"
        q.shutdown()
        await clock.settle()
        assert waiting.result() == "status"
        with pytest.raises(QueueShutDownError):
            await q.get()

    run(scenario)


def test_add_after_keeps_the_higher_priority_of_two_asks() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        q.add_after("a", 5.0, Priority.LOW)
        q.add_after("a", 8.0, Priority.HIGH)  # later, but HIGH: the due time stays 5 s
        q.add_after("b", 2.0, Priority.LOW)
        await clock.run_for(5.0, step=1.0)
        assert q.ready(Priority.HIGH) == 1 and q.ready(Priority.LOW) == 1
        assert [await q.get() for _ in range(2)] == ["a", "b"]

    run(scenario)


def test_a_handler_answering_later_is_requeued_in_the_low_lane() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        seen: list[str] = []

        async def handler(key: str) -> float | Later | None:
            seen.append(key)
            if key == "started" and seen.count(key) == 1:
                q.add("x")  # watch events arriving while the Job is created
                q.add("y")
                return Later(0.0)  # the status follows when nothing more urgent waits
            return None

        q.add("started")
        workers = asyncio.create_task(run_workers(q, handler, concurrency=1))
        await clock.run_for(1, step=0.5)
        assert seen == ["started", "x", "y", "started"]
        q.shutdown()
        await workers

    run(scenario)


# --- delayed adds ------------------------------------------------------------------------


def test_add_after_is_due_at_the_earliest_time_asked_for_the_key() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        q.add_after("a", 10)
        q.add_after("a", 5)
        q.add_after("a", 7)  # later than the pending 5: does not postpone it
        assert q.delayed() == 1 and len(q) == 0
        clock.advance(4.9)
        await clock.settle()
        assert len(q) == 0
        clock.advance(0.1)
        await clock.settle()
        assert len(q) == 1 and q.delayed() == 0
        q.done(await q.get())
        clock.advance(60)  # the superseded 7 s and 10 s entries never fire
        await clock.settle()
        assert len(q) == 0

    run(scenario)


def test_delayed_keys_share_one_timer() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        for n in range(200):
            q.add_after(f"k{n}", 100 + n)
        await clock.settle()
        assert clock.sleeping() == 1 and clock.next_wake() == clock.now() + 100
        q.add_after("early", 3)  # re-arms the one timer for the earlier time
        await clock.settle()
        assert clock.sleeping() == 1 and clock.next_wake() == clock.now() + 3
        clock.advance(3)
        await clock.settle()
        assert await q.get() == "early"
        clock.advance(100 + 199)
        await clock.settle()
        assert len(q) == 200 and q.delayed() == 0 and clock.sleeping() == 0

    run(scenario)


def test_add_after_zero_adds_now_and_does_not_hold_back_an_immediate_add() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        q.add_after("now", 0)
        q.add_after("a", 30)
        q.add("a")  # an event for `a` is handled now, and again when its timer is due
        assert [await q.get(), await q.get()] == ["now", "a"]
        q.done("now")
        q.done("a")
        clock.advance(30)
        await clock.settle()
        assert await q.get() == "a"

    run(scenario)


# --- rate limiters -----------------------------------------------------------------------


def test_item_exponential_backoff_doubles_per_failure_up_to_the_cap() -> None:
    limiter: ItemExponentialBackoff[str] = ItemExponentialBackoff(0.005, 1.0)
    delays = [limiter.when("a") for _ in range(10)]
    assert delays == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0]
    assert limiter.num_requeues("a") == 10
    assert limiter.when("b") == 0.005, "failures are counted per key"
    limiter.forget("a")
    assert limiter.num_requeues("a") == 0 and limiter.when("a") == 0.005
    for _ in range(5000):  # 2**5000 overflows a float: still the cap
        last = limiter.when("c")
    assert last == 1.0
    with pytest.raises(ValueError):
        ItemExponentialBackoff(2.0, 1.0)


def test_token_bucket_allows_a_burst_then_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    assert [bucket.when(k) for k in "abcde"] == pytest.approx([0, 0, 0, 0.1, 0.2])
    clock.advance(0.2)  # pays the debt of two tokens: the bucket is empty, not in debt
    assert bucket.when("f") == pytest.approx(0.1)
    clock.advance(3600)  # refills to the burst, never beyond
    assert [bucket.when(k) for k in "ghij"] == pytest.approx([0, 0, 0, 0.1])
    assert bucket.num_requeues("a") == 0


def test_default_limiter_is_the_max_of_per_key_backoff_and_the_bucket() -> None:
    clock = FakeClock()
    limiter = default_rate_limiter(clock)
    first = [limiter.when(f"k{n}") for n in range(100)]
    assert first == [0.005] * 100, "100 first failures: the burst covers them, 5 ms each"
    assert limiter.when("k100") == pytest.approx(0.1), "the 101st waits for the bucket (10/s)"
    clock.advance(3600)
    one_key = [limiter.when("x") for _ in range(20)]
    assert one_key[:3] == [0.005, 0.01, 0.02]
    assert one_key[17] == pytest.approx(0.005 * 2**17) and one_key[18:] == [1000.0, 1000.0]
    assert limiter.num_requeues("x") == 20
    limiter.forget("x")
    assert limiter.num_requeues("x") == 0
    with pytest.raises(ValueError):
        MaxOf()


def test_add_rate_limited_forget_and_num_requeues_on_the_queue() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)  # 1 s doubling, cap 60 s
        assert [q.add_rate_limited("a") for _ in range(3)] == [1.0, 2.0, 4.0]
        assert q.num_requeues("a") == 3 and q.delayed() == 1
        clock.advance(1)  # the earliest of the three is the one that counts
        await clock.settle()
        assert await q.get() == "a"
        q.forget("a")
        q.done("a")
        assert q.num_requeues("a") == 0 and q.add_rate_limited("a") == 1.0

    run(scenario)


def test_defaults_are_client_gos_on_the_real_clock() -> None:
    async def scenario() -> None:
        q: WorkQueue[tuple[str, str]] = WorkQueue()
        key = ("default", "te-1")
        assert q.add_rate_limited(key) == 0.005 and q.add_rate_limited(key) == 0.01
        assert q.num_requeues(key) == 2 and q.delayed() == 1 and len(q) == 0
        q.shutdown()  # cancels the timer: nothing sleeps
        assert q.delayed() == 0

    run(scenario)


# --- shutdown ----------------------------------------------------------------------------


def test_shutdown_ignores_adds_drops_delayed_keys_and_hands_out_what_is_queued() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        q.add("queued")
        q.add_after("delayed", 5)
        q.shutdown()
        assert q.shutting_down
        q.add("late")
        q.add_after("late", 1)
        assert q.add_rate_limited("late") == 0.0
        assert len(q) == 1 and q.delayed() == 0
        assert await q.get() == "queued"
        clock.advance(10)
        await clock.settle()
        with pytest.raises(QueueShutDownError):
            await q.get()

    run(scenario)


def test_shutdown_with_drain_waits_for_keys_in_progress() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        q.add("a")
        q.add("b")
        a, b = await q.get(), await q.get()
        q.add("a")  # dirty: handed out once more after `done`, even while draining
        drain = asyncio.create_task(q.shutdown_with_drain())
        await clock.settle()
        assert not drain.done()
        q.done(a)
        assert await q.get() == "a"
        q.done(b)
        await clock.settle()
        assert not drain.done(), "the requeued `a` is still in progress"
        q.done("a")
        await clock.settle()
        assert drain.done()
        with pytest.raises(QueueShutDownError):
            await q.get()

    run(scenario)


def test_a_second_shutdown_ends_a_drain_that_waits() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        q.add("stuck")
        await q.get()
        drain = asyncio.create_task(q.shutdown_with_drain())
        await clock.settle()
        assert not drain.done()
        q.shutdown()
        await clock.settle()
        assert drain.done()

    run(scenario)


# --- metrics -----------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.adds = 0
        self.depths: list[int] = []
        self.latencies: list[float] = []
        self.durations: list[float] = []
        self.retries = 0

    def added(self) -> None:
        self.adds += 1

    def depth(self, keys: int) -> None:
        self.depths.append(keys)

    def queued(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def worked(self, seconds: float) -> None:
        self.durations.append(seconds)

    def retried(self) -> None:
        self.retries += 1


def test_metrics_hooks_see_adds_depth_latency_work_and_retries() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        rec = Recorder()
        q = queue_on(clock, metrics=rec)
        q.add("a")
        q.add("a")
        q.add("b")
        clock.advance(2)
        a = await q.get()
        q.add("a")  # dirty while processing: counts in depth, as in client-go
        clock.advance(3)
        assert q.longest_running_seconds() == 3 and q.unfinished_work_seconds() == 3
        b = await q.get()
        clock.advance(1)
        assert q.longest_running_seconds() == 4 and q.unfinished_work_seconds() == 5
        q.done(a)
        q.done(b)
        q.add_after("c", 1)
        q.add_rate_limited("c")
        assert rec.adds == 3
        assert rec.depths == [1, 2, 1, 2, 1]
        assert rec.latencies == [2, 5]
        assert rec.durations == [4, 1]
        assert rec.retries == 2
        assert q.longest_running_seconds() == 0 and q.unfinished_work_seconds() == 0

    run(scenario)


# --- the workers -------------------------------------------------------------------------


def test_an_always_failing_key_backs_off_to_its_cap_and_never_starves_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q: WorkQueue[str] = WorkQueue(ItemExponentialBackoff(1.0, 16.0), clock=clock)
        bad_runs: list[float] = []
        good: list[tuple[str, float]] = []

        async def handler(key: str) -> float | None:
            if key == "bad":
                bad_runs.append(clock.now())
                raise RuntimeError("this object can never be reconciled")
            good.append((key, clock.now()))
            await clock.sleep(1)
            return None

        workers = asyncio.create_task(run_workers(q, handler, concurrency=1))
        added: dict[str, float] = {}
        for key in ["bad"] + [f"good{n}" for n in range(5)]:
            added[key] = clock.now()
            q.add(key)
        await clock.run_for(200, step=0.5)
        for n in range(5, 10):  # keys that arrive while `bad` is in deep backoff
            added[f"good{n}"] = clock.now()
            q.add(f"good{n}")
        await clock.run_for(20, step=0.5)
        q.shutdown()
        await clock.settle()
        await workers

        assert sorted(key for key, _ in good) == [f"good{n}" for n in range(10)]
        # One worker: a good key waits at most for the other good keys (1 s each).
        assert all(at - added[key] <= 5.0 for key, at in good)
        gaps = [b - a for a, b in itertools.pairwise(bad_runs)]
        backoff = [min(2.0**n, 16.0) for n in range(len(gaps))]
        assert all(gap >= wait for gap, wait in zip(gaps, backoff, strict=True))
        assert all(gap <= wait + 5.0 for gap, wait in zip(gaps, backoff, strict=True))
        assert gaps[-3:] == [16.0, 16.0, 16.0], "alone, it retries exactly at its cap"
        assert q.num_requeues("bad") == len(bad_runs)
        failures = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failures) == len(bad_runs) and all(r.exc_info for r in failures)

    with caplog.at_level(logging.ERROR, logger="orchestrator.workqueue"):
        run(scenario)


def test_a_failure_is_retried_until_success_which_resets_the_backoff() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)  # 1 s doubling
        runs: list[float] = []

        async def handler(key: str) -> float | None:
            runs.append(clock.now())
            if len(runs) <= 2:
                raise ConnectionError("500 from the API server")
            return None

        workers = asyncio.create_task(run_workers(q, handler, concurrency=2))
        start = clock.now()
        q.add("a")
        await clock.run_for(10, step=0.5)
        assert [t - start for t in runs] == [0.0, 1.0, 3.0]
        assert q.num_requeues("a") == 0 and q.delayed() == 0 and len(q) == 0
        q.shutdown()
        await workers

    run(scenario)


def test_a_handler_asks_to_look_again_later() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        runs: list[float] = []

        async def handler(key: str) -> float | None:
            runs.append(clock.now())
            return 30.0 if len(runs) < 3 else None  # e.g. the Job is still running

        workers = asyncio.create_task(run_workers(q, handler, concurrency=1))
        start = clock.now()
        q.add("job")
        await clock.run_for(100, step=1)
        assert [t - start for t in runs] == [0, 30, 60]
        assert q.num_requeues("job") == 0
        q.shutdown()
        await workers

    run(scenario)


def test_workers_are_bounded_and_never_share_a_key() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        active: set[str] = set()
        most = 0
        runs: dict[str, int] = {}
        overlaps: list[str] = []

        async def handler(key: str) -> float | None:
            nonlocal most
            if key in active:  # recorded: an assert here would be caught as a handler error
                overlaps.append(key)
            active.add(key)
            most = max(most, len(active))
            runs[key] = runs.get(key, 0) + 1
            await clock.sleep(2)
            active.discard(key)
            return None

        workers = asyncio.create_task(run_workers(q, handler, concurrency=3))
        for n in range(10):
            q.add(f"k{n}")
        await clock.settle()
        for _ in range(5):  # events for k0 keep coming while it is processed
            q.add("k0")
            await clock.run_for(1, step=1)
        await clock.run_for(20, step=1)
        q.shutdown()
        await workers
        assert overlaps == [], "a key was processed by two workers at once"
        assert most == 3
        assert runs["k0"] >= 2 and all(runs[f"k{n}"] == 1 for n in range(1, 10))

    run(scenario)


def test_workers_yield_the_loop_between_keys() -> None:
    """Handlers that never await (caught-up objects) must not starve a lease renewal."""

    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        log: list[str] = []

        async def handler(key: str) -> float | None:
            log.append(key)
            return None

        async def renew_lease() -> None:
            log.append("lease")

        for n in range(100):
            q.add(f"k{n}")
        workers = asyncio.create_task(run_workers(q, handler, concurrency=2))
        await asyncio.sleep(0)
        renewal = asyncio.create_task(renew_lease())
        await clock.settle(rounds=200)
        assert renewal.done() and len(log) == 101
        assert log.index("lease") < 10, "the workers held the event loop"
        q.shutdown()
        await workers

    run(scenario)


def test_cancelling_the_workers_keeps_the_keys_in_progress() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        started = asyncio.Event()

        async def handler(key: str) -> float | None:
            started.set()
            await clock.sleep(3600)
            return None

        workers = asyncio.create_task(run_workers(q, handler, concurrency=1))
        q.add("a")
        await started.wait()
        workers.cancel()
        with pytest.raises(asyncio.CancelledError):
            await workers
        assert len(q) == 1 and await q.get() == "a"

    run(scenario)


def test_a_cancelled_error_escaping_a_handler_is_a_failure_not_a_stop() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        runs = 0

        async def handler(key: str) -> float | None:
            nonlocal runs
            runs += 1
            if runs == 1:
                raise asyncio.CancelledError  # e.g. an inner task's cancellation leaked
            return None

        workers = asyncio.create_task(run_workers(q, handler, concurrency=1))
        q.add("a")
        await clock.run_for(5, step=0.5)
        assert runs == 2 and not workers.done()
        q.shutdown()
        await workers

    run(scenario)


def test_run_workers_needs_a_worker() -> None:
    async def noop(key: str) -> float | None:
        return None

    with pytest.raises(ValueError):
        asyncio.run(run_workers(queue_on(FakeClock()), noop, 0))


# --- properties --------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), KEYS),
        st.tuples(st.just("add_after"), KEYS, st.integers(0, 5)),
        st.tuples(st.just("get"), st.integers(0, 2)),
        st.tuples(st.just("done"), st.integers(0, 2)),
        st.tuples(st.just("advance"), st.integers(1, 3)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_every_add_is_processed_later_and_never_by_two_workers(ops: list[tuple[Any, ...]]) -> None:
    """A model keeps what is owed: each add (or delayed add once due) owes one hand-out."""

    async def scenario() -> None:
        clock = FakeClock()
        q = queue_on(clock)
        held: dict[int, str] = {}  # worker -> key
        owed: set[str] = set()
        delayed: dict[str, float] = {}

        def hand_out(worker: int, key: str) -> None:
            assert key not in held.values(), f"{key} handed to a second worker"
            assert key in owed, f"{key} handed out with no add since its last hand-out"
            owed.discard(key)
            held[worker] = key

        for op in ops:
            if op[0] == "add":
                q.add(op[1])
                owed.add(op[1])
            elif op[0] == "add_after":
                _, key, seconds = op
                q.add_after(key, seconds)
                if seconds <= 0:
                    owed.add(key)
                else:
                    due = clock.now() + seconds
                    delayed[key] = min(delayed.get(key, due), due)
            elif op[0] == "get" and op[1] not in held and len(q) > 0:
                hand_out(op[1], await q.get())
            elif op[0] == "done" and op[1] in held:
                q.done(held.pop(op[1]))
            elif op[0] == "advance":
                clock.advance(op[1])
                await clock.settle()
                for key in [k for k, due in delayed.items() if due <= clock.now()]:
                    owed.add(key)
                    del delayed[key]
        # Let everything come due, finish the held keys, and drain with one worker.
        clock.advance(10)
        await clock.settle()
        for key in delayed:
            owed.add(key)
        for worker in list(held):
            q.done(held.pop(worker))
        while len(q) > 0:
            hand_out(0, await q.get())
            q.done(held.pop(0))
        assert owed == set(), f"added but never processed afterwards: {owed}"
        assert q.delayed() == 0 and clock.sleeping() == 0

    run(scenario)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    adds=st.lists(st.tuples(st.integers(0, 15), KEYS), min_size=1, max_size=25),
    durations=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    failures=st.lists(st.booleans(), min_size=1, max_size=10),
    concurrency=st.integers(1, 4),
)
def test_workers_process_every_add_once_more_and_never_overlap_a_key(
    adds: list[tuple[int, str]],
    durations: list[int],
    failures: list[bool],
    concurrency: int,
) -> None:
    """The real runner with random arrival times, handler durations and failures."""

    async def scenario() -> None:
        clock = FakeClock()
        q: WorkQueue[str] = WorkQueue(ItemExponentialBackoff(0.5, 4.0), clock=clock)
        seq = 0
        last_add: dict[str, int] = {}
        last_start: dict[str, int] = {}
        active: set[str] = set()
        overlaps: list[str] = []
        calls = 0

        async def handler(key: str) -> float | None:
            nonlocal seq, calls
            if key in active:  # recorded: an assert here would be caught as a handler error
                overlaps.append(key)
            seq += 1
            last_start[key] = seq
            active.add(key)
            attempt = calls
            calls += 1
            try:
                await clock.sleep(durations[attempt % len(durations)])
            finally:
                active.discard(key)
            if failures[attempt % len(failures)] and attempt < 12:
                raise RuntimeError("transient")
            return None

        workers: asyncio.Task[None] = asyncio.create_task(run_workers(q, handler, concurrency))
        for now in range(16):
            for at, key in adds:
                if at == now:
                    seq += 1
                    last_add[key] = seq
                    q.add(key)
            await clock.settle()
            clock.advance(1)
        for _ in range(1000):
            await clock.settle()
            if not active and len(q) == 0 and q.delayed() == 0:
                break
            clock.advance(0.5)
        assert overlaps == [], "a key was processed by two workers at once"
        assert not active and len(q) == 0 and q.delayed() == 0, "the queue never went idle"
        for key, added in last_add.items():
            assert last_start.get(key, 0) > added, f"{key} was not processed after its last add"
        q.shutdown()
        await workers

    run(scenario)

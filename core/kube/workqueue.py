"""A rate-limited, de-duplicating work queue of object keys, with client-go's semantics.

Watch events, timers and resync feed one queue of keys that a few workers reconcile (issue
11). The guarantees are those of client-go's ``util/workqueue``, written anew for asyncio:

- a key that is already queued is not queued twice; a key is never handed to two workers at
  once; a key added while a worker has it is handed out again after :meth:`WorkQueue.done`;
- :meth:`WorkQueue.add_after` keeps the earliest due time per key;
- :meth:`WorkQueue.add_rate_limited` waits the larger of a per-key exponential backoff and an
  overall token bucket (client-go's ``DefaultControllerRateLimiter``); :meth:`WorkQueue.forget`
  resets a key's failures;
- two lanes: a :data:`Priority.LOW` key (a follow-up that may wait: a status projection, a
  poll, a resync) is handed out only when no :data:`Priority.HIGH` key is ready, and, with
  ``defer_quiet`` set, only once no HIGH key arrived for that long (a burst is going on) or
  the low key waited ``defer_max`` seconds (so it never starves). A key asked for at both
  priorities goes in the higher lane;
- after :meth:`WorkQueue.shutdown` adds are ignored, delayed keys are dropped, keys already
  queued are still handed out, and then :meth:`WorkQueue.get` raises
  :class:`~core.errors.QueueShutDownError`. Nothing is lost for good: the next leader's resync
  finds every non-terminal object again.

:func:`run_workers` is the worker loop of a client-go controller: success forgets the key's
failures (and may ask to look again in N seconds), an exception requeues it rate-limited. No
exception loses a key, and a key that always fails backs off to the cap without holding a
worker, so it never blocks the others.

Why hand-written: nothing maintained does this for asyncio. kopf 1.45 (and ``core.kube`` must
not import it) never retries an ``on.event`` handler and has no shared, rate-limited queue;
kr8s 0.20 and kubernetes_asyncio 36 are API clients without one; ``asyncio.Queue`` neither
de-duplicates nor serialises per key; asyncio-keyed-lock 1.0 serialises per key but neither
coalesces nor requeues; aiolimiter 1.3, asynciolimiter 1.2 and pyrate-limiter 4.5 make a
caller wait on the loop's real clock instead of answering "when may this key run again" on an
injected one; tenacity retries one call in place, holding a worker through the whole backoff.
Time comes from an injected :class:`Clock`, so tests move it by hand and never sleep.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from core.errors import QueueShutDownError

K = TypeVar("K", bound=Hashable)
K_contra = TypeVar("K_contra", bound=Hashable, contravariant=True)

log = logging.getLogger("orchestrator.workqueue")


class Priority(enum.IntEnum):
    """The lane of a key: HIGH work first; LOW work when HIGH work pauses (see the module)."""

    HIGH = 0
    LOW = 1


@dataclass(frozen=True, slots=True)
class Later:
    """A handler's answer: look at the key again in ``seconds``, in ``priority``'s lane."""

    seconds: float
    priority: Priority = Priority.LOW


class Clock(Protocol):
    """Monotonic seconds and a way to wait for them (a fake in tests)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` (what the event loop uses) and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class RateLimiter(Protocol[K_contra]):
    """How long a key must wait before its next retry."""

    def when(self, key: K_contra) -> float: ...  # one more failure of ``key``: its delay

    def forget(self, key: K_contra) -> None: ...

    def num_requeues(self, key: K_contra) -> int: ...


class ItemExponentialBackoff(Generic[K]):
    """Per key: ``base * 2**failures`` seconds, at most ``cap``."""

    def __init__(self, base: float = 0.005, cap: float = 1000.0) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base, self.cap = base, cap
        self._failures: dict[K, int] = {}

    def when(self, key: K) -> float:
        exponent = self._failures.get(key, 0)
        self._failures[key] = exponent + 1
        return min(self.base * 2.0 ** min(exponent, 1023), self.cap)  # 2.0**1024 overflows

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        return self._failures.get(key, 0)


class TokenBucket:
    """All keys together: ``rate`` retries per second after a burst of ``burst``.

    Like a reservation on Go's ``rate.Limiter``: every call takes a token, going into debt if
    none is left, and the answer is how long until that debt is paid.
    """

    def __init__(self, rate: float = 10.0, burst: int = 100, clock: Clock | None = None) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate, self.burst = rate, burst
        self._clock = clock or MonotonicClock()
        self._tokens = float(burst)
        self._last = self._clock.now()

    def when(self, key: Hashable) -> float:
        now = self._clock.now()
        elapsed = max(0.0, now - self._last)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate) - 1.0
        self._last = max(self._last, now)
        return max(0.0, -self._tokens / self.rate)

    def forget(self, key: Hashable) -> None:
        """The bucket is shared: one key's success returns nothing to it."""

    def num_requeues(self, key: Hashable) -> int:
        return 0


class MaxOf(Generic[K]):
    """The longest delay of several limiters (each of them records the failure)."""

    def __init__(self, *limiters: RateLimiter[K]) -> None:
        if not limiters:
            raise ValueError("MaxOf needs at least one rate limiter")
        self.limiters = limiters

    def when(self, key: K) -> float:
        return max([limiter.when(key) for limiter in self.limiters])

    def forget(self, key: K) -> None:
        for limiter in self.limiters:
            limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        return max(limiter.num_requeues(key) for limiter in self.limiters)


def default_rate_limiter(
    clock: Clock | None = None, *, base: float = 0.005, cap: float = 1000.0
) -> MaxOf[Hashable]:
    """client-go's default: 5 ms doubling per failure up to 1000 s, and 10/s after 100 at once."""
    return MaxOf(ItemExponentialBackoff(base, cap), TokenBucket(10.0, 100, clock))


class QueueMetrics(Protocol):
    """Events for the operator's metrics (Prometheus stays out of this module); the hooks do
    nothing unless overridden, so a subclass implements only those it exports.

    What grows with time while nothing happens (unfinished work, the longest running key) is
    read when scraped: :meth:`WorkQueue.unfinished_work_seconds` and
    :meth:`WorkQueue.longest_running_seconds` suit ``Gauge.set_function``.
    """

    def added(self) -> None:
        """A key became due for processing (the adds counter)."""
        return None

    def depth(self, keys: int) -> None:
        """Keys waiting to be handed out, including those waiting for their worker to finish."""
        return None

    def queued(self, seconds: float) -> None:
        """How long a key waited between its add and a worker taking it."""
        return None

    def worked(self, seconds: float) -> None:
        """How long a worker held a key (get to done)."""
        return None

    def retried(self) -> None:
        """A delayed or rate-limited add (client-go's retries counter)."""
        return None


class NoMetrics(QueueMetrics):
    """Metrics off: every hook does nothing."""


class WorkQueue(Generic[K]):
    """Keys to reconcile (see the module docstring). Use it from one running event loop."""

    def __init__(
        self,
        rate_limiter: RateLimiter[K] | None = None,
        *,
        clock: Clock | None = None,
        metrics: QueueMetrics | None = None,
        defer_quiet: float = 0.0,
        defer_max: float = 30.0,
    ) -> None:
        if defer_quiet < 0 or defer_max < 0:
            raise ValueError("defer_quiet and defer_max must not be negative")
        self._clock = clock or MonotonicClock()
        self._limiter: RateLimiter[K] = rate_limiter or default_rate_limiter(self._clock)
        self._metrics = metrics or NoMetrics()
        self.defer_quiet, self.defer_max = defer_quiet, defer_max
        # Ready keys per lane, with when they became ready; an entry whose key is no longer
        # ready in that lane (handed out, or promoted to HIGH) is stale and skipped.
        self._lanes: tuple[deque[tuple[K, float]], deque[tuple[K, float]]] = (deque(), deque())
        self._ready: dict[K, Priority] = {}
        self._dirty: dict[K, Priority] = {}  # queued, or added again while processing
        self._processing: dict[K, float] = {}  # key -> when a worker took it
        self._added_at: dict[K, float] = {}
        self._last_high = float("-inf")  # when a HIGH key last became ready
        self._getters: deque[asyncio.Future[None]] = deque()
        self._drained: list[asyncio.Future[None]] = []
        self._shutting_down = False
        self._draining = False
        # Delayed keys: earliest due time (and the lane) per key; the heap may hold stale entries.
        self._waiting: dict[K, tuple[float, Priority]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._timer: asyncio.Task[None] | None = None
        self._timer_due = 0.0
        self._release: asyncio.Task[None] | None = None  # ends the LOW lane's hold

    def __len__(self) -> int:
        """Keys ready to be handed out (not the delayed ones, not those being processed)."""
        return len(self._ready)

    def ready(self, priority: Priority) -> int:
        """Keys ready to be handed out in one lane."""
        return sum(1 for lane in self._ready.values() if lane is priority)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def delayed(self) -> int:
        """Keys waiting for their ``add_after`` time."""
        return len(self._waiting)

    def in_progress(self) -> int:
        """Keys a worker holds."""
        return len(self._processing)

    def add(self, key: K, priority: Priority = Priority.HIGH) -> None:
        if self._shutting_down:
            return
        wanted = self._dirty.get(key)
        if wanted is not None:
            if priority < wanted:  # asked for sooner: promote
                self._dirty[key] = priority
                if key in self._ready:
                    self._push(key, priority)
            return
        self._dirty[key] = priority
        self._added_at.setdefault(key, self._clock.now())
        self._metrics.added()
        self._metrics.depth(len(self._dirty))
        if key not in self._processing:
            self._push(key, priority)

    def add_after(self, key: K, seconds: float, priority: Priority = Priority.HIGH) -> None:
        """Add ``key`` in ``seconds``; an earlier pending due time for the key wins (and the
        higher of the two priorities)."""
        if self._shutting_down:
            return
        self._metrics.retried()
        if seconds <= 0:
            self.add(key, priority)
            return
        due = self._clock.now() + seconds
        earlier = self._waiting.get(key)
        if earlier is not None:
            priority = min(priority, earlier[1])
            if earlier[0] <= due:
                self._waiting[key] = (earlier[0], priority)
                return
        self._waiting[key] = (due, priority)
        heapq.heappush(self._heap, (due, next(self._seq), key))
        if len(self._heap) > 2 * len(self._waiting) + 64:
            self._heap = [(d, n, k) for d, n, k in self._heap if self._due(k) == d]
            heapq.heapify(self._heap)
        self._arm()

    def add_rate_limited(self, key: K) -> float:
        """Add ``key`` after its rate limiter's delay; returns that delay."""
        if self._shutting_down:
            return 0.0
        delay = self._limiter.when(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts again from the base delay."""
        self._limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        return self._limiter.num_requeues(key)

    async def get(self) -> K:
        """The next key, now owned by the caller until :meth:`done`.

        Raises :class:`~core.errors.QueueShutDownError` once shut down and empty.
        """
        while True:
            key = self._take()
            if key is not None:
                break
            if self._shutting_down and not self._ready:
                raise QueueShutDownError("work queue shut down")
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            self._arm_release()
            try:
                await getter
            except BaseException:
                getter.cancel()
                if getter in self._getters:
                    self._getters.remove(getter)
                elif self._ready:
                    self._wake_one()  # this getter was woken for a key: pass the turn on
                raise
        now = self._clock.now()
        self._processing[key] = now
        del self._dirty[key]
        self._metrics.depth(len(self._dirty))
        added = self._added_at.pop(key, None)
        if added is not None:
            self._metrics.queued(now - added)
        if self._ready and self._getters:
            self._wake_one()  # a held-back key may have been released for several getters
        return key

    def done(self, key: K) -> None:
        """The worker is finished with ``key``; hand it out again if it was added meanwhile.

        Idempotent: a key that is not being processed is left alone.
        """
        started = self._processing.pop(key, None)
        if started is None:
            return
        self._metrics.worked(self._clock.now() - started)
        priority = self._dirty.get(key)
        if priority is not None:
            self._push(key, priority)
        elif not self._processing:
            _resolve(self._drained)

    def shutdown(self) -> None:
        """Stop taking keys; delayed keys are dropped; getters get what is queued, then stop.

        Also ends a :meth:`shutdown_with_drain` that is still waiting (a second SIGTERM).
        """
        self._stop()
        self._draining = False
        _resolve(self._drained)

    async def shutdown_with_drain(self) -> None:
        """Shut down, then wait until no key is being processed (or :meth:`shutdown`)."""
        self._stop()
        self._draining = True
        while self._processing and self._draining:
            waiter = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            try:
                await waiter
            finally:
                self._drained.remove(waiter)

    def unfinished_work_seconds(self) -> float:
        """Sum over the keys being processed of how long they have been (a stuck worker)."""
        now = self._clock.now()
        return sum(now - started for started in self._processing.values())

    def longest_running_seconds(self) -> float:
        now = self._clock.now()
        return max((now - started for started in self._processing.values()), default=0.0)

    def _stop(self) -> None:
        self._shutting_down = True
        for timer in (self._timer, self._release):
            if timer is not None:
                timer.cancel()
        self._timer = self._release = None
        self._waiting.clear()
        self._heap.clear()
        _resolve(self._getters)
        self._getters.clear()

    # ------------------------------------------------------------------ the lanes

    def _push(self, key: K, priority: Priority) -> None:
        now = self._clock.now()
        self._ready[key] = priority
        self._lanes[priority].append((key, now))
        if priority is Priority.HIGH:
            self._last_high = now
        self._wake_one()

    def _head(self, priority: Priority) -> tuple[K, float] | None:
        """The first live entry of a lane (stale entries are dropped on the way)."""
        lane = self._lanes[priority]
        while lane:
            key, since = lane[0]
            if self._ready.get(key) is priority:
                return key, since
            lane.popleft()
        return None

    def _held_until(self) -> float | None:
        """While LOW keys are held back (a burst of HIGH work), when the hold ends."""
        if self.defer_quiet <= 0 or self._shutting_down:
            return None
        head = self._head(Priority.LOW)
        if head is None:
            return None
        until = min(self._last_high + self.defer_quiet, head[1] + self.defer_max)
        return until if until > self._clock.now() else None

    def _take(self) -> K | None:
        for priority in Priority:
            head = self._head(priority)
            if head is None:
                continue
            if priority is Priority.LOW and self._held_until() is not None:
                return None
            self._lanes[priority].popleft()
            del self._ready[head[0]]
            return head[0]
        return None

    def _arm_release(self) -> None:
        """One timer wakes the getters when the LOW lane's hold ends."""
        until = self._held_until()
        if until is None or (self._release is not None and not self._release.done()):
            return
        self._release = asyncio.get_running_loop().create_task(
            self._release_at(until), name="workqueue-release"
        )

    async def _release_at(self, until: float) -> None:
        await self._clock.sleep(max(0.0, until - self._clock.now()))
        self._release = None
        if self._ready:
            self._wake_one()
        if self._getters and self._held_until() is not None:
            self._arm_release()  # new HIGH work came meanwhile: hold on

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    # ------------------------------------------------------------------ delayed keys

    def _due(self, key: K) -> float | None:
        waiting = self._waiting.get(key)
        return waiting[0] if waiting is not None else None

    def _arm(self) -> None:
        """Keep one timer task sleeping until the earliest due time of the delayed keys."""
        while self._heap and self._due(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None and not self._timer.done():
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().create_task(
            self._sleep_until(due), name="workqueue-timer"
        )

    async def _sleep_until(self, due: float) -> None:
        await self._clock.sleep(max(0.0, due - self._clock.now()))
        self._timer = None
        now = self._clock.now()
        while self._heap and self._heap[0][0] <= now:
            due_at, _, key = heapq.heappop(self._heap)
            waiting = self._waiting.get(key)
            if waiting is not None and waiting[0] == due_at:
                del self._waiting[key]
                self.add(key, waiting[1])
        self._arm()


def _resolve(waiters: Iterable[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


#: None: done; seconds: look again then (HIGH); :class:`Later`: then, in its lane.
Handler = Callable[[K], Awaitable[float | Later | None]]


async def run_workers(queue: WorkQueue[K], handler: Handler[K], concurrency: int) -> None:
    """Work ``queue`` with at most ``concurrency`` handlers at once, until it is shut down.

    Returns when the queue is shut down and empty. Cancel the task running this to stop at
    once (lost leadership): running handlers are cancelled and their keys stay queued.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    async with asyncio.TaskGroup() as workers:
        for n in range(concurrency):
            workers.create_task(_worker(queue, handler), name=f"workqueue-worker-{n}")


async def _worker(queue: WorkQueue[K], handler: Handler[K]) -> None:
    while True:
        try:
            key = await queue.get()
        except QueueShutDownError:
            return
        await process(queue, handler, key)
        await asyncio.sleep(0)  # a handler that never awaits must not hold the loop (lease)


async def process(queue: WorkQueue[K], handler: Handler[K], key: K) -> None:
    """Run ``handler`` for a key taken from ``queue``; whatever happens, the key is kept."""
    try:
        again = await handler(key)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            queue.add(key)  # we are being stopped: the key waits for the next worker
            raise
        _failed(queue, key)  # the handler cancelled something of its own and let it escape
    except Exception:
        _failed(queue, key)
    else:
        queue.forget(key)
        if isinstance(again, Later):
            queue.add_after(key, again.seconds, again.priority)
        elif again is not None:
            queue.add_after(key, again)
    finally:
        queue.done(key)


def _failed(queue: WorkQueue[K], key: K) -> None:
    delay = queue.add_rate_limited(key)
    failures = queue.num_requeues(key)
    log.exception("reconcile of %r failed (%d in a row); again in %.3f s", key, failures, delay)

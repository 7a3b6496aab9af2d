"""A clock that moves only when a test says so, for code that takes an injected ``Clock``.

``sleep`` parks the caller on a future that :meth:`FakeClock.advance` resolves once its time
has come, so a test of timers, backoffs and delays runs in no real time and gives the same
result on a loaded machine as on an idle one. :meth:`FakeClock.settle` lets the woken tasks
run (event-loop yields only).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    """Satisfies ``core.kube.workqueue.Clock``."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wake = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), wake))
        await wake

    def sleeping(self) -> int:
        """Sleepers still waiting (cancelled ones not counted)."""
        return sum(1 for _, _, wake in self._sleepers if not wake.done())

    def next_wake(self) -> float | None:
        """The earliest time a sleeper waits for, or None."""
        pending = [when for when, _, wake in self._sleepers if not wake.done()]
        return min(pending, default=None)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, wake = heapq.heappop(self._sleepers)
            if not wake.done():
                wake.set_result(None)

    async def settle(self, rounds: int = 20) -> None:
        """Let the tasks woken so far run (and the tasks they wake, up to ``rounds`` hops)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def run_for(self, seconds: float, step: float) -> None:
        """Let tasks run, then advance ``seconds`` in steps of ``step``, settling after each."""
        end = self._now + seconds
        await self.settle()
        while self._now < end:
            self.advance(min(step, end - self._now))
            await self.settle()

"""The operator's repair of its logs derived from the database, when it takes over work.

The recorder commits a task's rows, then appends their lines to ``logs/executor.jsonl`` and
``logs/escalations.jsonl``; an operator killed between the two leaves a line out. The
embedded executor repairs its logs when it starts; the operator repairs them each time this
replica starts leading, gains a shard, or takes the parts' Lease -- the moments it may take
over from a replica that died mid-write.

A pass reads the whole log file and the database's rows, so the passes asked for together
(every shard of a dead replica is gained at once) are done as one, and it runs in the
background: the append lock (:mod:`core.engine.log_lock`) makes it safe beside the writers,
and the work need not wait for it. A pass that fails (the database away) is tried again with
a backoff; it never stops the replica from leading.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("orchestrator.operator")

Repair = Callable[[], tuple[int, int]]


class LogRepair:
    def __init__(
        self,
        repair: Repair,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        """``repair`` runs in a worker thread and returns the (event, escalation) lines it
        appended; ``backoff`` is the first and the longest wait after a failed pass."""
        self._repair = repair
        self._sleep = sleep
        self._backoff = backoff
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self.passes = 0  # completed passes

    def request(self) -> None:
        """Ask for a pass that starts after now (call on the event loop; returns at once)."""
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def idle(self) -> None:
        """Wait until no pass is running or wanted (tests, shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop the passes (a pass already in its thread ends there, unobserved); a later
        :meth:`request` starts again (the control loop run again)."""
        task, self._task = self._task, None
        self._wanted = False
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while self._wanted:
            self._wanted = False  # asked from here on: one more pass
            await self._pass()

    async def _pass(self) -> None:
        wait = self._backoff[0]
        while True:
            try:
                events, escalations = await asyncio.to_thread(self._repair)
                break
            except Exception:
                log.warning(
                    "could not repair the logs from the database; again in %.0f s",
                    wait,
                    exc_info=True,
                )
                await self._sleep(wait)
                wait = min(wait * 2, self._backoff[1])
        self.passes += 1
        if events or escalations:
            log.warning(
                "repaired the logs from the database: %d event line(s) appended to "
                "logs/executor.jsonl, %d to logs/escalations.jsonl (a writer died between "
                "its commit and its line)",
                events,
                escalations,
            )

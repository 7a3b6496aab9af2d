"""The operator's control loop: watches feed one work queue; only the leader works it.

Like a controller built on client-go: informers (:mod:`core.kube.informer`) keep the watch
cache and turn every event into keys of a de-duplicating, rate-limited work queue
(:mod:`core.kube.workqueue`); workers take keys one at a time per key and call
:meth:`core.kube.reconciler.Controller.sync`, which says when to look again; a resync
re-queues every unfinished TaskExecution from the cache (no API call); an exception puts the
key back with a per-key backoff and shows the error in the object's status. One bad object
never blocks the others, and no event is lost to an exception.

Every replica keeps its cache warm; only the holder of the Lease (:mod:`core.kube.leader`)
runs the workers, the resync and the deletion sweep, so a standby takes over with a complete
cache and two replicas never act on one task. Other controllers share all of this as
:class:`~core.kube.loop_part.LoopPart` s (Integrations, escalation Events): they see every
watch event, own their keys of the queue and lead and follow with the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from functools import partial

from core.errors import ConflictError, TransientApiError
from core.kube.api import Body, KubeApi
from core.kube.informer import Informer
from core.kube.jobs import MANAGED_BY
from core.kube.leader import ElectionConfig, LeaderElector
from core.kube.loop_part import LoopPart
from core.kube.reconciler import Controller, Key, Next
from core.kube.workqueue import (
    Clock,
    MonotonicClock,
    Priority,
    WorkQueue,
    default_rate_limiter,
    run_workers,
)

log = logging.getLogger("orchestrator.operator")


class ControlLoop:
    def __init__(
        self,
        controller: Controller,
        api: KubeApi,
        *,
        namespaces: tuple[str, ...] = (),
        workers: int = 16,
        resync_seconds: float = 30.0,
        defer_quiet: float = 0.0,
        defer_max: float = 30.0,
        election: ElectionConfig | None = None,
        identity: str = "orchestrator-operator",
        clock: Clock | None = None,
        parts: Sequence[LoopPart] = (),
    ) -> None:
        self.controller = controller
        self.parts = tuple(parts)
        self.api = api
        self.namespaces = namespaces
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.clock = clock or MonotonicClock()
        self.queue: WorkQueue[Key] = WorkQueue(
            default_rate_limiter(self.clock),
            clock=self.clock,
            defer_quiet=defer_quiet,
            defer_max=defer_max,
        )
        self._scopes: tuple[str | None, ...] = tuple(namespaces) or (None,)
        scopes: Iterable[str | None] = namespaces or (None,)
        self.informers: list[Informer] = []
        for ns in scopes:
            self.informers += [
                Informer(api, "adapters", ns, self._adapter, clock=self.clock),
                Informer(api, "taskexecutions", ns, self._task, clock=self.clock),
                Informer(
                    api,
                    "jobs",
                    ns,
                    self._job,
                    label_selector=f"app.kubernetes.io/managed-by={MANAGED_BY}",
                    clock=self.clock,
                ),
            ]
            for resource in sorted({r for p in self.parts for r in p.extra_resources}):
                handler = partial(self._observed, resource)
                self.informers.append(Informer(api, resource, ns, handler, clock=self.clock))
        self.elector = (
            LeaderElector(
                api,
                election,
                identity,
                on_started=self._lead,
                on_stopped=self._follow,
                clock=self.clock,
            )
            if election is not None
            else None
        )
        self._leading: list[asyncio.Task[None]] = []

    @property
    def leading(self) -> bool:
        return bool(self._leading)

    # ------------------------------------------------------------------ events -> keys

    def _add(self, keys: list[Key], priority: Priority = Priority.HIGH) -> None:
        for key in keys:
            self.queue.add(key, priority)

    def _observed(self, resource: str, type_: str, body: Body) -> None:
        for part in self.parts:
            self._add(part.observe(resource, type_, body))

    def _task(self, type_: str, body: Body) -> None:
        self._add(self.controller.observe_task(type_, body))
        self._observed("taskexecutions", type_, body)

    def _adapter(self, type_: str, body: Body) -> None:
        self._add(self.controller.observe_adapter(type_, body))
        self._observed("adapters", type_, body)

    def _job(self, type_: str, body: Body) -> None:
        self._add(self.controller.observe_job(type_, body))
        self._observed("jobs", type_, body)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Informers always; the work only while leading. Runs until cancelled."""
        watching = [asyncio.create_task(i.run()) for i in self.informers]
        try:
            if self.elector is not None:
                await self.elector.run()
            else:
                await self._lead()
                await asyncio.Event().wait()
        finally:
            await self._follow()
            for task in watching:
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)

    async def release(self) -> None:
        """Step down (graceful shutdown): a standby takes over at once."""
        if self.elector is not None:
            await self.elector.release()

    async def synced(self) -> None:
        await asyncio.gather(*(i.synced.wait() for i in self.informers))

    async def _lead(self) -> None:
        await self.synced()  # the cache is complete: the sweep may trust an absence
        self.controller.cache.listed.update(self._scopes)  # and so may an Adapter lookup
        swept = await self.controller.sweep(self.namespaces)
        if swept:
            log.warning("recorded %d task(s) CANCELLED whose TaskExecution is gone", swept)
        self._add(self.controller.unfinished_keys())
        for part in self.parts:
            await part.lead()
            self._add(part.resync_keys())
        self._leading = [
            asyncio.create_task(run_workers(self.queue, self._handle, self.workers)),
            asyncio.create_task(self._resync()),
        ]

    async def _follow(self) -> None:
        tasks, self._leading = self._leading, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for part in self.parts:
            await part.follow()

    async def _handle(self, key: Key) -> Next:
        part = next((p for p in self.parts if p.owns(key)), None)
        if part is not None:
            return await part.sync(key)
        try:
            return await self.controller.sync(key)
        except (TransientApiError, ConflictError):
            raise  # retried with backoff; not worth a status write of its own
        except Exception as exc:
            log.warning("sync of %s failed: %s", key, exc, exc_info=True)
            await self.controller.report_error(key, exc)
            raise

    async def _resync(self) -> None:
        while True:
            await self.clock.sleep(self.resync_seconds)
            self._add(self.controller.unfinished_keys(), Priority.LOW)
            for part in self.parts:
                self._add(part.resync_keys(), Priority.LOW)

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
cache and two replicas never act on one task. Taking over, it repairs the logs a dead
leader may have left a line short (:mod:`core.kube.log_repair`). Other controllers share all
of this as :class:`~core.kube.loop_part.LoopPart` s (Integrations, escalation Events): they
see every watch event, own their keys of the queue and lead and follow with the loop.

With ``shards`` (:mod:`core.kube.shards`) every replica runs workers, but a TaskExecution's
keys are worked only by the replica holding its shard's Lease: a key of a shard not held is
dropped (its holder has it), on gaining a shard that shard is swept and its unfinished keys
queued, and on losing it the syncs in flight for it are cancelled before the Lease may pass
on. The parts stay behind the ordinary Lease (one replica runs Integrations and escalation
Events), with their syncs cancelled the same way when it is lost.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial

from core.errors import ConflictError, TransientApiError
from core.kube.api import Body, KubeApi
from core.kube.informer import Informer
from core.kube.jobs import MANAGED_BY
from core.kube.leader import ElectionConfig, LeaderElector
from core.kube.log_repair import LogRepair
from core.kube.loop_part import LoopPart
from core.kube.reconciler import Controller, Key, Next
from core.kube.shards import ShardSet, shard_of
from core.kube.workqueue import (
    Clock,
    MonotonicClock,
    Priority,
    WorkQueue,
    default_rate_limiter,
    run_workers,
)

log = logging.getLogger("orchestrator.operator")

#: The owner of the parts' keys (sharded mode): whoever holds the ordinary Lease.
PARTS = -1


class Phase(enum.Enum):
    STARTING = "starting"  # held; being swept: its keys wait
    ACTIVE = "active"


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
        shards: int = 0,
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
        if shards and election is None:
            raise ValueError("shards need leader election (their Leases)")
        sharded = bool(shards) and election is not None
        self.elector = (
            LeaderElector(
                api,
                election,
                identity,
                on_started=self._lead_parts if sharded else self._lead,
                on_stopped=self._follow_parts if sharded else self._follow,
                clock=self.clock,
            )
            if election is not None
            else None
        )
        self.shards = (
            ShardSet(
                api,
                election,
                shards,
                identity,
                on_started=self._gain,
                on_stopped=self._lose,
                clock=self.clock,
            )
            if sharded and election is not None
            else None
        )
        self._leading: list[asyncio.Task[None]] = []
        self._phase: dict[int, Phase] = {}  # sharded: the owners (shards, PARTS) held
        self._parked: dict[int, dict[Key, Priority]] = {}
        self._inflight: dict[int, set[asyncio.Task[Next]]] = {}
        #: logs/*.jsonl from the database, whenever work may pass from a replica that died
        self.log_repair = LogRepair(controller.repair_logs)

    @property
    def leading(self) -> bool:
        if self.shards is not None:
            return bool(self._phase)
        return bool(self._leading)

    # ------------------------------------------------------------------ events -> keys

    def _add(self, keys: list[Key], priority: Priority = Priority.HIGH) -> None:
        for key in keys:
            if self.shards is not None:
                owner = self._owner(key)
                phase = None if owner is None else self._phase.get(owner)
                if phase is Phase.STARTING and owner is not None:
                    self._parked[owner][key] = priority  # queued once swept
                if phase is not Phase.ACTIVE:
                    continue  # not ours: the holder of its shard works it
            self.queue.add(key, priority)

    def _owner(self, key: Key) -> int | None:
        """Sharded: who works ``key`` (a shard, or PARTS); None: nobody (nothing to do)."""
        assert self.shards is not None
        if any(p.owns(key) for p in self.parts):
            return PARTS
        if key[0] == "gone":
            uid = key[5]
        elif key[0] == "task":
            entry = self.controller.cache.tasks.entry((key[1], key[2]))
            if entry is None:
                return None  # gone or finished: a sync would do nothing
            uid = entry.uid
        else:
            uid = "/".join(key)
        return shard_of(uid, self.shards.count)

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
        if self.shards is not None:
            watching += [
                asyncio.create_task(run_workers(self.queue, self._handle, self.workers)),
                asyncio.create_task(self._resync()),
            ]
        try:
            if self.shards is not None and self.elector is not None:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.elector.run())
                    group.create_task(self.shards.run())
            elif self.elector is not None:
                await self.elector.run()
            else:
                await self._lead()
                await asyncio.Event().wait()
        finally:
            await self._follow()
            await self.log_repair.close()
            for task in watching:
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)

    async def release(self) -> None:
        """Step down (graceful shutdown): a standby takes over at once."""
        if self.shards is not None:
            await self.shards.release()
        if self.elector is not None:
            await self.elector.release()

    async def synced(self) -> None:
        await asyncio.gather(*(i.synced.wait() for i in self.informers))

    async def _lead(self) -> None:
        await self.synced()  # the cache is complete: the sweep may trust an absence
        self.controller.cache.listed.update(self._scopes)  # and so may an Adapter lookup
        self.log_repair.request()
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

    # ------------------------------------------------------------------ sharded

    async def _gain(self, shard: int) -> None:
        """This replica holds ``shard`` now: sweep it, then work its keys."""
        self._phase[shard], self._parked[shard] = Phase.STARTING, {}
        self._inflight.setdefault(shard, set())
        await self.synced()
        self.controller.cache.listed.update(self._scopes)
        self.log_repair.request()
        assert self.shards is not None
        count = self.shards.count
        swept = await self.controller.sweep(
            self.namespaces, owns=lambda uid: shard_of(uid, count) == shard
        )
        if swept:
            log.warning(
                "shard %d: recorded %d task(s) CANCELLED whose TaskExecution is gone", shard, swept
            )
        parked = self._parked.pop(shard, {})
        self._phase[shard] = Phase.ACTIVE
        self._add(self.controller.unfinished_keys())
        for key, priority in parked.items():
            self.queue.add(key, priority)
        log.info("shard %d: working it", shard)

    async def _lose(self, shard: int) -> None:
        """``shard`` may no longer be ours: its syncs in flight end before this returns."""
        self._phase.pop(shard, None)
        self._parked.pop(shard, None)
        await self._cancel(shard)

    async def _cancel(self, owner: int) -> None:
        tasks = self._inflight.get(owner, set())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _lead_parts(self) -> None:
        await self.synced()
        self.controller.cache.listed.update(self._scopes)
        self._phase[PARTS] = Phase.ACTIVE
        self._inflight.setdefault(PARTS, set())
        self.log_repair.request()
        for part in self.parts:
            await part.lead()
            self._add(part.resync_keys())

    async def _follow_parts(self) -> None:
        self._phase.pop(PARTS, None)
        await self._cancel(PARTS)
        for part in self.parts:
            await part.follow()

    async def _owned(self, owner: int, work: Callable[[], Awaitable[Next]]) -> Next:
        """Run ``work`` as long as ``owner`` is held; None (the key is dropped) when it is
        lost meanwhile: the new holder queues its keys itself."""
        task: asyncio.Task[Next] = asyncio.ensure_future(work())
        inflight = self._inflight.setdefault(owner, set())
        inflight.add(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise  # this worker is being stopped
            if task.cancelled() and self._phase.get(owner) is not Phase.ACTIVE:
                return None  # the owner was lost
            raise
        finally:
            inflight.discard(task)

    async def _handle(self, key: Key) -> Next:
        if self.shards is not None:
            owner = self._owner(key)
            if owner is None or self._phase.get(owner) is not Phase.ACTIVE:
                return None  # not ours (any more)
            return await self._owned(owner, partial(self._work, key))
        return await self._work(key)

    async def _work(self, key: Key) -> Next:
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

"""Escalations as Kubernetes Warning Events, posted exactly once per escalation key.

The recorder raises escalations (:mod:`core.engine.escalation`) where the facts are decided:
inside its database work, which the operator runs in a worker thread. Nothing there may call
the API server (the client lives on the event loop, and a slow API must not hold a database
transaction's thread), so the escalation sink only *pokes* this part, thread-safely; the
poster then runs on the event loop and posts every escalation row of a served namespace that
has no ``event_posted_at`` yet, and stamps it. The ``escalations`` table is the queue:

* an escalation raised while no replica led, or whose post failed, or that a crash caught
  between its row and its Event, is posted by the next pass (the leader's first pass after
  it starts leading, and a retry after every failure);
* each Event has a deterministic name (the involved object's name and a hash of the
  escalation key), so a post replayed after a crash between the POST and the stamp is a 409,
  never a second Event; once stamped, never again (also not after the API server dropped
  the Event at its TTL).

Where they go: every escalation about a task is a Warning Event ``ESCALATION`` on its
TaskExecution (found by uid); the adapter-level ones (``breaker_open``,
``breaker_open_too_long``, ``gate_failed_repeatedly``) also on the Adapter. The operator also
raises ``breaker_open_too_long`` itself: it looks at its Adapters' breakers periodically, as
the embedded executor does at every step.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from core.engine.escalation import Escalation, EscalationReason, Escalations, escalation_of
from core.errors import RejectedError
from core.kube.adapter_breakers import AdapterBreakers
from core.kube.api import Body, KubeApi
from core.kube.loop_part import PassivePart
from core.kube.watch_cache import WatchCache

log = logging.getLogger("orchestrator.operator")

REASON = "ESCALATION"
#: Escalations about an adapter as a whole: also an Event on the Adapter.
ADAPTER_LEVEL = frozenset(
    {
        EscalationReason.BREAKER_OPEN,
        EscalationReason.BREAKER_OPEN_TOO_LONG,
        EscalationReason.GATE_FAILED_REPEATEDLY,
    }
)
BATCH = 100


def event_name(obj: Body, key: str) -> str:
    """The Event's name: ``<object>.esc-<hash of kind and escalation key>`` (a DNS subdomain)."""
    digest = hashlib.sha256(f"{obj['kind']}/{key}".encode()).hexdigest()[:16]
    return f"{obj['metadata']['name'][:200]}.esc-{digest}"


def event_message(escalation: Escalation) -> str:
    """What ``kubectl describe`` shows: reason, severity, what happened, where the evidence is."""
    where = "; ".join(f"{k}: {v}" for k, v in escalation.evidence.items())
    text = f"{escalation.reason.value} ({escalation.severity}): {escalation.message}"
    return f"{text} | evidence: {where}" if where else text


def _now() -> datetime:
    return datetime.now(UTC)


class EscalationEvents(PassivePart):
    """The poster (see the module docstring); a :class:`~core.kube.loop_part.LoopPart` so it
    works only while this replica leads."""

    def __init__(
        self,
        api: KubeApi,
        escalations: Escalations,
        cache: WatchCache,
        breakers: AdapterBreakers,
        *,
        namespaces: tuple[str, ...] = (),
        now: Callable[[], datetime] = _now,
        retry_seconds: float = 30.0,
        breaker_check_seconds: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self.escalations = escalations
        self.cache = cache
        self.breakers = breakers
        self.namespaces = namespaces
        self.now = now
        self.retry_seconds = retry_seconds
        self.breaker_check_seconds = breaker_check_seconds
        self.sleep = sleep
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        escalations.sinks.append(self.sink)

    # ------------------------------------------------------------------ the sink (any thread)

    def sink(self, escalation: Escalation) -> None:
        """Called by the recorder when it raised ``escalation`` (from a database thread)."""
        loop = self._loop
        if loop is None:
            return  # not leading: the row waits for the next leader's first pass
        try:
            loop.call_soon_threadsafe(self._poke)
        except RuntimeError:  # the loop closed meanwhile: same as above
            return

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ leading

    async def lead(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._wake.set()  # the first pass posts what the last leader left
        self._tasks = [
            asyncio.create_task(self._post_loop()),
            asyncio.create_task(self._breaker_loop()),
        ]

    async def follow(self) -> None:
        self._loop = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _post_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while await self.post_pending() >= BATCH:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API or the database: try again later
                log.warning(
                    "posting escalation Events failed: %s; again in %gs", exc, self.retry_seconds
                )
                await self.sleep(self.retry_seconds)
                self._wake.set()

    async def _breaker_loop(self) -> None:
        while True:
            await self.sleep(self.breaker_check_seconds)
            try:
                await asyncio.to_thread(self.check_breakers)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("checking the breakers for escalations failed: %s", exc)

    # ------------------------------------------------------------------ the work

    def check_breakers(self) -> int:
        """Escalate breakers not closed for too long (database thread); how many were new."""
        now = self.now()
        raised = 0
        for namespace, snapshots in self.breakers.snapshots().items():
            raised += len(self.escalations.breakers_seen(snapshots, now, scope=namespace))
        return raised

    async def post_pending(self) -> int:
        """Post the Events of up to :data:`BATCH` unposted escalations; returns how many."""
        rows = await asyncio.to_thread(
            self.escalations.rows.events_pending, self.namespaces, BATCH
        )
        listed: dict[str, list[Body]] = {}
        for row in rows:
            escalation = escalation_of(row)
            targets = await self._targets(escalation, listed)
            posted = [await self._post(obj, escalation) for obj in targets]
            await asyncio.to_thread(self.escalations.rows.event_posted, escalation.key)
            log.info(
                "escalation %s: %d Warning Event(s) posted, %d there already",
                escalation.key,
                posted.count(True),
                posted.count(False),
            )
        return len(rows)

    async def _post(self, obj: Body, escalation: Escalation) -> bool:
        """Whether this call posted the Event (False: posted before, or refused)."""
        name = event_name(obj, escalation.key)
        try:
            return await self.api.post_event(
                obj,
                "Warning",
                REASON,
                event_message(escalation),
                escalation.reason.value,
                name=name,
            )
        except RejectedError as exc:  # 4xx: the same body would be refused every time
            log.error("escalation Event %s refused (%s): %s", name, exc.status, exc)
            return False

    async def _targets(self, escalation: Escalation, listed: dict[str, list[Body]]) -> list[Body]:
        """The objects the escalation is about that still exist."""
        namespace = escalation.scope
        found: list[Body] = []
        if escalation.task_uid:
            task = await self._task_execution(namespace, escalation.task_uid, listed)
            if task is not None:
                found.append(task)
        if escalation.reason in ADAPTER_LEVEL and escalation.adapter_id:
            adapter = self.cache.adapters.get((namespace, escalation.adapter_id))
            if adapter is None:
                adapter = await self.api.get_object("adapters", namespace, escalation.adapter_id)
            if adapter is not None:
                found.append(adapter)
        if not found:
            log.info("escalation %s: nothing left to post its Event on", escalation.key)
        return found

    async def _task_execution(
        self, namespace: str, uid: str, listed: dict[str, list[Body]]
    ) -> Body | None:
        """The TaskExecution with ``uid``: from the watch cache (unfinished ones), else from
        one list of the namespace per pass (finished ones leave the cache)."""
        for where, entry in list(self.cache.tasks.entries()):
            if where[0] == namespace and entry.uid == uid:  # decode only the match
                return self.cache.tasks.get(where)
        if namespace not in listed:
            listed[namespace] = await self.api.list_objects("taskexecutions", namespace)
        return next((b for b in listed[namespace] if b["metadata"].get("uid") == uid), None)

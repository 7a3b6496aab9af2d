"""One active operator: leader election on a ``coordination.k8s.io/v1`` Lease.

Why not kopf's peering: peering pauses kopf's watch streams only, and equal priorities freeze
each other; the work queue, the resync and the timers the operator runs itself keep going on
a paused standby. Here the standby does nothing at all: :class:`LeaderElector` calls
``on_started`` when this replica holds the Lease and ``on_stopped`` the moment it may no
longer be sure it does, and the operator runs its queue workers, resync and timers only in
between.

The rules are client-go's ``leaderelection`` (read tools/leaderelection for the reasoning):

* Every write of the Lease carries the resourceVersion it read (409 on a race: nobody wins
  by overwriting).
* A Lease held by another replica counts as expired only when this replica has seen the same
  record unchanged for ``lease_duration`` of its *own* monotonic clock: nobody compares
  timestamps written by another machine's clock.
* The leader renews every ``retry_period``; when it could not renew for ``renew_deadline``
  (< ``lease_duration``) it stops leading before anyone else may take over.
* A leader renews with one call: it replaces the Lease as it last wrote it (client-go's
  optimistic renewal). The resourceVersion precondition makes that as safe as read-then-write;
  only a conflict or an error sends the next round back to reading first. Idle, an operator
  then makes one API call per ``retry_period``, not two.
* Stepping down (``release``) first stops the work (``on_stopped`` returns), then empties
  the holder so a standby takes over at once: the holder's work has ended before anyone can
  see the Lease free.
* ``may_acquire`` (optional) is asked before a free or expired Lease is taken; the Lease is
  still read every round, so :meth:`LeaderElector.live_holder` says who holds it (shards,
  :mod:`core.kube.shards`, take only their fair share this way).
* ``on_started`` runs beside the renewals, as client-go runs OnStartedLeading in its own
  goroutine: a slow start (informer sync, the sweep) must not let the Lease lapse, or a
  replica that came later takes it while this one is still starting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import ConflictError, KubeApiError
from core.kube.api import KubeApi
from core.kube.workqueue import Clock, MonotonicClock

log = logging.getLogger("orchestrator.leader")

Callback = Callable[[], Awaitable[None]]


def _micro(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ElectionConfig:
    namespace: str
    name: str = "orchestrator-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry_period < renew_deadline < lease_duration"
            )


class LeaderElector:
    def __init__(
        self,
        api: KubeApi,
        config: ElectionConfig,
        identity: str,
        *,
        on_started: Callback,
        on_stopped: Callback,
        clock: Clock | None = None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        may_acquire: Callable[[], bool] | None = None,
        round_lock: asyncio.Lock | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.identity = identity
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.clock = clock or MonotonicClock()
        self.wall = wall
        self.may_acquire = may_acquire
        self.leading = False
        self._observed: tuple[Any, ...] | None = None  # the other holder's record, as seen
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self._own: dict[str, Any] | None = None  # the Lease as this replica last wrote it
        self._starting: asyncio.Task[None] | None = None
        #: a round (read, maybe write, start/stop) and a release never interleave; electors
        #: sharing one lock see each other's outcome in ``may_acquire``
        self._round = round_lock or asyncio.Lock()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Acquire, lead, renew; step down when renewals fail; forever (cancel to stop)."""
        try:
            while True:
                self._raise_if_start_failed()
                async with self._round:
                    held = await self._try()
                    now = self.clock.now()
                    if held:
                        self._renewed_at = now
                        if not self.leading:
                            self.leading = True
                            log.info(
                                "%s: started leading (lease %s)", self.identity, self.config.name
                            )
                            self._starting = asyncio.ensure_future(self.on_started())
                    elif self.leading and now - self._renewed_at >= self.config.renew_deadline:
                        await self._stop("could not renew the lease within the renew deadline")
                await self.clock.sleep(self.config.retry_period)
        finally:
            if self.leading:
                await self._stop("shutting down")

    async def release(self) -> None:
        """Step down: stop the work, then empty the holder so a standby takes over at once."""
        async with self._round:
            if not self.leading:
                return
            await self._stop("released the lease")
            try:
                lease = await self.api.get_lease(self.config.namespace, self.config.name)
                if lease is not None and _holder(lease) == self.identity:
                    lease["spec"] = {**lease["spec"], "holderIdentity": None}
                    await self.api.replace_lease(self.config.namespace, lease)
            except KubeApiError:  # the Lease then expires as if this replica had died
                log.warning("%s: could not release the lease", self.identity, exc_info=True)

    def live_holder(self) -> str | None:
        """Who holds the Lease as this replica last saw it: itself while leading, else the
        other holder while its record keeps changing within ``lease_duration`` (own clock)."""
        if self.leading:
            return self.identity
        if self._observed is None:
            return None
        holder = self._observed[0]
        if not holder or holder == self.identity:
            return None
        fresh = self.clock.now() - self._observed_at < self.config.lease_duration
        return str(holder) if fresh else None

    async def _stop(self, why: str) -> None:
        self.leading = False
        self._own = None
        log.warning("%s: stopped leading: %s", self.identity, why)
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        await self.on_stopped()

    def _raise_if_start_failed(self) -> None:
        """A failed ``on_started`` ends :meth:`run` with its error, as if it had been awaited."""
        starting = self._starting
        if starting is not None and starting.done() and not starting.cancelled():
            error = starting.exception()
            if error is not None:
                raise error

    # ------------------------------------------------------------------ one round

    async def _try(self) -> bool:
        """One acquire-or-renew round; True when this replica holds the lease after it."""
        own, self._own = self._own, None
        if self.leading and own is not None:
            try:  # the optimistic renewal: one write, no read
                self._own = await self._replace(self._take(own, self.identity))
                return True
            except ConflictError:
                pass  # written by someone else since: read it and decide again, now
            except KubeApiError:
                log.warning("%s: lease renewal failed", self.identity, exc_info=True)
                return False
        try:
            lease = await self.api.get_lease(self.config.namespace, self.config.name)
            if lease is None:
                if self.may_acquire is not None and not self.may_acquire():
                    return False
                created = await self.api.create_lease(self.config.namespace, self._new())
                if created.created:
                    self._own = created.object
                return created.created
            holder = _holder(lease)
            record = (holder, lease["spec"].get("renewTime"), lease["spec"].get("leaseTransitions"))
            now = self.clock.now()
            if record != self._observed:
                self._observed, self._observed_at = record, now
            fresh = now - self._observed_at < self.config.lease_duration
            if holder and holder != self.identity and fresh:
                return False  # held by another replica that keeps renewing
            if holder != self.identity and self.may_acquire is not None and not self.may_acquire():
                return False  # free, but not ours to take (more than our share)
            self._own = await self._replace(self._take(lease, holder))
            return True
        except ConflictError:
            return False  # another replica wrote first: look again next round
        except KubeApiError:
            log.warning("%s: lease round failed", self.identity, exc_info=True)
            return False

    async def _replace(self, lease: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.api.replace_lease(self.config.namespace, lease))

    def _new(self) -> dict[str, Any]:
        now = _micro(self.wall())
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.config.name, "namespace": self.config.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.config.lease_duration),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }

    def _take(self, lease: dict[str, Any], holder: str | None) -> dict[str, Any]:
        now = _micro(self.wall())
        spec = dict(lease["spec"])
        if holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec |= {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.config.lease_duration),
            "renewTime": now,
        }
        return {**lease, "spec": spec}  # metadata keeps the resourceVersion: the precondition


def _holder(lease: dict[str, Any]) -> str | None:
    holder = (lease.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None

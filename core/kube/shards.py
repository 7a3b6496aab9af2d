"""Horizontal shards: each operator replica works the TaskExecutions of the shards it holds.

One Lease (:mod:`core.kube.leader`) lets one replica work while the others wait. With
``shards: S`` the work is cut into S fixed shards, each its own Lease ``<name>-shard-<i>``
taken with the same :class:`~core.kube.leader.LeaderElector`, so a shard changes hands under
the rules already proven for the single Lease: every write carries the resourceVersion it
read, a holder stops acting when it could not renew within ``renew_deadline`` (before the
Lease may expire), expiry is judged on the taker's own clock, and a release stops the work
before it empties the holder. Two replicas therefore never act on one shard at once.

Which shard a TaskExecution is in: :func:`shard_of` its ``metadata.uid``, a sha256 taken
modulo S. The uid is the task's identity everywhere else (``core.identity.TaskKey``, the DB
rows, the Job names, the ledger), so the deletion sweep can split the database's unfinished
tasks by shard too, and a TaskExecution deleted and created again under the same name is a
new task, as it is for the rest of the operator. sha256 because every replica must agree:
Python's ``hash()`` is salted per process. A ring (consistent hashing) is not needed: keys
never move between shards (S is fixed); shards move between replicas, and only those of the
replica that died or that holds more than its share.

The share: each replica also holds one member Lease ``<name>-member-<k>`` (k < S; a replica
that finds no free slot is a standby), so every replica sees the live members the way it sees
a Lease holder (its record changes within ``lease_duration`` of its own clock). A replica
takes a free shard only while it holds fewer than ceil(S / members) and no live member holds
fewer; it releases one shard per retry period while it holds more than ceil(S / members) or
two more than the poorest member: a replica that joins gets its share by release (at once),
the shards of one that died are taken once their Leases expire. All electors of one replica
share one round lock, so each sees the others' outcome when it asks whether it may take; the
price is that a replica's 2S Lease rounds run one after another (a GET, at most a PUT each),
which bounds S to a few dozen at a 2 s retry period. A slow round only delays renewals, and a
late renewal makes a holder stop early, never act late.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import replace
from functools import partial
from typing import Any

from core.kube.api import KubeApi
from core.kube.leader import ElectionConfig, LeaderElector
from core.kube.workqueue import Clock, MonotonicClock

log = logging.getLogger("orchestrator.shards")

ShardCallback = Callable[[int], Coroutine[Any, Any, None]]


def shard_of(uid: str, count: int) -> int:
    """The shard of a TaskExecution uid: the same on every replica, for any Python process."""
    digest = hashlib.sha256(uid.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_lease(name: str, shard: int) -> str:
    return f"{name}-shard-{shard}"


def member_lease(name: str, slot: int) -> str:
    return f"{name}-member-{slot}"


async def _nothing() -> None:
    return None


class ShardSet:
    """The shard and member Leases of one replica; ``on_started(i)`` / ``on_stopped(i)`` as
    it gains and loses shard i (``on_stopped`` returns once the shard's work has stopped)."""

    def __init__(
        self,
        api: KubeApi,
        election: ElectionConfig,
        count: int,
        identity: str,
        *,
        on_started: ShardCallback,
        on_stopped: ShardCallback,
        clock: Clock | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"shards must be at least 1, got {count}")
        self.count = count
        self.identity = identity
        self.config = election
        self.clock = clock or MonotonicClock()
        self.closing = False  # shutting down: take nothing more
        lock = asyncio.Lock()
        self.members = [
            LeaderElector(
                api,
                replace(election, name=member_lease(election.name, k)),
                identity,
                on_started=_nothing,
                on_stopped=_nothing,
                clock=self.clock,
                may_acquire=self._may_join,
                round_lock=lock,
            )
            for k in range(count)
        ]
        self.shards = [
            LeaderElector(
                api,
                replace(election, name=shard_lease(election.name, i)),
                identity,
                on_started=partial(on_started, i),
                on_stopped=partial(on_stopped, i),
                clock=self.clock,
                may_acquire=self._may_take,
                round_lock=lock,
            )
            for i in range(count)
        ]

    # ------------------------------------------------------------------ what this replica sees

    def held(self) -> list[int]:
        return [i for i, e in enumerate(self.shards) if e.leading]

    def member(self) -> bool:
        return any(m.leading for m in self.members)

    def live_members(self) -> set[str]:
        return {h for h in (m.live_holder() for m in self.members) if h is not None}

    def counts(self) -> dict[str, int]:
        """Shards held per live member (0 for a member holding none)."""
        live = self.live_members()
        seen = Counter(h for h in (e.live_holder() for e in self.shards) if h in live)
        return {m: seen.get(m, 0) for m in live}

    def fair_share(self) -> int:
        return math.ceil(self.count / max(1, len(self.live_members())))

    def _may_join(self) -> bool:
        return not self.closing and not self.member()

    def _may_take(self) -> bool:
        if self.closing or not self.member():
            return False  # a standby beyond the member slots
        held = len(self.held())
        counts = self.counts()
        return held < self.fair_share() and held <= min(counts.values(), default=0)

    def surplus(self) -> int | None:
        """A shard this replica should give away now, or None."""
        held = self.held()
        if not held or not self.member():
            return None
        counts = self.counts()
        poorest = min(counts.values(), default=len(held))
        if len(held) > self.fair_share() or len(held) >= poorest + 2:
            return held[-1]
        return None

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """All Leases and the rebalancing, until cancelled (held shards are then stopped)."""
        async with asyncio.TaskGroup() as group:
            for elector in (*self.members, *self.shards):
                group.create_task(elector.run())
            group.create_task(self._rebalance())

    async def _rebalance(self) -> None:
        while True:
            await self.clock.sleep(self.config.retry_period)
            shard = self.surplus()
            if shard is not None:
                log.info(
                    "%s: releasing shard %d (holds %d, members %d)",
                    self.identity,
                    shard,
                    len(self.held()),
                    len(self.live_members()),
                )
                await self.shards[shard].release()

    async def release(self) -> None:
        """Graceful shutdown: every shard's work stops, its Lease is emptied, then the
        member slot: the other replicas take the shards at once."""
        self.closing = True
        for elector in self.shards:
            await elector.release()
        for elector in self.members:
            await elector.release()

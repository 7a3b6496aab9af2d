"""Horizontal shards (core/kube/shards.py, the sharded control loop) on the fake API, fake time.

Every replica is its own client (:class:`FakeKubeApi`) of one fake API server, so a fault
injected into one replica's Lease calls (a partition) leaves the others alone. Time is a
:class:`FakeClock`: the lease durations pass without sleeping and the outcome does not depend
on the machine's load.

The loop tests run the real :class:`ControlLoop` (informers, work queue, workers, shards)
with a small controller whose one action is the operator's own kind of action: a status write
preconditioned on the resourceVersion it read (the status writer's rule), which completes the
TaskExecution. What is asserted is what the API server saw (one completing write per
TaskExecution) and a ledger of every sync's start and end on the fake clock: no key is ever
synced by two replicas at once, across joins, crashes and partitions.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from core.errors import ConflictError
from core.kube.api import Body
from core.kube.control_loop import ControlLoop
from core.kube.leader import ElectionConfig
from core.kube.shards import ShardSet, shard_lease, shard_of
from core.kube.watch_cache import Key, WatchCache
from core.testing.clock import FakeClock
from core.testing.fake_kube import FakeApiServer, FakeKubeApi

NS = "ops"
CONFIG = ElectionConfig(NS, "op", lease_duration=15, renew_deadline=10, retry_period=2)


def run(test):  # type: ignore[no-untyped-def]
    return lambda: asyncio.run(test())


def client(server: FakeApiServer) -> FakeKubeApi:
    return FakeKubeApi(server)


async def _nothing(_: int) -> None:
    return None


class Member:
    """A replica's ShardSet, recording when each of its shards starts and stops."""

    def __init__(self, server: FakeApiServer, clock: FakeClock, identity: str, shards: int) -> None:
        self.api = client(server)
        self.log: list[tuple[float, str, int]] = []

        async def started(i: int) -> None:
            self.log.append((clock.now(), "started", i))

        async def stopped(i: int) -> None:
            self.log.append((clock.now(), "stopped", i))

        self.set = ShardSet(
            self.api,
            CONFIG,
            shards,
            identity,
            on_started=started,
            on_stopped=stopped,
            clock=clock,
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.set.run())

    async def crash(self) -> None:
        """Gone without a word (SIGKILL): no release, no on_stopped."""
        assert self.task is not None
        for elector in self.set.shards:
            elector.on_stopped = _done
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _done() -> None:
    return None


async def holders(server: FakeApiServer, count: int) -> list[str | None]:
    api = client(server)
    out = []
    for i in range(count):
        lease = await api.get_lease(NS, shard_lease("op", i))
        out.append(None if lease is None else lease["spec"].get("holderIdentity"))
    return out


def held(members: list[Member]) -> list[int]:
    return [len(m.set.held()) for m in members]


def assert_one_holder_at_a_time(members: list[Member]) -> None:
    """From the start/stop logs: no shard is ever worked by two replicas at once."""
    events = sorted(
        (t, 0 if what == "stopped" else 1, shard, n)
        for n, m in enumerate(members)
        for t, what, shard in m.log
    )
    working: dict[int, int] = {}
    for _, starting, shard, n in events:
        if starting:
            assert shard not in working, f"shard {shard} started by {n} while {working[shard]}"
            working[shard] = n
        else:
            assert working.pop(shard) == n


def test_the_shard_of_a_uid_is_stable_and_spreads() -> None:
    uids = [f"0f7c1a2e-{i:04d}-4c1e-9a7b-{i:012d}" for i in range(4000)]
    shards = Counter(shard_of(uid, 4) for uid in uids)
    assert sorted(shards) == [0, 1, 2, 3]
    assert min(shards.values()) > 850  # 1000 each, give or take
    assert shard_of(uids[0], 4) == shard_of(str(uids[0]), 4)
    # sha256, not the per-process salted hash(): a known value pins it across processes
    assert shard_of("abc", 1000) == int.from_bytes(bytes.fromhex("ba7816bf8f01cfea"), "big") % 1000


@run
async def test_two_replicas_split_the_shards_evenly() -> None:
    server, clock = FakeApiServer(namespaces=(NS,)), FakeClock()
    a, b = Member(server, clock, "a", 4), Member(server, clock, "b", 4)
    a.start()
    await clock.run_for(5, 0.5)
    assert held([a]) == [4]  # alone: all of them
    b.start()
    await clock.run_for(3 * CONFIG.retry_period + 1, 0.5)  # by release, not by expiry
    assert held([a, b]) == [2, 2]
    assert sorted(await holders(server, 4)) == ["a", "a", "b", "b"]
    await clock.run_for(60, 0.5)  # and it stays so
    assert held([a, b]) == [2, 2]
    assert_one_holder_at_a_time([a, b])


@run
async def test_three_replicas_split_six_shards_two_each() -> None:
    server, clock = FakeApiServer(namespaces=(NS,)), FakeClock()
    members = [Member(server, clock, name, 6) for name in ("a", "b", "c")]
    for m in members:
        m.start()
    await clock.run_for(40, 0.5)
    assert held(members) == [2, 2, 2]
    assert Counter(await holders(server, 6)) == {"a": 2, "b": 2, "c": 2}
    assert_one_holder_at_a_time(members)


@run
async def test_a_joining_replica_gets_its_share_by_release() -> None:
    server, clock = FakeApiServer(namespaces=(NS,)), FakeClock()
    a, b = Member(server, clock, "a", 4), Member(server, clock, "b", 4)
    a.start()
    b.start()
    await clock.run_for(20, 0.5)
    assert held([a, b]) == [2, 2]
    c = Member(server, clock, "c", 4)
    c.start()
    # within a few retry periods, far less than a lease duration: nobody waited for expiry
    await clock.run_for(4 * CONFIG.retry_period, 0.5)
    assert sorted(held([a, b, c])) == [1, 1, 2] and c.set.held()
    await clock.run_for(60, 0.5)
    assert sorted(held([a, b, c])) == [1, 1, 2]
    assert_one_holder_at_a_time([a, b, c])


@run
async def test_a_crashed_replicas_shards_are_taken_only_after_they_expire() -> None:
    server, clock = FakeApiServer(namespaces=(NS,)), FakeClock()
    a, b = Member(server, clock, "a", 4), Member(server, clock, "b", 4)
    a.start()
    b.start()
    await clock.run_for(20, 0.5)
    assert held([a, b]) == [2, 2]
    theirs = set(b.set.held())
    await b.crash()
    crashed_at = clock.now()
    await clock.run_for(CONFIG.lease_duration - 2, 0.5)
    assert held([a]) == [2] and not theirs & set(a.set.held())
    await clock.run_for(3 * CONFIG.lease_duration, 0.5)
    assert held([a]) == [4] and await holders(server, 4) == ["a"] * 4
    taken = [t for t, what, i in a.log if what == "started" and i in theirs and t >= crashed_at]
    assert len(taken) == 2 and min(taken) >= crashed_at + CONFIG.lease_duration


@run
async def test_a_graceful_shutdown_hands_the_shards_over_at_once() -> None:
    server, clock = FakeApiServer(namespaces=(NS,)), FakeClock()
    a, b = Member(server, clock, "a", 4), Member(server, clock, "b", 4)
    a.start()
    b.start()
    await clock.run_for(20, 0.5)
    await b.set.release()
    assert b.set.held() == [] and ("stopped" in [w for _, w, _ in b.log])
    assert b.task is not None
    b.task.cancel()
    await asyncio.gather(b.task, return_exceptions=True)
    await clock.run_for(2 * CONFIG.retry_period + 1, 0.5)
    assert held([a]) == [4]
    assert_one_holder_at_a_time([a, b])


# ---------------------------------------------------------------------- the sharded loop


class Ledger:
    """Every sync's start and end, on the fake clock, by replica and key."""

    def __init__(self) -> None:
        self.active: dict[Key, str] = {}
        self.overlaps: list[tuple[Key, str, str]] = []
        self.synced: dict[Key, list[str]] = {}
        self.completed: Counter[Key] = Counter()

    def begin(self, replica: str, key: Key) -> None:
        other = self.active.get(key)
        if other is not None:
            self.overlaps.append((key, other, replica))
        self.active[key] = replica
        self.synced.setdefault(key, []).append(replica)

    def end(self, replica: str, key: Key) -> None:
        if self.active.get(key) == replica:
            del self.active[key]


class Completing:
    """The controller's seam as the loop uses it. One sync takes ``work`` seconds of the fake
    clock, then completes its TaskExecution with a status write preconditioned on the
    resourceVersion it read (a stale copy gets a 409: no action), as the status writer does."""

    def __init__(
        self, api: FakeKubeApi, clock: FakeClock, name: str, ledger: Ledger, work: float
    ) -> None:
        self.api, self.clock, self.name, self.ledger, self.work = api, clock, name, ledger, work
        self.cache = WatchCache()
        self.swept: list[int] = []

    def observe_task(self, type_: str, body: Body) -> list[Key]:
        return self.cache.observe_task(type_, body)

    def observe_adapter(self, type_: str, body: Body) -> list[Key]:
        return self.cache.observe_adapter(type_, body)

    def observe_job(self, type_: str, body: Body) -> list[Key]:
        return self.cache.observe_job(type_, body)

    def unfinished_keys(self) -> list[Key]:
        return self.cache.unfinished_keys()

    def repair_logs(self) -> tuple[int, int]:
        return 0, 0  # it writes no logs

    async def sweep(self, namespaces: tuple[str, ...], owns: Callable[[str], bool]) -> int:
        self.swept.append(sum(1 for uid in self.cache.live_uids() if owns(uid)))
        return 0

    async def report_error(self, key: Key, error: BaseException) -> None:
        return None

    async def sync(self, key: Key) -> float | None:
        te = self.cache.tasks.get((key[1], key[2]))
        if te is None:
            return None
        self.ledger.begin(self.name, key)
        try:
            await self.clock.sleep(self.work)
            rv = te["metadata"]["resourceVersion"]
            try:
                await self.api.patch_status(
                    "taskexecutions",
                    key[1],
                    key[2],
                    {"state": "COMPLETED"},
                    resource_version=rv,
                )
            except ConflictError:
                return None  # changed since it was read: someone else acted
            self.ledger.completed[key] += 1
            return None
        finally:
            self.ledger.end(self.name, key)


class Replica:
    def __init__(
        self,
        server: FakeApiServer,
        clock: FakeClock,
        name: str,
        ledger: Ledger,
        *,
        shards: int = 4,
        work: float = 1.0,
    ) -> None:
        self.api = client(server)
        self.controller = Completing(self.api, clock, name, ledger, work)
        self.loop = ControlLoop(
            self.controller,  # type: ignore[arg-type]
            self.api,
            namespaces=(NS,),
            workers=4,
            resync_seconds=3600,
            election=CONFIG,
            identity=name,
            clock=clock,
            shards=shards,
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.loop.run())

    async def crash(self) -> None:
        """SIGKILL: the process and its work are gone at once, nothing released."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def create_tasks(server: FakeApiServer, count: int) -> None:
    api = client(server)
    for i in range(count):
        body: dict[str, Any] = {
            "apiVersion": "orchestrator.dev/v1alpha1",
            "kind": "TaskExecution",
            "metadata": {"name": f"t-{i:03d}"},
            "spec": {"runId": "r", "adapterRef": {"name": "x"}, "task": {"prompt": "p"}},
        }
        await api.create_object("taskexecutions", NS, body)


async def states(server: FakeApiServer) -> Counter[str]:
    items = await client(server).list_objects("taskexecutions", NS)
    return Counter((te.get("status") or {}).get("state", "PENDING") for te in items)


@run
async def test_two_sharded_replicas_split_the_tasks_with_no_double_action() -> None:
    server, clock, ledger = FakeApiServer(namespaces=(NS,)), FakeClock(), Ledger()
    a, b = Replica(server, clock, "a", ledger), Replica(server, clock, "b", ledger)
    a.start()
    b.start()
    await clock.run_for(20, 0.5)  # the shards are split before the burst
    assert sorted([len(a.loop.shards.held()), len(b.loop.shards.held())]) == [2, 2]  # type: ignore[union-attr]
    await create_tasks(server, 120)
    await clock.run_for(120, 0.5)
    assert await states(server) == {"COMPLETED": 120}
    assert len(ledger.completed) == 120 and set(ledger.completed.values()) == {1}
    assert ledger.overlaps == []
    by = Counter(replica for syncs in ledger.synced.values() for replica in syncs)
    assert by["a"] > 20 and by["b"] > 20  # both worked
    assert all(len(syncs) == 1 for syncs in ledger.synced.values())  # once, by its holder


@run
async def test_a_crash_and_a_join_mid_burst_never_sync_a_key_twice_at_once() -> None:
    server, clock, ledger = FakeApiServer(namespaces=(NS,)), FakeClock(), Ledger()
    a = Replica(server, clock, "a", ledger, work=3.0)
    b = Replica(server, clock, "b", ledger, work=3.0)
    a.start()
    b.start()
    await clock.run_for(20, 0.5)
    await create_tasks(server, 100)
    await clock.run_for(10, 0.5)  # mid-burst
    await b.crash()
    c = Replica(server, clock, "c", ledger, work=3.0)
    c.start()
    await clock.run_for(240, 0.5)
    assert await states(server) == {"COMPLETED": 100}
    assert set(ledger.completed.values()) == {1} and len(ledger.completed) == 100
    assert ledger.overlaps == []
    assert {r for syncs in ledger.synced.values() for r in syncs} == {"a", "b", "c"}


@run
async def test_a_partitioned_replica_stops_before_its_shards_pass_on() -> None:
    """b can reach the API server for everything but its Leases (it keeps syncing as long as
    it may): a takes b's shards only after b stopped, and no key is synced by both at once."""
    server, clock, ledger = FakeApiServer(namespaces=(NS,)), FakeClock(), Ledger()
    a = Replica(server, clock, "a", ledger, work=4.0)
    b = Replica(server, clock, "b", ledger, work=4.0)
    a.start()
    b.start()
    await clock.run_for(20, 0.5)
    await create_tasks(server, 80)
    await clock.run_for(4, 0.5)
    b.api.fail("get", "leases", times=None, status=503)
    b.api.fail("update", "leases", times=None, status=503)
    await clock.run_for(200, 0.5)
    assert b.loop.shards is not None and b.loop.shards.held() == []
    assert a.loop.shards is not None and len(a.loop.shards.held()) == 4
    assert await states(server) == {"COMPLETED": 80}
    assert set(ledger.completed.values()) == {1} and ledger.overlaps == []
    assert {r for syncs in ledger.synced.values() for r in syncs} == {"a", "b"}


def test_shards_need_leases() -> None:
    api = client(FakeApiServer(namespaces=(NS,)))
    controller = Completing(api, FakeClock(), "a", Ledger(), 1.0)
    try:
        ControlLoop(controller, api, namespaces=(NS,), shards=2)  # type: ignore[arg-type]
    except ValueError as exc:
        assert "leader election" in str(exc)
    else:
        raise AssertionError("shards without leader election were accepted")
    unsharded = ControlLoop(controller, api, namespaces=(NS,), election=CONFIG)  # type: ignore[arg-type]
    assert unsharded.shards is None  # shards off by default: the single Lease, as before

"""Leader election on a Lease (core/kube/leader.py) against the fake API server, fake time.

The fake API server is held to the real one by tests/e2e/test_kube_api_contract.py (Lease
create/replace with a resourceVersion precondition included); time is a FakeClock, so the
lease durations below pass without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from core.kube.api import ApiCall
from core.kube.leader import ElectionConfig, LeaderElector
from core.testing.clock import FakeClock
from core.testing.fake_kube import FakeKubeApi

NS = "ops"
CONFIG = ElectionConfig(NS, "op-lease", lease_duration=15, renew_deadline=10, retry_period=2)


class Replica:
    def __init__(self, api: FakeKubeApi, clock: FakeClock, identity: str) -> None:
        self.events: list[str] = []

        async def started() -> None:
            self.events.append("started")

        async def stopped() -> None:
            self.events.append("stopped")

        self.elector = LeaderElector(
            api, CONFIG, identity, on_started=started, on_stopped=stopped, clock=clock
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.elector.run())

    async def crash(self) -> None:
        """Gone without a word (SIGKILL): no release, no on_stopped."""
        assert self.task is not None
        self.elector.on_stopped = _nothing
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _nothing() -> None:
    return None


async def holder(api: FakeKubeApi) -> str | None:
    lease = await api.get_lease(NS, "op-lease")
    return None if lease is None else lease["spec"].get("holderIdentity")


async def leader_a() -> tuple[FakeKubeApi, FakeClock, Replica, list[ApiCall]]:
    """Replica "a" leading alone, and the API calls made from then on."""
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a = Replica(api, clock, "a")
    a.start()
    await clock.run_for(1, 0.5)
    calls: list[ApiCall] = []
    api.add_observer(calls.append)
    return api, clock, a, calls


async def edit_lease(api: FakeKubeApi, edit: Callable[[dict[str, Any]], None]) -> None:
    """A write of the Lease by someone else."""
    lease = await api.get_lease(NS, "op-lease")
    assert lease is not None
    edit(lease)
    await api.replace_lease(NS, lease)


def run(test):  # type: ignore[no-untyped-def]
    return lambda: asyncio.run(test())


@run
async def test_one_replica_leads_and_the_other_waits() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a, b = Replica(api, clock, "a"), Replica(api, clock, "b")
    a.start()
    await clock.run_for(1, 0.5)
    b.start()
    await clock.run_for(60, 0.5)
    assert await holder(api) == "a"
    assert a.elector.leading and not b.elector.leading
    assert a.events == ["started"] and b.events == []


@run
async def test_a_crashed_leader_is_replaced_once_its_lease_expires_on_our_clock() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a, b = Replica(api, clock, "a"), Replica(api, clock, "b")
    a.start()
    await clock.run_for(1, 0.5)
    b.start()
    await clock.run_for(10, 0.5)
    await a.crash()
    await clock.run_for(10, 0.5)  # the lease is not yet expired as b observes it
    assert await holder(api) == "a" and not b.elector.leading
    await clock.run_for(10, 0.5)
    assert await holder(api) == "b" and b.events == ["started"]
    lease = await api.get_lease(NS, "op-lease")
    assert lease is not None and lease["spec"]["leaseTransitions"] == 1


@run
async def test_stepping_down_lets_the_standby_take_over_at_once() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a, b = Replica(api, clock, "a"), Replica(api, clock, "b")
    a.start()
    await clock.run_for(1, 0.5)
    b.start()
    await clock.run_for(4, 0.5)
    await a.elector.release()
    assert a.events == ["started", "stopped"]
    assert a.task is not None
    a.task.cancel()
    await asyncio.gather(a.task, return_exceptions=True)
    await clock.run_for(3, 0.5)  # one retry period, not a lease duration
    assert await holder(api) == "b" and b.elector.leading


@run
async def test_a_leader_that_cannot_renew_stops_before_anyone_may_take_over() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a = Replica(api, clock, "a")
    a.start()
    await clock.run_for(4, 0.5)
    assert a.elector.leading
    api.fail(None, "leases", times=None, status=503)  # the API server is unreachable
    await clock.run_for(CONFIG.renew_deadline + CONFIG.retry_period, 0.5)
    assert a.events == ["started", "stopped"] and not a.elector.leading


@run
async def test_a_leader_renews_with_one_write_per_round_and_no_read() -> None:
    api, clock, _, calls = await leader_a()
    await clock.run_for(10 * CONFIG.retry_period, 0.5)
    lease_calls = [(c.verb, c.status) for c in calls if c.resource == "leases"]
    assert lease_calls == [("update", 200)] * 10
    lease = await api.get_lease(NS, "op-lease")
    assert lease is not None and lease["spec"]["holderIdentity"] == "a"
    assert lease["spec"]["leaseTransitions"] == 0


@run
async def test_a_renewal_that_meets_a_conflict_reads_the_lease_and_decides_again() -> None:
    api, clock, a, calls = await leader_a()
    # a write a cannot know of
    await edit_lease(api, lambda lease: lease["metadata"].update(labels={"edited-by": "x"}))
    calls.clear()
    await clock.run_for(CONFIG.retry_period, 0.5)
    lease_calls = [(c.verb, c.status) for c in calls if c.resource == "leases"]
    assert lease_calls == [("update", 409), ("get", 200), ("update", 200)]
    assert a.elector.leading and a.events == ["started"]
    lease = await api.get_lease(NS, "op-lease")
    assert lease is not None and lease["metadata"]["labels"] == {"edited-by": "x"}


@run
async def test_a_leader_whose_lease_was_taken_meanwhile_stops_leading() -> None:
    api, clock, a, _ = await leader_a()
    # e.g. an operator of another version
    await edit_lease(api, lambda lease: lease["spec"].update(holderIdentity="intruder"))
    await clock.run_for(CONFIG.renew_deadline + CONFIG.retry_period, 0.5)
    assert a.events == ["started", "stopped"] and not a.elector.leading
    assert await holder(api) == "intruder"


@run
async def test_two_replicas_starting_together_elect_exactly_one() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    replicas = [Replica(api, clock, f"r{i}") for i in range(4)]
    for r in replicas:
        r.start()
    await clock.run_for(30, 0.5)
    leaders = [r for r in replicas if r.elector.leading]
    assert len(leaders) == 1 and await holder(api) == leaders[0].elector.identity


@run
async def test_a_slow_start_keeps_renewing_so_a_later_replica_cannot_take_over() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a, b = Replica(api, clock, "a"), Replica(api, clock, "b")
    slow = asyncio.Event()

    async def started() -> None:
        a.events.append("starting")
        await slow.wait()  # informer sync and the sweep, three lease durations long
        a.events.append("started")

    a.elector.on_started = started
    a.start()
    await clock.run_for(1, 0.5)
    b.start()
    await clock.run_for(3 * CONFIG.lease_duration, 0.5)
    assert await holder(api) == "a" and not b.elector.leading and b.events == []
    slow.set()
    await clock.run_for(1, 0.5)
    assert a.events == ["starting", "started"] and a.elector.leading


@run
async def test_stepping_down_while_starting_cancels_the_start() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a = Replica(api, clock, "a")

    async def started() -> None:
        a.events.append("starting")
        await asyncio.Event().wait()

    a.elector.on_started = started
    a.start()
    await clock.run_for(1, 0.5)
    await a.elector.release()
    assert a.events == ["starting", "stopped"] and await holder(api) is None
    assert a.elector._starting is None


@run
async def test_a_start_that_fails_ends_the_election_with_its_error() -> None:
    api, clock = FakeKubeApi(namespaces=(NS,)), FakeClock()
    a = Replica(api, clock, "a")

    async def started() -> None:
        raise RuntimeError("the database is gone")

    a.elector.on_started = started
    a.start()
    await clock.run_for(CONFIG.retry_period * 2, 0.5)
    assert a.task is not None and a.task.done()
    with pytest.raises(RuntimeError, match="the database is gone"):
        a.task.result()
    assert a.events == ["stopped"] and not a.elector.leading


def test_the_timings_must_leave_room_to_step_down() -> None:
    with pytest.raises(ValueError, match="retry_period < renew_deadline < lease_duration"):
        ElectionConfig(NS, lease_duration=10, renew_deadline=10, retry_period=2)

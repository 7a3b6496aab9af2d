"""The controller with many objects, on the fake API server (issue 17): what it costs to wait.

The control loop runs as in the operator, on a fake clock, so resync periods pass without
sleeping; the assertions are on the API calls the fake API server saw and on the work queue.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.kube import task_context
from core.kube.api import ApiCall
from core.kube.control_loop import ControlLoop
from core.kube.reconciler import PENDING_POLL_SECONDS
from core.models import TaskState
from core.testing.clock import FakeClock
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import adapter, demo_patch, task_execution
from tests.fake_controller import NS, driven_controller, fake_controller

TE = "taskexecutions"


class ShiftedClock:
    """Real time plus an offset the test moves forward (the API server's and the controller's)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def _settle(loop: ControlLoop, clock: FakeClock, rounds: int = 400) -> None:
    """Let the workers run until the queue is empty (the database work runs in threads)."""
    for _ in range(rounds):
        await clock.settle()
        if not len(loop.queue) and not loop.queue.in_progress():
            await asyncio.sleep(0.01)
            if not len(loop.queue) and not loop.queue.in_progress():
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the queue did not drain: {len(loop.queue)} ready")


def test_parked_tasks_cost_no_api_call_per_resync_and_start_once_their_adapter_exists(
    tmp_path: Path,
) -> None:
    n = 60
    calls: list[ApiCall] = []

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        clock = FakeClock()
        controller = fake_controller(api, tmp_path)
        task = {"prompt": "p", "patch": demo_patch("add-multiply")}
        for i in range(n):
            await api.create_object(
                TE, NS, task_execution(f"t-{i:03d}", "git://x/y.git", "absent", task=task)
            )
        loop = ControlLoop(
            controller, api, namespaces=(NS,), resync_seconds=30, workers=8, clock=clock
        )
        driver = asyncio.create_task(loop.run())
        await loop.synced()
        await _settle(loop, clock)
        parked = await api.list_objects(TE, NS)
        assert Counter((t.get("status") or {}).get("reason") for t in parked) == {
            "AdapterNotFound": n
        }

        api.add_observer(calls.append)  # from here on: what waiting costs
        syncs: list[str] = []
        controller.add_observer(lambda kind, name, _s: syncs.append(kind))
        for _ in range(5):  # five resync periods
            clock.advance(30)
            await _settle(loop, clock)
        assert calls == [], "waiting for a missing Adapter must cost no API call"
        assert "sync" not in syncs, "a parked task whose inputs did not change is not synced"

        # the Adapter appears: each waiting task starts (one Job each), without a resync
        await api.create_object("adapters", NS, adapter("absent", "patch"))
        await _settle(loop, clock)
        for _ in range(3):  # the deferred halves of the starts (LOW lane) follow
            clock.advance(1)
            await _settle(loop, clock)
        jobs = await api.list_jobs(NS)
        assert len(jobs) == n
        made = Counter(c.name for c in calls if c.verb == "create" and c.resource == "jobs")
        assert set(made.values()) == {1} and len(made) == n
        tes = await api.list_objects(TE, NS)
        assert Counter(t["status"]["state"] for t in tes) == {"IN_PROGRESS": n}
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)

    asyncio.run(main())
    started = [c for c in calls if c.verb == "create" and c.resource == "events"]
    assert len(started) == n  # one TASK_STARTED Event per task, after its Job


def test_a_burst_lists_no_pods_until_the_job_controller_counts_one(tmp_path: Path) -> None:
    """New Jobs whose status counts no pod cost no pod list (a burst of 1,000 cost ~400 on
    the cluster); a Job that counts one gets its pods looked at; and once the pending time is
    up every Job's pods are listed before its attempt ends as ``infrastructure``."""
    n = 12
    calls: list[ApiCall] = []

    def pod_lists() -> int:
        return sum(1 for c in calls if c.verb == "list" and c.resource == "pods")

    async def main() -> None:
        shifted = ShiftedClock()
        api = FakeKubeApi(namespaces=(NS,), now=shifted.now)
        clock = FakeClock()
        controller = fake_controller(api, tmp_path, shifted.now)
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        task = {"prompt": "p", "patch": demo_patch("add-multiply")}
        for i in range(n):
            await api.create_object(
                TE, NS, task_execution(f"t-{i:03d}", "git://x/y.git", "patch", task=task)
            )
        api.add_observer(calls.append)
        loop = ControlLoop(
            controller, api, namespaces=(NS,), resync_seconds=30, workers=8, clock=clock
        )
        driver = asyncio.create_task(loop.run())
        await loop.synced()
        for _ in range(4):  # the starts, their deferred halves, and two pending rechecks
            await _settle(loop, clock)
            clock.advance(PENDING_POLL_SECONDS)
        await _settle(loop, clock)  # the rechecks now due run before the Job changes
        jobs = await api.list_jobs(NS)
        assert len(jobs) == n
        tes = await api.list_objects(TE, NS)
        assert {t["status"]["state"] for t in tes} == {"IN_PROGRESS"}
        assert pod_lists() == 0

        # the Job controller counts a pod of one Job (not an event the controller is woken
        # by): at the next pending recheck, that Job's pods are looked at, no other's
        first = jobs[0]["metadata"]
        api.server.patch("jobs", NS, first["name"], {"status": {"active": 1}}, status=True)
        await _settle(loop, clock)
        clock.advance(PENDING_POLL_SECONDS)
        await _settle(loop, clock)
        assert pod_lists() == 1

        # the pending time is up (300 s by default): each Job's pods are listed (none), then
        # its attempt ends and its Job goes
        shifted.offset += timedelta(seconds=301)
        for _ in range(2):
            clock.advance(5)
            await _settle(loop, clock)
        assert pod_lists() >= 1 + n
        deleted = {c.name for c in calls if c.verb == "delete" and c.resource == "jobs"}
        assert deleted == {j["metadata"]["name"] for j in jobs}
        tes = await api.list_objects(TE, NS)
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        for te in tes:
            first_attempt = te["status"]["attempts"][0]
            assert first_attempt.get("failureClass") == "infrastructure", first_attempt
            assert "no pod was created within 300s" in first_attempt.get("message", ""), te

    asyncio.run(main())


def test_later_steps_skip_the_checks_until_the_task_or_an_adapter_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schema checks run once per generation of a TaskExecution and of its Adapters, and
    an Adapter version is parsed once for every task that names it; any change is seen at the
    next step."""
    checked: list[str] = []
    real = task_context.task_execution_problems

    def counting(te: Any, *args: Any) -> Any:
        checked.append(te["metadata"]["name"])
        return real(te, *args)

    monkeypatch.setattr(task_context, "task_execution_problems", counting)

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        controller, task = await driven_controller(api, tmp_path)
        te = (
            await api.create_object(
                TE, NS, task_execution("t", "git://x/y.git", "patch", task=task)
            )
        ).object
        controller.observe_task("ADDED", te)
        contexts = controller.contexts

        first = await contexts.build(te)
        second = await contexts.build(te)
        assert first is not None and second is not None and len(checked) == 1
        assert second.adapters["patch"] is first.adapters["patch"]  # parsed once, shared
        assert second.inputs == first.inputs and second.plan == first.plan

        # the Adapter changes: parsed again, and the new timeout is what the step sees
        changed = await api.patch_object("adapters", NS, "patch", {"spec": {"timeoutSeconds": 77}})
        controller.observe_adapter("MODIFIED", changed)
        third = await contexts.build(te)
        assert third is not None and len(checked) == 2
        assert third.adapters["patch"].timeout_seconds == 77

        # the Adapter becomes unusable (as a cache entry: the API server's CEL refuses it)
        broken = copy.deepcopy(changed)
        broken["spec"]["kind"] = "process"
        broken["metadata"]["resourceVersion"] = str(int(changed["metadata"]["resourceVersion"]) + 1)
        controller.observe_adapter("MODIFIED", broken)
        assert await contexts.build(te) is None and len(checked) == 3
        parked = await api.get_object(TE, NS, "t")
        assert parked is not None and parked["status"]["reason"] == "AdapterInvalid"

        # fixed again, then a new generation of the TaskExecution itself: parsed again each time
        fixed = await api.patch_object("adapters", NS, "patch", {"spec": {"timeoutSeconds": 78}})
        controller.observe_adapter("MODIFIED", fixed)
        assert await contexts.build(te) is not None and len(checked) == 4
        newer = {**te, "metadata": {**te["metadata"], "generation": 2}}
        assert await contexts.build(newer) is not None and len(checked) == 5

        # the task ends: nothing of it stays
        contexts.forget(te["metadata"]["uid"])
        assert await contexts.build(newer) is not None and len(checked) == 6

    asyncio.run(main())


def test_a_start_creates_its_job_before_any_database_write_and_its_record_follows(
    tmp_path: Path,
) -> None:
    """The burst's critical path (issue 17): a new task's first step reads the database and
    creates its Job, but writes no row; the deferred half inserts the row and records the
    start. A TaskExecution deleted in between is still recorded, CANCELLED, like one deleted
    after its row was written."""

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        controller, task = await driven_controller(api, tmp_path)
        keys = {}
        for name in ("kept", "deleted"):
            made = await api.create_object(
                TE, NS, task_execution(name, "git://x/y.git", "patch", task=task)
            )
            (keys[name],) = controller.observe_task("ADDED", made.object)
        for key in keys.values():
            await controller.sync(key)
        jobs = await api.list_jobs(NS)
        assert sorted(j["metadata"]["ownerReferences"][0]["name"] for j in jobs) == [
            "deleted",
            "kept",
        ]
        assert controller.store.tasks("e2e") == []  # nothing written before the Jobs

        body = await api.get_object(TE, NS, "deleted")
        assert body is not None
        await api.delete_object(TE, NS, "deleted")
        for key in controller.observe_task("DELETED", body):
            await controller.sync(key)
        await controller.sync(keys["kept"])  # the deferred half of its start

        records = {r.key.task_id: r for r in controller.store.tasks("e2e")}
        assert records["kept"].status is TaskState.IN_PROGRESS
        assert records["kept"].attempts == 1
        assert records["deleted"].status is TaskState.CANCELLED
        kept = await api.get_object(TE, NS, "kept")
        assert kept is not None and kept["status"]["state"] == "IN_PROGRESS"

    asyncio.run(main())

"""spec.queueName through the controller on the fake API: the Jobs wait for a queue.

The control loop runs on FakeKubeApi + FakeKubelet (the real runner, examples/demo's
repository, SQLite); the test plays Kueue's part by resuming a suspended Job. The clock of
the API server and the controller is shared and jumps forward, so "two hours in the queue"
takes no real time. A real Kueue is tests/e2e/test_kueue.py.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.identity import TaskKey
from core.kube.control_loop import ControlLoop
from core.kube.queueing import QUEUE_LABEL
from core.kube.reconciler import Controller, ControllerSettings
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.e2e.operator_harness import DEMO, adapter, demo_patch, task_execution
from tests.local_evidence import serve_local_evidence

NS = "queued"
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}


class ShiftedClock:
    """Real time plus an offset the test moves forward (shared by server and controller)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.bare = tmp_path / "calc.git"
        subprocess.run(
            ["git", "clone", "-q", "--bare", str(DEMO / "repos/calc.bundle"), str(self.bare)],
            check=True,
            capture_output=True,
        )
        self.tmp_path = tmp_path
        self.workdir = tmp_path / "operator"
        self.workdir.mkdir()
        url = default_url(self.workdir)
        upgrade(url)
        self.store = Store(make_engine(url))
        self.clock = ShiftedClock()
        self.api = FakeKubeApi(namespaces=(NS,), now=self.clock.now)
        self.syncs = 0

    def count(self, kind: str, _name: str, _seconds: float) -> None:
        if kind == "sync":
            self.syncs += 1

    async def until(self, name: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The TaskExecution once ``done`` holds for it (watched, no polling)."""
        te = await self.api.get_object("taskexecutions", NS, name)
        assert te is not None
        if done(te):
            return te
        since = te["metadata"]["resourceVersion"]
        async for event in self.api.watch(
            "taskexecutions", NS, resource_version=since, timeout_seconds=300
        ):
            if event.object["metadata"]["name"] == name and done(event.object):
                return event.object
        raise AssertionError(f"{name}: the awaited state never came")

    async def resyncs(self, n: int) -> None:
        """Until the controller looked at its keys ``n`` more times (resync every second)."""
        target = self.syncs + n
        for _ in range(600):
            if self.syncs >= target:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the controller did not look again")


def _status(te: dict[str, Any]) -> dict[str, Any]:
    return te.get("status") or {}


def _queued(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda te: _status(te).get("state") == state and _status(te).get("reason") == "Queued"


def _finished(te: dict[str, Any]) -> bool:
    return _status(te).get("state") in TERMINAL


def test_a_queued_task_waits_uncharged_until_admitted_then_completes(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        api = h.api
        evidence, server = await serve_local_evidence(h.workdir)
        settings = ControllerSettings(workdir=h.workdir, runner_image="unused", namespaces=(NS,))
        controller = Controller(api, h.store, settings, evidence=evidence, now=h.clock.now)
        controller.add_observer(h.count)
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        task = {"prompt": "Add mul.", "patch": demo_patch("add-multiply")}
        te = task_execution(
            "queued-task",
            h.bare.as_uri(),
            "patch",
            task=task,
            queueName="team-a",
            pendingTimeoutSeconds=60,
        )
        await api.create_object("taskexecutions", NS, te)
        seen: list[dict[str, Any]] = []  # each Job as first seen, and its queued TE status
        statuses: list[dict[str, Any]] = []
        async with FakeKubelet(api.server, h.tmp_path / "kubelet") as kubelet:
            loop = ControlLoop(controller, api, namespaces=(NS,), resync_seconds=1)
            driver = asyncio.create_task(loop.run())
            for state, role in (("IN_PROGRESS", "adapter"), ("VALIDATING", "gate")):
                await h.until("queued-task", _queued(state))
                [job] = [
                    j
                    for j in await api.list_jobs(NS)
                    if j["metadata"]["labels"]["orchestrator.dev/role"] == role
                ]
                # two hours in the queue: far past pendingTimeoutSeconds, and the controller
                # looks again (resyncs) without ending the attempt
                h.clock.offset += timedelta(hours=2)
                await h.resyncs(3)
                still = await api.get_object("taskexecutions", NS, "queued-task")
                assert still is not None
                statuses.append(_status(still))
                now = await api.get_job(NS, job["metadata"]["name"])
                assert now is not None and now["metadata"]["uid"] == job["metadata"]["uid"]
                assert await api.job_pods(NS, job["metadata"]["name"]) == []
                seen.append(job)
                # Kueue admits it
                api.server.patch("jobs", NS, job["metadata"]["name"], {"spec": {"suspend": False}})
            done = await h.until("queued-task", _finished)
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
            assert kubelet.errors == []
        return done, seen, statuses

    done, jobs, statuses = asyncio.run(main())
    for job in jobs:
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert [j["metadata"]["labels"]["orchestrator.dev/role"] for j in jobs] == ["adapter", "gate"]
    for status, state in zip(statuses, ("IN_PROGRESS", "VALIDATING"), strict=True):
        assert status["state"] == state and status["reason"] == "Queued", status
        assert "Kueue LocalQueue 'team-a'" in status["message"]
        running = {c["type"]: c for c in status["conditions"]}["Running"]
        assert (running["status"], running["reason"]) == ("False", "Queued")
    status = done["status"]
    assert status["state"] == "COMPLETED", status
    assert status["attempt"] == 1 and status["gate"]["passed"]
    attempt = status["attempts"][0]
    started = datetime.fromisoformat(attempt["startedAt"].replace("Z", "+00:00"))
    # podStartedAt is recorded when the operator sees the pod running; a pod that finishes
    # before it looks (a loaded machine) leaves it unset: the wait is then proven by the
    # Queued statuses above and the charge below
    if "podStartedAt" in attempt:
        pod_started = datetime.fromisoformat(attempt["podStartedAt"].replace("Z", "+00:00"))
        assert pod_started - started >= timedelta(hours=2)  # it waited in the queue...
    uid = done["metadata"]["uid"]
    record = h.store.task(TaskKey("e2e", "queued-task", uid, NS))
    assert record is not None and record.attempts == 1
    [result] = record.attempt_results
    # ...and the budget was charged from the container's start, not from the Job's creation
    assert result.duration_seconds < 3600, result


def test_a_job_no_queue_admits_ends_the_attempt_after_the_queue_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        api = h.api
        evidence, server = await serve_local_evidence(h.workdir)
        settings = ControllerSettings(workdir=h.workdir, runner_image="unused", namespaces=(NS,))
        controller = Controller(api, h.store, settings, evidence=evidence, now=h.clock.now)
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        task = {"prompt": "Add mul.", "patch": demo_patch("add-multiply")}
        te = task_execution(
            "never-admitted",
            h.bare.as_uri(),
            "patch",
            task=task,
            queueName="closed",
            queueTimeoutSeconds=600,
            retry={"maxAttempts": 1},
        )
        await api.create_object("taskexecutions", NS, te)
        async with FakeKubelet(api.server, h.tmp_path / "kubelet"):
            loop = ControlLoop(controller, api, namespaces=(NS,), resync_seconds=1)
            driver = asyncio.create_task(loop.run())
            await h.until("never-admitted", _queued("IN_PROGRESS"))
            h.clock.offset += timedelta(seconds=601)
            done = await h.until("never-admitted", _finished)
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
        return done, await api.list_jobs(NS)

    done, jobs = asyncio.run(main())
    status = done["status"]
    assert status["state"] == "FAILED", status
    assert status["failureClass"] == "infrastructure"
    assert "not admitted by Kueue LocalQueue 'closed' within 600s" in status["message"]
    assert jobs == []  # the queued Job was deleted
    record = h.store.task(TaskKey("e2e", "never-admitted", done["metadata"]["uid"], NS))
    assert record is not None
    [result] = record.attempt_results
    assert result.duration_seconds == 0  # nothing of the budget was charged

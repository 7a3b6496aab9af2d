"""A TaskExecution CRD newer than the operator holds tasks; it never fails or loses them.

Found by the chaos run (bench/chaos.py): a CRD with one new defaulted spec field was applied to
the cluster while an older operator ran, and every TaskExecution, new or half-way, ended
FAILED as an "invalid spec"; those half-way were then recorded CANCELLED in the database by the
next leader's sweep while their status said FAILED. The API server prunes every field its CRD
does not declare, so a field the operator cannot read means the CRD is newer than the operator
(a version skew during an upgrade), not a user's mistake: the task waits, said in its status,
until operator and CRDs agree.

The fake API server applies the CRD's structural schema (pruning and defaulting,
core/testing/crd_schema.py), so the newer CRD here is the project's own schema with one more
defaulted field, as on the cluster.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.db.tables import ExecutionLog, Task
from core.kube.control_loop import ControlLoop
from core.kube.reconciler import Controller, ControllerSettings
from core.testing.crd_schema import project_schemas
from core.testing.fake_apiserver import FakeApiServer
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.e2e.operator_harness import DEMO, adapter, demo_patch, task_execution
from tests.local_evidence import serve_local_evidence

NS = "demo"
NEW_FIELD = "fieldOfANewerVersion"  # a field no version of this operator knows


def newer_schemas() -> dict[str, Any]:
    """The project's CRDs plus one defaulted spec field this operator does not know."""
    schemas = copy.deepcopy(project_schemas())
    spec = schemas["taskexecutions"]["properties"]["spec"]
    spec["properties"][NEW_FIELD] = {"type": "integer", "default": 600}
    return schemas


class Operator:
    """One operator process: a Controller and its control loop on the shared fake server."""

    def __init__(self, tmp_path: Path, server: FakeApiServer) -> None:
        self.workdir = tmp_path / "operator"
        self.workdir.mkdir(exist_ok=True)
        url = default_url(self.workdir)
        upgrade(url)
        self.engine = make_engine(url)
        self.api = FakeKubeApi(server)

        self.evidence: Any = None
        self.evidence_server: Any = None

    async def run_until(self, done: Callable[[], Awaitable[bool]], timeout: float = 180) -> None:
        """Run the operator until ``done()``, then stop it (its evidence address stays, as a
        Service's does, for the pods it granted uploads)."""
        if self.evidence is None:
            self.evidence, self.evidence_server = await serve_local_evidence(self.workdir)
        controller = Controller(
            self.api,
            Store(self.engine),
            ControllerSettings(workdir=self.workdir, runner_image="unused", namespaces=(NS,)),
            evidence=self.evidence,
        )
        loop = ControlLoop(controller, self.api, namespaces=(NS,), resync_seconds=0.5)
        driver = asyncio.create_task(loop.run())
        try:
            async with asyncio.timeout(timeout):
                while not await done():
                    await asyncio.sleep(0.2)
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)

    async def close(self) -> None:
        if self.evidence_server is not None:
            await self.evidence_server.close()

    def rows(self) -> tuple[list[tuple[str, int]], list[str]]:
        with Session(self.engine) as session:
            tasks = [(t.status, t.attempts) for t in session.scalars(select(Task))]
            events = [
                e.event for e in session.scalars(select(ExecutionLog).order_by(ExecutionLog.id))
            ]
        return tasks, events


def _repo(tmp_path: Path) -> str:
    bare = tmp_path / "calc.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(DEMO / "repos/calc.bundle"), str(bare)],
        check=True,
        capture_output=True,
    )
    return bare.as_uri()


def _unknown_field_dropped(server: FakeApiServer, name: str) -> None:
    """The CRDs of the operator's version applied again: the API server prunes the field
    from what it serves (on read; the object's resourceVersion does not change)."""
    server.schemas = project_schemas()
    server._objects[("taskexecutions", NS, name)]["spec"].pop(NEW_FIELD)


def test_a_new_task_under_a_newer_crd_waits_and_runs_once_they_agree(tmp_path: Path) -> None:
    server = FakeApiServer(namespaces=(NS,), schemas=newer_schemas())
    operator = Operator(tmp_path, server)
    api = operator.api
    task = {"prompt": "Add mul.", "patch": demo_patch("add-multiply")}

    async def main() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        made = await api.create_object(
            "taskexecutions", NS, task_execution("t1", _repo(tmp_path), "patch", task=task)
        )
        assert made.object["spec"][NEW_FIELD] == 600  # defaulted by the newer CRD

        async def held() -> bool:
            te = await api.get_object("taskexecutions", NS, "t1")
            return (te or {}).get("status", {}).get("reason") == "UnsupportedSpec"

        async with FakeKubelet(api.server, tmp_path / "kubelet"):
            await operator.run_until(held)
            waiting = await api.get_object("taskexecutions", NS, "t1")
            assert waiting is not None
            assert await api.list_jobs(NS) == []
            reasons = [e["reason"] for e in server.list_objects("events", NS)]

            _unknown_field_dropped(server, "t1")

            async def finished() -> bool:
                te = await api.get_object("taskexecutions", NS, "t1")
                return (te or {}).get("status", {}).get("state") == "COMPLETED"

            await operator.run_until(finished)  # the operator restarted on the CRDs it knows
        await operator.close()
        done = await api.get_object("taskexecutions", NS, "t1")
        assert done is not None
        return waiting, done, reasons

    waiting, done, reasons = asyncio.run(main())
    status = waiting["status"]
    assert status.get("state", "PENDING") == "PENDING" and status.get("attempt", 0) == 0, status
    assert f"spec.{NEW_FIELD}: Extra inputs are not permitted" in status["message"]
    assert "Fix: upgrade the operator" in status["message"]
    assert "TASK_FAILED" not in reasons
    assert done["status"]["state"] == "COMPLETED" and done["status"]["attempt"] == 1
    tasks, events = operator.rows()
    assert tasks == [("COMPLETED", 1)] and events == ["TASK_STARTED", "TASK_COMPLETED"]


def test_a_running_task_whose_spec_becomes_unreadable_is_held_not_failed(
    tmp_path: Path,
) -> None:
    server = FakeApiServer(namespaces=(NS,))
    operator = Operator(tmp_path, server)
    api = operator.api
    task = {"prompt": "Add mul.", "patch": demo_patch("add-multiply")}

    async def state() -> dict[str, Any]:
        te = await api.get_object("taskexecutions", NS, "t2")
        return (te or {}).get("status") or {}

    async def main() -> tuple[dict[str, Any], list[tuple[str, int]], dict[str, Any]]:
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        await api.create_object(
            "taskexecutions", NS, task_execution("t2", _repo(tmp_path), "patch", task=task)
        )

        async def started() -> bool:
            return (await state()).get("state") == "IN_PROGRESS"

        await operator.run_until(started)  # no kubelet yet: the adapter's pod waits

        # a newer CRD is applied: the API server serves the running task with its default
        server.schemas = newer_schemas()
        stored = server._objects[("taskexecutions", NS, "t2")]
        stored["spec"][NEW_FIELD] = 600

        async def held() -> bool:
            return (await state()).get("reason") == "UnsupportedSpec"

        async with FakeKubelet(api.server, tmp_path / "kubelet"):
            await operator.run_until(held)
            end = asyncio.get_running_loop().time() + 5  # ten resyncs; the pod runs meanwhile

            async def resynced() -> bool:
                return asyncio.get_running_loop().time() > end

            await operator.run_until(resynced)
            waiting = await state()
            rows_while_held, _ = operator.rows()

            _unknown_field_dropped(server, "t2")

            async def finished() -> bool:
                return (await state()).get("state") in ("COMPLETED", "FAILED", "CANCELLED")

            await operator.run_until(finished)
        await operator.close()
        return waiting, rows_while_held, await state()

    waiting, rows_while_held, done = asyncio.run(main())
    assert waiting["state"] == "IN_PROGRESS" and waiting["attempt"] == 1, waiting
    assert "its attempt's Job runs on" in waiting["message"]
    assert rows_while_held == [("IN_PROGRESS", 1)]
    # the attempt that ran while the task was held is recorded once it can be read again
    assert done["state"] == "COMPLETED" and done["attempt"] == 1, done
    tasks, events = operator.rows()
    assert tasks == [("COMPLETED", 1)] and events == ["TASK_STARTED", "TASK_COMPLETED"]

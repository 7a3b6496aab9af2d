"""A shard's deletion sweep covers its own tasks only (the real Controller, SQLite, fake API).

A sharded replica that gains a shard records CANCELLED the unfinished tasks *of that shard*
whose TaskExecution is gone (core/kube/control_loop.py ``_gain``); the tasks of the other
shards belong to their holders. Here a controller starts eight or more tasks (both shards among them) (their Jobs are created;
no kubelet runs them, so they stay IN_PROGRESS), the TaskExecutions are deleted while no
operator runs, and a new controller sweeps shard 0 of 2, then shard 1: each sweep ends
exactly the tasks whose uid hashes to its shard, as the database shows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.db.tables import Task
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore
from core.kube.control_loop import ControlLoop
from core.kube.reconciler import Controller, ControllerSettings
from core.kube.shards import shard_of
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import adapter, demo_patch, task_execution

NS = "sweep"


def test_each_shard_sweeps_only_its_own_deleted_tasks(tmp_path: Path) -> None:
    workdir = tmp_path / "operator"
    workdir.mkdir()
    url = default_url(workdir)
    upgrade(url)
    engine = make_engine(url)
    evidence = LocalGrantingStore(
        workdir / ".ledger", base_url="http://127.0.0.1:1", signer=GrantSigner(b"k" * 32)
    )

    def controller(api: FakeKubeApi) -> Controller:
        settings = ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,))
        return Controller(api, Store(engine), settings, evidence=evidence)

    def unfinished() -> set[str]:
        with Session(engine) as s:
            rows = s.scalars(select(Task).where(Task.status == "IN_PROGRESS"))
            return {r.uid for r in rows}

    def cancelled() -> set[str]:
        with Session(engine) as s:
            rows = s.scalars(select(Task).where(Task.status == "CANCELLED"))
            return {r.uid for r in rows}

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        task = {"prompt": "p", "patch": demo_patch("add-multiply")}
        uids: set[str] = set()
        while len({shard_of(u, 2) for u in uids}) < 2 or len(uids) < 8:  # random uids
            body = task_execution(f"t-{len(uids)}", "git://127.0.0.1:1/x.git", "patch", task=task)
            made = await api.create_object("taskexecutions", NS, body)
            uids.add(made.object["metadata"]["uid"])
        loop = ControlLoop(controller(api), api, namespaces=(NS,), resync_seconds=5)
        driver = asyncio.create_task(loop.run())
        for _ in range(600):
            if unfinished() == uids:
                break
            await asyncio.sleep(0.05)
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        assert unfinished() == uids  # every task started, none finished
        for i in range(len(uids)):
            await api.delete_object("taskexecutions", NS, f"t-{i}")

        later = controller(api)  # a new replica: its cache holds none of them
        shard0 = {u for u in uids if shard_of(u, 2) == 0}
        assert shard0 and shard0 != uids  # both shards have tasks
        swept = await later.sweep((NS,), owns=lambda uid: shard_of(uid, 2) == 0)
        assert swept == len(shard0)
        assert cancelled() == shard0 and unfinished() == uids - shard0
        swept = await later.sweep((NS,), owns=lambda uid: shard_of(uid, 2) == 1)
        assert swept == len(uids - shard0)
        assert cancelled() == uids and unfinished() == set()

    asyncio.run(main())

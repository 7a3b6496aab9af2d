"""The operator's controller end to end without a cluster: FakeKubeApi + FakeKubelet.

The control loop (informers, work queue, workers) runs as operator/handlers.py runs it, on
the fake API server; the Jobs run the real runner on examples/demo's repository; SQLite,
ledger and logs are real. The assertions are the ones tests/e2e/test_operator.py makes on a
cluster for the same task.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.db.tables import ExecutionLog, PatchHistory, Task
from core.engine.evidence import local_store
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore
from core.engine.patch_ledger import verify
from core.kube.api import ApiCall
from core.kube.control_loop import ControlLoop
from core.kube.evidence_server import EvidenceServer
from core.kube.jobs import job_finished
from core.kube.reconciler import Controller, ControllerSettings
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.e2e.operator_harness import adapter, demo_patch, task_execution
from tests.local_evidence import serve_local_evidence
from tests.workdirs import demo_remote

NS = "demo"
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}


def test_a_patch_task_completes_through_the_controller_on_the_fake_api(tmp_path: Path) -> None:
    bare, workdir = demo_remote(tmp_path)
    url = default_url(workdir)
    upgrade(url)
    engine = make_engine(url)
    calls: list[ApiCall] = []

    async def main() -> dict[str, Any]:
        api = FakeKubeApi(namespaces=(NS,))
        signer = GrantSigner(b"k" * 32)
        evidence = LocalGrantingStore(workdir / ".ledger", base_url="", signer=signer)
        server = EvidenceServer(evidence, signer)
        port = await server.start("127.0.0.1", 0)
        evidence.base_url = f"http://127.0.0.1:{port}"
        controller = Controller(
            api,
            Store(engine),
            ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,)),
            evidence=evidence,
        )
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        task = {"prompt": "Add mul.", "patch": demo_patch("add-multiply")}
        made = await api.create_object(
            "taskexecutions", NS, task_execution("add-multiply", bare.as_uri(), "patch", task=task)
        )
        api.add_observer(calls.append)  # from here on: the controller's calls only
        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            loop = ControlLoop(controller, api, namespaces=(NS,), resync_seconds=5)
            driver = asyncio.create_task(loop.run())
            since = made.object["metadata"]["resourceVersion"]
            async for event in api.watch(
                "taskexecutions", NS, resource_version=since, timeout_seconds=300
            ):
                if (event.object.get("status") or {}).get("state") in TERMINAL:
                    break
            else:
                raise AssertionError("the TaskExecution never finished")
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
            assert kubelet.errors == []
        jobs = await api.list_jobs(NS)
        assert sorted(j["metadata"]["labels"]["orchestrator.dev/role"] for j in jobs) == [
            "adapter",
            "gate",
        ]
        assert all(job_finished(j) == "Complete" for j in jobs)
        return event.object

    done = asyncio.run(main())
    status = done["status"]
    assert status["state"] == "COMPLETED", status
    assert status["diff"]["filesChanged"] == 2 and status["diff"]["insertions"] == 8
    assert status["gate"]["passed"] and status["gate"]["applied"]
    assert [c["name"] for c in status["gate"]["checks"]] == ["compile", "unit-tests"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Running": "False", "Succeeded": "True"}

    with Session(engine) as session:
        row = session.scalars(select(Task).where(Task.task_id == "add-multiply")).one()
        events = session.scalars(select(ExecutionLog).order_by(ExecutionLog.id)).all()
        history = session.scalars(select(PatchHistory)).all()
    assert row.status == "COMPLETED" and row.attempts == 1
    assert [e.event for e in events] == ["TASK_STARTED", "TASK_COMPLETED"]
    assert [h.diff_sha256 for h in history] == [status["diff"]["sha256"]]
    report = verify(
        workdir / ".state/patch_ledger.jsonl",
        local_store(workdir),
        [(h.seq, h.entry_hash) for h in history],
    )
    assert report.ok, report.problems

    # the full patch came through the evidence store (uploaded by the pod, checked, stored by
    # its sha256), and nothing else of the attempt is left there but the requests
    store = local_store(workdir)
    key = status["diff"]["patchRef"]
    assert key == f"patches/{status['diff']['sha256']}.diff.gz" and store.exists(key)
    assert list(store.objects("incoming")) == []
    log_text = (workdir / "logs/execution").glob("*.jsonl")
    events_logged = [line for f in log_text for line in f.read_text().splitlines()]
    assert any('"event": "patch_applied"' in line for line in events_logged)
    assert any('"event": "gate_finished"' in line for line in events_logged)

    # what the API server saw of the controller: every write answered 2xx, and the writes
    # of one successful task (2 Jobs, no ConfigMap, status patches, 2 Events, 2 Job TTLs)
    writes = Counter(f"{c.verb}:{c.resource}" for c in calls if c.write)
    assert all(c.status is not None and c.status < 300 for c in calls if c.write)
    assert writes["create:jobs"] == 2 and writes["create:configmaps"] == 0
    assert writes["patch:jobs"] == 2
    assert writes["create:events"] == 2 and writes["patch:taskexecutions/status"] >= 2


def test_a_patch_named_in_a_configmap_or_by_its_sha256_completes(tmp_path: Path) -> None:
    """patchFrom: a ConfigMap key (mounted by the kubelet into the adapter pod), then the same
    patch again from the evidence store by its sha256 (fetched with the request)."""
    bare, workdir = demo_remote(tmp_path)
    url = default_url(workdir)
    upgrade(url)
    engine = make_engine(url)
    patch = demo_patch("add-multiply")
    sha = hashlib.sha256(patch.encode()).hexdigest()

    async def run(api: FakeKubeApi, loop: ControlLoop, name: str, task: dict[str, Any]) -> Any:
        made = await api.create_object(
            "taskexecutions", NS, task_execution(name, bare.as_uri(), "patch", task=task)
        )
        since = made.object["metadata"]["resourceVersion"]
        async for event in api.watch(
            "taskexecutions", NS, resource_version=since, timeout_seconds=300
        ):
            if event.object["metadata"]["name"] != name:
                continue
            if (event.object.get("status") or {}).get("state") in TERMINAL:
                return event.object["status"]
        raise AssertionError(f"{name} never finished")

    async def main() -> list[Any]:
        api = FakeKubeApi(namespaces=(NS,))
        signer = GrantSigner(b"k" * 32)
        evidence = LocalGrantingStore(workdir / ".ledger", base_url="", signer=signer)
        server = EvidenceServer(evidence, signer)
        port = await server.start("127.0.0.1", 0)
        evidence.base_url = f"http://127.0.0.1:{port}"
        settings = ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,))
        controller = Controller(api, Store(engine), settings, evidence=evidence)
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        data = base64.b64encode(patch.encode()).decode()
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}}
        await api.create_configmap(NS, {**cm, "binaryData": {"change.diff": data}})
        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            loop = ControlLoop(controller, api, namespaces=(NS,), resync_seconds=5)
            driver = asyncio.create_task(loop.run())
            ref = {"configMapKeyRef": {"name": "big", "key": "change.diff"}}
            first = await run(api, loop, "from-cm", {"prompt": "p", "patchFrom": ref})
            again = {"evidence": {"sha256": sha}}
            second = await run(api, loop, "from-store", {"prompt": "p", "patchFrom": again})
            missing = {"evidence": {"sha256": "0" * 64}}
            made = await api.create_object(
                "taskexecutions",
                NS,
                task_execution(
                    "missing", bare.as_uri(), "patch", task={"prompt": "p", "patchFrom": missing}
                ),
            )
            since = made.object["metadata"]["resourceVersion"]
            async for event in api.watch(
                "taskexecutions", NS, resource_version=since, timeout_seconds=120
            ):
                status = event.object.get("status") or {}
                if event.object["metadata"]["name"] == "missing" and status.get("state"):
                    if "no patch" in status.get("message", ""):
                        third = status
                        break
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
            assert kubelet.errors == []
        return [first, second, third]

    first, second, third = asyncio.run(main())
    for status in (first, second):
        assert status["state"] == "COMPLETED", status
        assert status["diff"]["sha256"] == sha and status["gate"]["passed"]
    assert "spec.task.patchFrom.evidence.sha256" in third["message"]
    # FAILED in the database as in the status: a status alone left the row unfinished, and the
    # next leader's sweep recorded it CANCELLED (found by the chaos run)
    assert third["state"] == "FAILED", third
    with Session(engine) as session:
        row = session.scalars(select(Task).where(Task.task_id == "missing")).one()
        ends = session.scalars(
            select(ExecutionLog.event).where(ExecutionLog.task_id == "missing")
        ).all()
    assert row.status == "FAILED" and "no patch" in (row.failure_message or ""), row.status
    assert list(ends) == ["TASK_FAILED"]


def _events_after(tmp_path: Path, fault: dict[str, Any]) -> tuple[str, Counter[str]]:
    """Run one patch task through the control loop with ``fault`` injected; its end state and
    the reasons of the Events the API server holds about it."""
    bare, workdir = demo_remote(tmp_path)
    url = default_url(workdir)
    upgrade(url)

    async def main() -> tuple[str, Counter[str]]:
        api = FakeKubeApi(namespaces=(NS,))
        evidence, server = await serve_local_evidence(workdir)
        controller = Controller(
            api,
            Store(make_engine(url)),
            ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,)),
            evidence=evidence,
        )
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        task = {"prompt": "Add mul.", "patch": demo_patch("add-multiply")}
        made = await api.create_object(
            "taskexecutions", NS, task_execution("add-multiply", bare.as_uri(), "patch", task=task)
        )
        api.fail(**fault)
        async with FakeKubelet(api.server, tmp_path / "kubelet"):
            loop = ControlLoop(controller, api, namespaces=(NS,), resync_seconds=2)
            driver = asyncio.create_task(loop.run())
            since = made.object["metadata"]["resourceVersion"]
            async for event in api.watch(
                "taskexecutions", NS, resource_version=since, timeout_seconds=300
            ):
                state = (event.object.get("status") or {}).get("state")
                if state in TERMINAL:
                    break
            else:
                raise AssertionError("the TaskExecution never finished")
            await asyncio.sleep(3)  # a resync and a retry later: nothing more is posted
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
        await server.close()
        events = (await api.list_resource("events", NS)).items
        return str(state), Counter(str(e["reason"]) for e in events)

    return asyncio.run(main())


def test_an_event_whose_post_failed_is_posted_again_once(tmp_path: Path) -> None:
    # the first post of the start Event and then of the end Event fail (503): each is posted
    # again by the retry, before the status that reports it, and never twice
    state, reasons = _events_after(
        tmp_path, {"verb": "create", "resource": "events", "nth": 1, "times": 2}
    )
    assert state == "COMPLETED"
    assert reasons == Counter({"TASK_STARTED": 1, "TASK_COMPLETED": 1})


def test_a_status_write_without_an_answer_does_not_lose_or_repeat_the_end_event(
    tmp_path: Path,
) -> None:
    # every status write is applied but its answer is lost (a timeout), the one that ends the
    # task too: the Event went out before it, and the replays post nothing more
    state, reasons = _events_after(
        tmp_path,
        {
            "verb": "patch",
            "resource": "taskexecutions/status",
            "times": None,
            "after": True,
            "status": None,
        },
    )
    assert state == "COMPLETED"
    assert reasons == Counter({"TASK_STARTED": 1, "TASK_COMPLETED": 1})


def test_an_event_post_without_an_answer_is_not_posted_twice(tmp_path: Path) -> None:
    # the first posts of the start and the end Event are applied but their answers are lost (a
    # timeout): the retry posts them again under the same name, which meets 409 and adds nothing
    state, reasons = _events_after(
        tmp_path,
        {"verb": "create", "resource": "events", "times": 2, "after": True, "status": None},
    )
    assert state == "COMPLETED"
    assert reasons == Counter({"TASK_STARTED": 1, "TASK_COMPLETED": 1})

"""The Integration resource end to end without a cluster: FakeKubeApi + FakeKubelet.

The operator's control loop runs with its Integration part; two TaskExecutions on the
``patch`` adapter change the same lines of examples/demo's calc repository (a bare clone,
reached as a ``file://`` URL like a git server), so the second one conflicts on the merged
branch. What is asserted is what the API server, the database, the ledger and the
repository saw: the status mirrors the verdicts; the merged-tree gate ran as a Job owned by
the Integration with its deterministic name; the branch in the tasks' repository holds the
first task's commit; a restart adds no Job, no verdict and no ledger entry.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.integration_rows import IntegrationRows
from core.db.store import Store
from core.db.tables import IntegrationTask, PatchHistory
from core.engine.evidence import LEDGER_DIR, local_store
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore, load_secret
from core.engine.patch_ledger import verify
from core.kube.control_loop import ControlLoop
from core.kube.evidence_server import EvidenceServer
from core.kube.integration_controller import IntegrationController, IntegrationSettings
from core.kube.integration_gates import LABEL_INTEGRATION
from core.kube.reconciler import Controller, ControllerSettings
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.e2e.operator_harness import (
    DEMO,
    DIVIDE_PATCH,
    adapter,
    demo_patch,
    integration,
    task_execution,
)

NS = "itg"
RUN = "merge"
BRANCH = f"orchestrator/integration/{RUN}"


async def _operator(
    api: FakeKubeApi, engine: Any, workdir: Path
) -> tuple[ControlLoop, EvidenceServer]:
    """The operator's loop with its Integration part, and its local evidence store served
    on loopback (where the fake kubelet's runner pods fetch and upload)."""
    signer = GrantSigner(load_secret(workdir / ".evidence-grant-key"))
    evidence = LocalGrantingStore(workdir / LEDGER_DIR, base_url="", signer=signer)
    server = EvidenceServer(evidence, signer)
    evidence.base_url = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
    controller = Controller(
        api,
        Store(engine),
        ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,)),
        evidence=evidence,
    )
    part = IntegrationController(
        api,
        controller.store,
        controller.cache,
        IntegrationSettings(workdir=workdir, runner_image="unused", poll_seconds=2.0),
        metrics=controller.metrics,
    )
    loop = ControlLoop(controller, api, namespaces=(NS,), resync_seconds=5, parts=[part])
    return loop, server


async def _status(api: FakeKubeApi, name: str) -> dict[str, Any]:
    obj = await api.get_object("integrations", NS, name)
    return (obj or {}).get("status") or {}


async def _until_state(api: FakeKubeApi, name: str, states: set[str], timeout: float) -> dict:
    end = asyncio.get_running_loop().time() + timeout
    while True:
        status = await _status(api, name)
        if status.get("state") in states:
            return status
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"{name} never reached {states}: {status}")
        await asyncio.sleep(0.2)


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_two_conflicting_task_executions_the_second_conflicts(tmp_path: Path) -> None:
    bare = tmp_path / "calc.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(DEMO / "repos/calc.bundle"), str(bare)],
        check=True,
        capture_output=True,
    )
    workdir = tmp_path / "operator"
    workdir.mkdir()
    upgrade(default_url(workdir))
    engine = make_engine(default_url(workdir))
    url = bare.as_uri()

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        for name, patch in (("a-multiply", demo_patch("add-multiply")), ("b-divide", DIVIDE_PATCH)):
            body = task_execution(name, url, "patch", task={"prompt": name, "patch": patch})
            body["spec"]["runId"] = RUN
            await api.create_object("taskexecutions", NS, body)
        await api.create_object("integrations", NS, integration(RUN, RUN))
        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            loop, server = await _operator(api, engine, workdir)
            driver = asyncio.create_task(loop.run())
            status = await _until_state(api, RUN, {"Succeeded", "Failed"}, 300)
            jobs = await api.list_jobs(NS, f"{LABEL_INTEGRATION}={RUN}")
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
            assert kubelet.errors == []

        assert status["state"] == "Succeeded", status
        outcomes = [(t["taskId"], t["outcome"]) for t in status["tasks"]]
        assert outcomes == [("a-multiply", "merged"), ("b-divide", "conflict")]
        merged, conflicted = status["tasks"]
        assert "calc/ops.py" in conflicted["reason"]
        assert "not sent back" in conflicted["reason"]
        assert status["stats"]["merged"] == 1 and status["stats"]["conflict"] == 1
        assert status["stats"]["gateRuns"] == 1 and status["branch"] == BRANCH
        assert status["pushed"] is True and status["repository"] == url
        assert status["headCommit"] == merged["commit"]
        # the branch was pushed to the tasks' repository and holds the merged commit
        assert _git(bare, "rev-parse", f"refs/heads/{BRANCH}") == merged["commit"]
        assert "def mul(a, b)" in _git(bare, "show", f"{BRANCH}:calc/ops.py")
        assert "def div(a, b)" not in _git(bare, "show", f"{BRANCH}:calc/ops.py")
        subject = _git(bare, "log", "-1", "--format=%s%n%b", BRANCH)
        assert "a-multiply" in subject
        # the merged-tree gate: one Job, owned by the Integration, named for its gate run
        [job] = jobs
        owner = job["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "Integration" and owner["name"] == RUN
        labels = job["metadata"]["labels"]
        assert labels["orchestrator.dev/gate-run"] == "1" and labels["orchestrator.dev/role"] == "gate"
        assert labels["app.kubernetes.io/name"] == "orchestrator-runner"
        assert job["metadata"]["name"].startswith(f"{RUN}-") and job["metadata"]["name"].endswith("g")
        events = [e for e in (await api.list_resource("events", NS)).items]
        finished = [e for e in events if e["reason"] == "INTEGRATION_FINISHED"]
        assert len(finished) == 1 and "1 merged, 1 conflict" in finished[0]["message"]

        # the database and the ledger: one verdict each, chained, verified
        verdicts = IntegrationRows(engine).verdicts(RUN, NS)
        assert [(v.key.task_id, v.outcome.value) for v in verdicts] == [
            ("a-multiply", "merged"),
            ("b-divide", "conflict"),
        ]
        assert all(v.key.uid and v.key.scope == NS for v in verdicts)
        with Session(engine) as s:
            history = list(s.scalars(select(PatchHistory).order_by(PatchHistory.seq)))
            rows = list(s.scalars(select(IntegrationTask)))
        anchor = [(h.seq, h.entry_hash) for h in history] + [
            (r.ledger_seq, r.entry_hash) for r in rows
        ]
        report = verify(workdir / ".state/patch_ledger.jsonl", local_store(workdir), anchor)
        assert report.ok, report.problems
        entries = (workdir / ".state/patch_ledger.jsonl").read_text().splitlines()
        assert len(entries) == 4  # two attempts, two verdicts
        assert (workdir / "logs/integration" / f"{NS}.{RUN}.jsonl").exists()

        # a restart: the operator looks again and adds nothing
        writes: list[str] = []
        api.add_observer(lambda c: writes.append(f"{c.verb}:{c.resource}") if c.write else None)
        async with FakeKubelet(api.server, tmp_path / "kubelet2"):
            loop, server = await _operator(api, engine, workdir)
            driver = asyncio.create_task(loop.run())
            await asyncio.sleep(3.0)  # leads, syncs every Integration and TaskExecution once
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
        assert "create:jobs" not in writes and "create:events" not in writes
        assert len(IntegrationRows(engine).verdicts(RUN, NS)) == 2
        assert len((workdir / ".state/patch_ledger.jsonl").read_text().splitlines()) == 4

    asyncio.run(main())

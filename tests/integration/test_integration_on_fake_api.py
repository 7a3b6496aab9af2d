"""The Integration resource end to end without a cluster: FakeKubeApi + FakeKubelet.

The operator's control loop runs with its Integration part; two TaskExecutions on the
``patch`` adapter change the same lines of examples/demo's calc repository (a bare clone,
reached as a ``file://`` URL like a git server), so the second one conflicts on the merged
branch. What is asserted is what the API server, the database, the ledger and the
repository saw: the status mirrors the verdicts; the merged-tree gate ran as a Job owned by
the Integration with its deterministic name; the branch in the tasks' repository holds the
first task's commit; a restart adds no Job, no verdict and no ledger entry.

The send-back: two ``fake_ai`` TaskExecutions write the same new file, the second one's
Adapter retries on ``merge_conflict``; it is reopened, PENDING again (after a refused status
write), runs attempt 2 with the conflict in its prompt and is merged.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.integration_rows import IntegrationRows
from core.db.store import Store
from core.db.tables import ExecutionLog, IntegrationTask, PatchHistory
from core.engine.evidence import LEDGER_DIR, local_store
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore, load_secret
from core.engine.patch_ledger import verify
from core.errors import InfrastructureError
from core.kube.control_loop import ControlLoop
from core.kube.evidence_server import EvidenceServer
from core.kube.integration_controller import IntegrationController, IntegrationSettings
from core.kube.integration_gates import LABEL_INTEGRATION
from core.kube.jobs import LABEL_ATTEMPT, LABEL_ROLE, LABEL_TE
from core.kube.reconciler import Controller, ControllerSettings
from core.models import LedgerEntry, TaskState
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.e2e.operator_harness import (
    BASE_COMMIT,
    DIVIDE_PATCH,
    adapter,
    demo_patch,
    integration,
    task_execution,
)
from tests.workdirs import demo_remote

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
    bare, workdir = demo_remote(tmp_path)
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
        assert (
            labels["orchestrator.dev/gate-run"] == "1" and labels["orchestrator.dev/role"] == "gate"
        )
        assert labels["app.kubernetes.io/name"] == "orchestrator-runner"
        assert job["metadata"]["name"].startswith(f"{RUN}-") and job["metadata"]["name"].endswith(
            "g"
        )
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


#: An adapter that does what the prompt's ``fake-ai:`` lines say (core.testing.fake_ai).
FAKE_AI = ["{python}", "-m", "core.testing.fake_ai", "--prompt-file", "{prompt_file}"]


class _FlakyStatus(FakeKubeApi):
    """The API server refuses the first status write that reopens a TaskExecution (COMPLETED
    -> PENDING), as if the operator stopped between the database's reopen and the status."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refused = 0

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        if plural == "taskexecutions" and not self.refused:
            current = await self.get_object(plural, namespace, name)
            was = ((current or {}).get("status") or {}).get("state")
            if was == "COMPLETED" and status.get("state") == "PENDING":
                self.refused += 1
                raise InfrastructureError("injected: the reopening status write was lost")
        return await super().patch_status(
            plural, namespace, name, status, resource_version=resource_version
        )


def test_a_conflicting_task_execution_is_sent_back_and_merged_on_its_next_attempt(
    tmp_path: Path,
) -> None:
    """Two TaskExecutions write the same new file; the second one's Adapter retries on
    ``merge_conflict``. It conflicts, is reopened (database), made PENDING again (status,
    after one lost write), runs attempt 2 as a new Job with the conflict summary in its prompt,
    from the integration branch's head, and is merged when it completes."""
    bare, workdir = demo_remote(tmp_path)
    upgrade(default_url(workdir))
    engine = make_engine(default_url(workdir))
    url = bare.as_uri()
    retry = {"maxAttempts": 3, "retryOn": ["infrastructure", "merge_conflict"],
             "backoffInitialSeconds": 0.1, "jitterSeconds": 0}  # fmt: skip
    prompts = {
        "a-notes": "fake-ai: write notes.txt :: from A",
        "b-notes": "fake-ai: echo-feedback\n"
        "fake-ai: write notes.txt :: from B\n"
        "fake-ai: on-feedback write notes.txt :: from A\\nfrom B",
    }

    async def main() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], list[str]]:
        api = _FlakyStatus(namespaces=(NS,))
        await api.create_object("adapters", NS, adapter("once", "process", command=FAKE_AI))
        await api.create_object(
            "adapters", NS, adapter("again", "process", command=FAKE_AI, retry=retry)
        )
        for name, adapter_name in (("a-notes", "once"), ("b-notes", "again")):
            body = task_execution(name, url, adapter_name, task={"prompt": prompts[name]})
            body["spec"]["runId"] = RUN
            await api.create_object("taskexecutions", NS, body)
        await api.create_object("integrations", NS, integration(RUN, RUN))
        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            loop, server = await _operator(api, engine, workdir)
            driver = asyncio.create_task(loop.run())
            status = await _until_state(api, RUN, {"Succeeded", "Failed"}, 600)
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
            assert kubelet.errors == []
        assert api.refused == 1  # the lost status write was made again
        # a restart: nothing is reopened, started or merged again
        writes: list[str] = []
        api.add_observer(lambda c: writes.append(f"{c.verb}:{c.resource}") if c.write else None)
        async with FakeKubelet(api.server, tmp_path / "kubelet2"):
            loop, server = await _operator(api, engine, workdir)
            driver = asyncio.create_task(loop.run())
            await asyncio.sleep(3.0)  # leads, syncs every Integration and TaskExecution once
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
        assert "create:jobs" not in writes and "create:events" not in writes, writes
        assert (await _status(api, RUN))["state"] == "Succeeded"
        te = await api.get_object("taskexecutions", NS, "b-notes")
        assert te is not None
        jobs = await api.list_jobs(NS, f"{LABEL_TE}=b-notes")
        events = [
            f"{e['reason']}:{e['metadata']['name']}"
            for e in (await api.list_resource("events", NS)).items
            if e["involvedObject"]["name"] == "b-notes"
        ]
        return status, te["status"], jobs, events

    status, te_status, jobs, events = asyncio.run(main())
    # the Integration: both merged, b-notes on its second attempt, after one conflict
    assert status["state"] == "Succeeded", status
    by_task = {t["taskId"]: t for t in status["tasks"]}
    assert (by_task["a-notes"]["outcome"], by_task["a-notes"]["attempt"]) == ("merged", 1)
    assert (by_task["b-notes"]["outcome"], by_task["b-notes"]["attempt"]) == ("merged", 2)
    # the stats count each task's verdict now (the conflict is in the database, below)
    assert status["stats"]["merged"] == 2 and status["stats"]["conflict"] == 0
    assert _git(bare, "show", f"{BRANCH}:notes.txt") == "from A\nfrom B"
    subjects = _git(bare, "log", "--reverse", "--format=%s", f"{BASE_COMMIT}..{BRANCH}")
    assert [s.split(":")[0] for s in subjects.splitlines()] == ["a-notes", "b-notes"]
    # the TaskExecution: COMPLETED on attempt 2; attempt 1 shows the conflict
    assert te_status["state"] == "COMPLETED" and te_status["attempt"] == 2
    first, second = te_status["attempts"]
    assert (first["attempt"], first["failureClass"]) == (1, "merge_conflict")
    assert (
        second["attempt"] == 2
        and second.get("failureClass") is None
        and te_status.get("failureClass") is None
    )
    # one adapter Job per attempt, named for it; one TASK_REOPENED Event
    adapter_jobs = sorted(
        int(j["metadata"]["labels"][LABEL_ATTEMPT])
        for j in jobs
        if j["metadata"]["labels"].get(LABEL_ROLE) == "adapter"
    )
    assert adapter_jobs == [1, 2]
    reopened = [e for e in events if e.startswith("TASK_REOPENED:")]
    assert len(reopened) == 1 and reopened[0].endswith(".reopened-1")
    assert sum(e.startswith("TASK_STARTED:") for e in events) == 2
    _assert_sent_back(engine, workdir)


def _assert_sent_back(engine: Any, workdir: Path) -> None:
    """What the database and the ledger recorded of the send-back."""
    key = next(r.key for r in Store(engine).tasks(RUN, NS) if r.key.task_id == "b-notes")
    record = Store(engine).task(key)
    assert record.status is TaskState.COMPLETED and record.attempts == 2
    first, second = record.attempt_results
    assert first.integration is not None and first.integration.outcome.value == "conflict"
    assert first.backoff_seconds == 0.1 and not first.final
    a_commit = next(
        v.commit for v in IntegrationRows(engine).verdicts(RUN, NS) if v.key.task_id == "a-notes"
    )
    assert first.integration.rebase_commit == a_commit
    assert second.failure_class is None and second.final
    verdicts = [
        (v.key.task_id, v.attempt, v.outcome.value)
        for v in IntegrationRows(engine).verdicts(RUN, NS)
    ]
    assert verdicts == [
        ("a-notes", 1, "merged"),
        ("b-notes", 1, "conflict"),
        ("b-notes", 2, "merged"),
    ]
    with Session(engine) as s:
        names = [
            (r.task_id, r.attempt, r.event)
            for r in s.scalars(select(ExecutionLog).order_by(ExecutionLog.id))
        ]
        history = list(s.scalars(select(PatchHistory).order_by(PatchHistory.seq)))
        rows = list(s.scalars(select(IntegrationTask)))
    assert names.count(("b-notes", 1, "TASK_REOPENED")) == 1
    assert [n for n in names if n[2] == "TASK_REOPENED"] == [("b-notes", 1, "TASK_REOPENED")]
    entries = [LedgerEntry.model_validate_json(line) for line in
               (workdir / ".state/patch_ledger.jsonl").read_text().splitlines()]  # fmt: skip
    attempts = [(e.task_id, e.attempt) for e in entries if e.kind == "attempt"]
    assert sorted(attempts) == [("a-notes", 1), ("b-notes", 1), ("b-notes", 2)]
    attempt2 = next(e for e in entries if e.task_id == "b-notes" and e.attempt == 2)
    assert attempt2.kind == "attempt" and attempt2.base_commit == a_commit
    anchor = [(h.seq, h.entry_hash) for h in history] + [(r.ledger_seq, r.entry_hash) for r in rows]
    report = verify(workdir / ".state/patch_ledger.jsonl", local_store(workdir), anchor)
    assert report.ok, report.problems
    assert len(entries) == 6  # three attempts, three verdicts
    # the feedback reached attempt 2's prompt (its adapter printed it back)
    [log] = (workdir / "logs/execution").glob(f"{NS}.b-notes.*.jsonl")
    said = [
        r.get("line")
        for r in map(json.loads, log.read_text().splitlines())
        if r.get("attempt") == 2 and r.get("stream") == "stdout"
    ]
    assert "feedback: Conflicting files:" in said and "feedback: - notes.txt" in said


def test_resources_the_operator_cannot_read_delay_the_integration_and_decide_nothing(
    tmp_path: Path,
) -> None:
    """A completed task whose TaskExecution or Adapter no longer validates for this operator
    (a field of a newer CRD, kept because the fake API server stops pruning them, as a newer
    CRD's schema would) is not "gone": the Integration says which resource and why, and
    retries; no verdict is recorded. Before, the change got a final ``skipped`` verdict ("its
    plan is gone ... the task's resource was deleted") and the run said Succeeded with nothing
    merged -- seen on the shared cluster while another checkout's CRDs (a defaulted field) were
    applied. Once both read again, the change is merged."""
    bare, workdir = demo_remote(tmp_path)
    upgrade(default_url(workdir))
    engine = make_engine(default_url(workdir))
    run, newer = "skew", {"spec": {"fieldOfANewerVersion": 86400}}
    seen: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    api = FakeKubeApi(namespaces=(NS,))

    async def until_message(part: str) -> dict[str, Any]:
        end = asyncio.get_running_loop().time() + 300
        while True:
            status = await _status(api, run)
            if part in status.get("message", "") or status.get("state") in ("Succeeded", "Failed"):
                return status
            assert asyncio.get_running_loop().time() < end, status
            await asyncio.sleep(0.2)

    async def main() -> None:
        await api.create_object("adapters", NS, adapter("patch", "patch"))
        patch = demo_patch("add-multiply")
        body = task_execution(
            "a-multiply", bare.as_uri(), "patch", task={"prompt": "mul", "patch": patch}
        )
        body["spec"]["runId"] = run
        await api.create_object("taskexecutions", NS, body)
        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            loop, server = await _operator(api, engine, workdir)
            driver = asyncio.create_task(loop.run())
            end = asyncio.get_running_loop().time() + 300
            while ((await api.get_object("taskexecutions", NS, "a-multiply")) or {}).get(
                "status", {}
            ).get("state") != "COMPLETED":
                assert asyncio.get_running_loop().time() < end, "a-multiply never completed"
                await asyncio.sleep(0.2)
            # both gain a field this operator does not know (a newer CRD's)
            schemas = dict(api.server.schemas)
            for plural, name in (("taskexecutions", "a-multiply"), ("adapters", "patch")):
                api.server.schemas.pop(plural)
                await api.patch_object(plural, NS, name, newer)
            await api.create_object("integrations", NS, integration(run, run))
            status = await until_message("TaskExecution itg/a-multiply does not validate")
            seen["te"] = (status, IntegrationRows(engine).verdicts(run, NS))
            # the TaskExecution reads again, the Adapter not yet
            await api.patch_object(
                "taskexecutions", NS, "a-multiply", {"spec": {"fieldOfANewerVersion": None}}
            )
            status = await until_message("Adapter itg/patch does not validate")
            seen["adapter"] = (status, IntegrationRows(engine).verdicts(run, NS))
            await api.patch_object(
                "adapters", NS, "patch", {"spec": {"fieldOfANewerVersion": None}}
            )
            api.server.schemas.update(schemas)
            seen["done"] = (await _until_state(api, run, {"Succeeded", "Failed"}, 300), [])
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            await server.close()
            assert kubelet.errors == []

    asyncio.run(main())
    for what in ("te", "adapter"):
        status, verdicts = seen[what]
        assert (status["state"], status["reason"]) == ("Running", "Retrying"), status
        assert "spec.fieldOfANewerVersion" in status["message"], status
        assert verdicts == []  # nothing decided while it could not be read
    status = seen["done"][0]
    assert status["state"] == "Succeeded", status
    assert [(t["taskId"], t["outcome"]) for t in status["tasks"]] == [("a-multiply", "merged")]
    verdicts = IntegrationRows(engine).verdicts(run, NS)
    assert [(v.key.task_id, v.outcome.value) for v in verdicts] == [("a-multiply", "merged")]
    head = _git(bare, "rev-parse", f"refs/heads/orchestrator/integration/{run}")
    assert head == status["headCommit"] == status["tasks"][0]["commit"]

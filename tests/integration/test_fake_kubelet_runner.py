"""The operator's adapter and gate Jobs, run by the fake kubelet: no cluster, real runner.

The Jobs are built exactly as the reconciler builds them (core.kube.jobs.job_manifest with a
RunnerRequest from the TaskExecution and Adapter resources); the fake kubelet runs
``python -m core.runner adapter|gate`` as local processes, cloning a real git repository
(examples/demo's calc bundle, as a bare repository behind a file:// URL). The evidence is
read back the way the reconciler reads it: pods of the Job, pod log, parse_pod_log; the bulk
(request, patch, log, diff) goes through the operator's evidence server with per-attempt
grants (core.kube.attempt_io), as on a cluster.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.engine.evidence import read_all
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore
from core.identity import TaskKey
from core.kube.api import Body, KubeApi
from core.kube.attempt_io import AttemptIO, PatchInput, PodInputs
from core.kube.evidence_server import EvidenceServer
from core.kube.jobs import (
    PATCH_SOURCE_FILE,
    job_finished,
    job_manifest,
    job_name,
    patch_source_volume,
)
from core.resources import AdapterResourceSpec, TaskExecutionSpec, adapter_spec, task_spec
from core.runner.protocol import DEFAULT_PATCH_FILE, ParsedLog, RunnerRequest, parse_pod_log
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.e2e.operator_harness import DEMO, adapter, demo_patch, task_execution

NS = "demo"


def bare_repo(tmp_path: Path) -> str:
    target = tmp_path / "calc.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(DEMO / "repos/calc.bundle"), str(target)],
        check=True,
        capture_output=True,
    )
    return target.as_uri()


async def run_job(api: KubeApi, kubelet: FakeKubelet, body: Body) -> tuple[Body, ParsedLog]:
    made = await api.create_job(NS, body)
    assert made.created
    name = body["metadata"]["name"]
    async for event in api.watch(
        "jobs", NS, resource_version=made.object["metadata"]["resourceVersion"], timeout_seconds=300
    ):
        if event.object["metadata"]["name"] == name and job_finished(event.object):
            break
    await kubelet.wait_idle()
    job = await api.get_job(NS, name)
    assert job is not None
    pods = await api.job_pods(NS, name)
    assert len(pods) == 1
    text = await api.pod_log(NS, pods[-1]["metadata"]["name"])
    assert text is not None
    return job, parse_pod_log(text)


@asynccontextmanager
async def evidence_io(root: Path) -> AsyncIterator[AttemptIO]:
    signer = GrantSigner(b"s" * 32)
    store = LocalGrantingStore(root, base_url="", signer=signer)
    server = EvidenceServer(store, signer)
    port = await server.start("127.0.0.1", 0)
    store.base_url = f"http://127.0.0.1:{port}"
    try:
        yield AttemptIO(store, max_diff_bytes=10 * 1024 * 1024, max_log_bytes=1024 * 1024)
    finally:
        await server.close()


async def setup(api: FakeKubeApi, repo: str, task: dict[str, Any]) -> dict[str, Any]:
    te_body = task_execution("add-multiply", repo, "patch", task=task)
    te = (await api.create_object("taskexecutions", NS, te_body)).object
    adp = (await api.create_object("adapters", NS, adapter("patch", "patch"))).object
    resource = AdapterResourceSpec.model_validate(adp["spec"])
    spec = TaskExecutionSpec.model_validate(te["spec"])
    task_model, engine_adapter = task_spec("add-multiply", spec), adapter_spec("patch", resource)
    uid = te["metadata"]["uid"]
    return {
        "te": te,
        "resource": resource,
        "spec": spec,
        "task": task_model,
        "adapter": engine_adapter,
        "key": TaskKey(spec.run_id, task_model.task_id, uid, NS),
        "common": dict(
            run_id=spec.run_id, task=task_model, adapter=engine_adapter, attempt=1, repo_url=repo
        ),
    }


def manifest(s: dict[str, Any], role: Any, inputs: PodInputs, source: Body | None = None) -> Body:
    return job_manifest(
        te=s["te"],
        name=job_name("add-multiply", s["te"]["metadata"]["uid"], 1, role),
        role=role,
        run_id=s["spec"].run_id,
        task_id=s["task"].task_id,
        attempt=1,
        image="unused-by-the-fake-kubelet",
        fetch_grant=inputs.fetch_grant,
        runner_grant=inputs.runner_grant,
        deadline_seconds=120,
        adapter=s["resource"],
        patch_source=source,
        adapter_name="patch",
    )


def expires() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=5)


def test_a_patch_adapter_job_and_its_gate_job_run_to_completion(tmp_path: Path) -> None:
    repo = bare_repo(tmp_path)

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        s = await setup(api, repo, {"prompt": "add", "patch": demo_patch("add-multiply")})
        async with (
            evidence_io(tmp_path / "store") as io,
            FakeKubelet(api.server, tmp_path / "kubelet") as kubelet,
        ):
            request = RunnerRequest(kind="adapter", timeout_seconds=60, **s["common"])
            inputs = io.prepare(s["key"], request, expires_at=expires())
            job, adapter_log = await run_job(api, kubelet, manifest(s, "adapter", inputs))
            assert job_finished(job) == "Complete"
            result = adapter_log.result
            assert result is not None and result.kind == "adapter"
            assert result.exit_code == 0 and not result.timed_out
            assert result.diff is not None and not result.diff.empty
            assert result.diff.files_changed >= 1
            # the pod log holds the small report and our notes, never the diff or the output
            assert result.patch_b64 is None and result.patch is not None
            assert result.patch.sha256 == result.diff.sha256
            assert {r.get("stream") for r in adapter_log.records} == {"orchestrator"}
            events = [r.get("event") for r in adapter_log.records]
            assert "patch_applied" in events and "diff_uploaded" in events
            # the operator checks the upload and stores it by its sha256; the full log too
            diff = io.adopt_patch(result.diff, result.patch)
            assert diff.patch_ref == f"patches/{result.diff.sha256}.diff.gz"
            stored = read_all(io.store, diff.patch_ref)
            assert hashlib.sha256(stored).hexdigest() == result.diff.sha256
            assert result.log is not None
            logged = [r.get("event") for r in io.log_records(result.log)]
            assert "diff_captured" in logged and "attempt_finished" in logged

            gate_request = RunnerRequest(
                kind="gate",
                timeout_seconds=120,
                gate_checks=list(s["adapter"].gate),
                patch_file=DEFAULT_PATCH_FILE,
                **s["common"],
            )
            patch = PatchInput(diff.sha256, diff.bytes)
            gate_inputs = io.prepare(s["key"], gate_request, expires_at=expires(), patch=patch)
            gate_job, gate_log = await run_job(api, kubelet, manifest(s, "gate", gate_inputs))
            assert job_finished(gate_job) == "Complete"
            gate = gate_log.result.gate if gate_log.result else None
            assert gate is not None and gate.applied and gate.passed, gate_log.records
            assert [c.name for c in gate.checks] == ["compile", "unit-tests"]
            assert all(c.status.value == "passed" for c in gate.checks)
            # Jobs and pods belong to the TaskExecution: deleting it clears all (the pods
            # once the kubelet confirms their containers stopped); no ConfigMap was made
            assert await api.delete_object("taskexecutions", NS, "add-multiply")
            await kubelet.wait_idle()
            assert await api.list_jobs(NS) == [] and await api.list_pods(NS) == []
            assert await api.list_objects("configmaps", NS) == []
            assert kubelet.errors == []

    asyncio.run(main())


def test_a_patch_named_in_a_configmap_is_applied_and_a_swapped_request_is_refused(
    tmp_path: Path,
) -> None:
    repo = bare_repo(tmp_path)
    patch = demo_patch("add-multiply")

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        s = await setup(
            api,
            repo,
            {"prompt": "add", "patchFrom": {"configMapKeyRef": {"name": "big", "key": "d"}}},
        )
        data = base64.b64encode(patch.encode()).decode()
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}}
        await api.create_configmap(NS, {**cm, "binaryData": {"d": data}})
        async with (
            evidence_io(tmp_path / "store") as io,
            FakeKubelet(api.server, tmp_path / "kubelet") as kubelet,
        ):
            request = RunnerRequest(
                kind="adapter", timeout_seconds=60, patch_file=PATCH_SOURCE_FILE, **s["common"]
            )
            inputs = io.prepare(s["key"], request, expires_at=expires())
            source = patch_source_volume("configMap", "big", "d")
            _, log = await run_job(api, kubelet, manifest(s, "adapter", inputs, source))
            assert log.result is not None and log.result.exit_code == 0, log.records
            assert log.result.diff is not None
            assert log.result.diff.sha256 == hashlib.sha256(patch.encode()).hexdigest()

            # a request swapped in the store after the grant was made is refused by the pod
            io.store.delete(inputs.request_key)
            other = request.model_copy(update={"timeout_seconds": 61})
            swapped = tmp_path / "swapped.json.gz"
            swapped.write_bytes(gzip.compress(other.model_dump_json().encode()))
            io.store.put_raw(inputs.request_key, swapped)
            await api.delete_object(
                "jobs", NS, job_name("add-multiply", s["te"]["metadata"]["uid"], 1, "adapter")
            )
            await kubelet.wait_idle()
            _, refused = await run_job(api, kubelet, manifest(s, "adapter", inputs, source))
            assert refused.result is None
            failed = [r for r in refused.records if r.get("event") == "runner_failed"]
            assert failed and "sha256" in failed[0]["error"], refused.records
            assert kubelet.errors == []

    asyncio.run(main())

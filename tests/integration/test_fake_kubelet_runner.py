"""The operator's adapter and gate Jobs, run by the fake kubelet: no cluster, real runner.

The Jobs are built exactly as the reconciler builds them (core.kube.jobs.job_manifest with a
RunnerRequest from the TaskExecution and Adapter resources); the fake kubelet runs
``python -m core.runner adapter|gate`` as local processes, cloning a real git repository
(examples/demo's calc bundle, as a bare repository behind a file:// URL). The evidence is
read back the way the reconciler reads it: pods of the Job, pod log, parse_pod_log.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from core.kube.api import Body, KubeApi
from core.kube.jobs import PATCH_DIR, job_finished, job_manifest, job_name, patch_configmap
from core.resources import AdapterResourceSpec, TaskExecutionSpec, adapter_spec, task_spec
from core.runner.protocol import ParsedLog, RunnerRequest, parse_pod_log
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


def test_a_patch_adapter_job_and_its_gate_job_run_to_completion(tmp_path: Path) -> None:
    repo = bare_repo(tmp_path)

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        te_body = task_execution(
            "add-multiply",
            repo,
            "patch",
            task={"prompt": "add", "patch": demo_patch("add-multiply")},
        )
        te = (await api.create_object("taskexecutions", NS, te_body)).object
        adp = (await api.create_object("adapters", NS, adapter("patch", "patch"))).object
        resource = AdapterResourceSpec.model_validate(adp["spec"])
        spec = TaskExecutionSpec.model_validate(te["spec"])
        task, engine_adapter = task_spec("add-multiply", spec), adapter_spec("patch", resource)
        uid = te["metadata"]["uid"]

        def manifest(role: Any, request: RunnerRequest, configmap: str | None = None) -> Body:
            return job_manifest(
                te=te,
                name=job_name("add-multiply", uid, 1, role),
                role=role,
                run_id=spec.run_id,
                task_id=task.task_id,
                attempt=1,
                image="unused-by-the-fake-kubelet",
                request_json=request.model_dump_json(),
                deadline_seconds=120,
                adapter=resource,
                patch_configmap=configmap,
                adapter_name="patch",
            )

        common: dict[str, Any] = dict(
            run_id=spec.run_id, task=task, adapter=engine_adapter, attempt=1, repo_url=repo
        )
        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            job, adapter_log = await run_job(
                api,
                kubelet,
                manifest("adapter", RunnerRequest(kind="adapter", timeout_seconds=60, **common)),
            )
            assert job_finished(job) == "Complete"
            result = adapter_log.result
            assert result is not None and result.kind == "adapter"
            assert result.exit_code == 0 and not result.timed_out
            assert result.diff is not None and not result.diff.empty
            assert result.diff.files_changed >= 1 and result.patch_b64
            events = [r.get("event") for r in adapter_log.records]
            assert "patch_applied" in events and "diff_captured" in events

            gate_name = job_name("add-multiply", uid, 1, "gate")
            cm = patch_configmap(te, f"{gate_name}-patch", result.patch_b64)
            assert (await api.create_configmap(NS, cm)).created
            gate_request = RunnerRequest(
                kind="gate",
                timeout_seconds=120,
                gate_checks=list(engine_adapter.gate),
                patch_file=f"{PATCH_DIR}/patch",
                **common,
            )
            gate_job, gate_log = await run_job(
                api, kubelet, manifest("gate", gate_request, f"{gate_name}-patch")
            )
            assert job_finished(gate_job) == "Complete"
            gate = gate_log.result.gate if gate_log.result else None
            assert gate is not None and gate.applied and gate.passed
            assert [c.name for c in gate.checks] == ["compile", "unit-tests"]
            assert all(c.status.value == "passed" for c in gate.checks)
            # Jobs, pods and the ConfigMap belong to the TaskExecution: deleting it clears all
            # (the pods once the kubelet confirms their containers stopped)
            assert await api.delete_object("taskexecutions", NS, "add-multiply")
            await kubelet.wait_idle()
            assert await api.list_jobs(NS) == [] and await api.list_pods(NS) == []
            assert await api.get_configmap(NS, f"{gate_name}-patch") is None
            assert kubelet.errors == []

    asyncio.run(main())

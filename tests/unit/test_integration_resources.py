"""The Integration resource's models, its gate Jobs' names and manifests, and the status <->
results projections (pure; the controller runs on the fake API in tests/integration and on
a cluster in tests/e2e/test_operator_integration.py)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from core.engine.escalation import Escalation, EscalationReason
from core.engine.integration_gate import TreeGateRequest
from core.integration_models import IntegrationStats, IntegrationTaskResult
from core.integration_resources import IntegrationSpec, IntegrationStatus, status_of_results
from core.kube.escalation_events import event_message, event_name
from core.kube.integration_gates import (
    gate_job,
    gate_job_name,
    gate_request,
    patch_configmap,
    tree_digest,
)
from core.kube.integration_submit import integration_resource, results_of
from core.kube.jobs import RunnerStorage
from core.models import GateCheck, GatePolicy, IntegrationOutcome, IntegrationResults
from core.resources import Resources
from core.runner.protocol import RunnerRequest

A, B, C = "a" * 40, "b" * 40, "c" * 40
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _request(head: str = B, number: int = 1, checks: tuple[str, ...] = ("unit",)) -> TreeGateRequest:
    return TreeGateRequest(
        run_id="merge",
        number=number,
        repository="/w/integration/ns/merge.git",
        base_commit=A,
        head_commit=head,
        patch=b"diff",
        checks=tuple(GateCheck(name=n, command=["{python}", "-m", "unittest"]) for n in checks),
        baseline=False,
        policy=GatePolicy(),
        task_ids=("t1", "t2"),
    )


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"runId": "r", "branch": "-x"}, "branch"),
        ({"runId": "r", "branch": "a..b"}, "branch"),
        ({"runId": "r", "branch": "a//b"}, "branch"),
        ({"runId": "r", "branch": "a/"}, "branch"),
        ({"runId": "r", "branch": "x.lock"}, "branch"),
        ({"runId": "r", "baseCommit": "main"}, "baseCommit"),
        ({"runId": "r", "batch": {"size": 8, "maxSize": 4}}, "batch"),
        ({"runId": "Run_1"}, "runId"),
    ],
)
def test_the_spec_refuses_what_git_or_the_queue_cannot_use(spec: dict, where: str) -> None:
    with pytest.raises(ValidationError) as err:
        IntegrationSpec.model_validate(spec)
    assert where in str(err.value)


def test_the_spec_defaults() -> None:
    spec = IntegrationSpec.model_validate({"runId": "r", "branch": "team/integration-1"})
    assert spec.batch.size == 4 and spec.batch.adaptive and spec.batch.max_size == 32
    assert spec.base_commit is None and spec.pending_timeout_seconds == 300


def test_gate_job_names_are_label_values_unique_per_run_and_tree() -> None:
    digest = tree_digest(_request())
    long = gate_job_name("i" * 63, "uid-1", 12, digest)
    assert len(long) <= 63 and LABEL_VALUE.fullmatch(long) and long.endswith("g")
    same = gate_job_name("merge", "uid-1", 1, tree_digest(_request()))
    assert same == gate_job_name("merge", "uid-1", 1, digest)
    assert gate_job_name("merge", "uid-2", 1, digest) != same  # another Integration object
    assert gate_job_name("merge", "uid-1", 2, digest) != same  # another gate run
    other_tree = tree_digest(_request(head=C))
    assert gate_job_name("merge", "uid-1", 1, other_tree) != same
    assert tree_digest(_request(checks=("unit", "lint"))) != digest


def test_the_gate_job_is_owned_by_the_integration_and_carries_the_runner_labels() -> None:
    itg = {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": "merge", "namespace": "ns", "uid": "uid-1"},
        "spec": {"runId": "merge"},
    }
    request = gate_request(_request(), "git://10.0.0.5/calc.git", 1024)
    assert request.kind == "gate" and request.task.base_commit == A
    assert request.repo_url == "git://10.0.0.5/calc.git" and request.patch_file
    job = gate_job(
        itg,
        name="merge-x-1-yg",
        number=3,
        digest="d" * 64,
        request=request,
        image="img",
        image_pull_policy="Never",
        resources=Resources(cpu="250m", memory="256Mi"),
        pending_timeout_seconds=60,
        storage=RunnerStorage(work="4Gi", ephemeral_limit="8Gi"),
    )
    meta = job["metadata"]
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    assert meta["ownerReferences"][0]["kind"] == "Integration"
    assert meta["annotations"] == {"orchestrator.dev/tree": "d" * 64}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels == meta["labels"]
    assert labels["app.kubernetes.io/name"] == "orchestrator-runner"
    assert labels["orchestrator.dev/role"] == "gate" and labels["orchestrator.dev/gate-run"] == "3"
    assert "orchestrator.dev/taskexecution" not in labels
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {
        "cpu": "250m",
        "memory": "256Mi",
        "ephemeral-storage": "8Gi",
    }
    assert {"name": "work", "emptyDir": {"sizeLimit": "4Gi"}} in pod["volumes"]
    assert container["command"] == ["python", "-m", "core.runner", "gate"]
    # the request and the merged diff come from the gate run's ConfigMap, mounted as the
    # runner's inputs; no fetch container, no grant (no evidence store involved)
    assert {"name": "inputs", "configMap": {"name": "merge-x-1-yg-patch"}} in pod["volumes"]
    assert pod["initContainers"] == []
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "ORCHESTRATOR_GRANT" not in env
    inputs = next(m for m in container["volumeMounts"] if m["name"] == "inputs")["mountPath"]
    assert env["ORCHESTRATOR_REQUEST_FILE"] == f"{inputs}/request.json"
    assert request.patch_file == f"{inputs}/patch"
    cm = patch_configmap(itg, "merge-x-1-yg-patch", b"diff --git a/x b/x\n", 3, request)
    assert RunnerRequest.model_validate_json(cm["data"]["request.json"]) == request
    assert base64.b64decode(cm["binaryData"]["patch"]) == b"diff --git a/x b/x\n"


def test_status_and_results_project_each_other() -> None:
    results = IntegrationResults(
        run_id="merge",
        repository="git://10.0.0.5/calc.git",
        local_repository="/w/integration/ns/merge.git",
        pushed=True,
        branch="orchestrator/integration/merge",
        base_commit=A,
        head_commit=B,
        generated_at=datetime.now(UTC),
        stats=IntegrationStats(merged=1, conflict=1, gate_runs=1, batches=1, one_by_one_gate_runs=1),
        tasks=[
            IntegrationTaskResult(
                task_id="a", outcome=IntegrationOutcome.MERGED, commit=B, attempt=1,
                adapter_id="patch", task_state="COMPLETED",
            ),
            IntegrationTaskResult(
                task_id="b", outcome=IntegrationOutcome.CONFLICT, attempt=1, adapter_id="patch",
                task_state="COMPLETED", reason="conflict in calc/ops.py; not sent back",
            ),
        ],
    )  # fmt: skip
    status = IntegrationStatus.model_validate({"state": "Succeeded", **status_of_results(results)})
    assert status.head_commit == B and status.pushed and status.stats is not None
    assert status.stats.conflict == 1 and [t.outcome for t in status.tasks] == ["merged", "conflict"]
    again = results_of("merge", "ns", status)
    assert again.head_commit == B and again.repository == results.repository
    assert [(t.task_id, t.outcome, t.commit, t.reason) for t in again.tasks] == [
        (t.task_id, t.outcome, t.commit, t.reason) for t in results.tasks
    ]
    assert again.stats.gate_runs_per_merge == 1.0
    assert "integration/ns/merge.git" in again.local_repository


def test_the_client_applies_one_integration_per_run() -> None:
    body = integration_resource("merge", branch="b", batch_size=2, max_batch_size=8)
    assert body["metadata"]["name"] == "merge"
    spec = IntegrationSpec.model_validate(body["spec"])
    assert spec.branch == "b" and spec.batch.size == 2 and spec.batch.max_size == 8


def test_escalation_events_have_fixed_names_and_say_where_the_evidence_is() -> None:
    escalation = Escalation(
        key="breaker_open/ns/llm/2026-01-01T00:00:00+00:00",
        reason=EscalationReason.BREAKER_OPEN,
        message="circuit breaker of adapter llm opened",
        created_at=datetime.now(UTC),
        evidence={"resilience_log": "logs/resilience.jsonl"},
    )
    te = {"kind": "TaskExecution", "metadata": {"name": "t"}}
    adapter = {"kind": "Adapter", "metadata": {"name": "t"}}
    assert event_name(te, escalation.key) == event_name(te, escalation.key)
    assert event_name(te, escalation.key) != event_name(adapter, escalation.key)
    assert re.fullmatch(r"t\.esc-[0-9a-f]{16}", event_name(te, escalation.key))
    text = event_message(escalation)
    assert text.startswith("breaker_open (warning): circuit breaker of adapter llm opened")
    assert "evidence: resilience_log: logs/resilience.jsonl" in text

"""Two operators with kopf peering: only the one with the higher priority acts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.operator_harness import (
    ROOT,
    OperatorProcess,
    adapter,
    apply,
    demo_patch,
    get_json,
    git_server,
    task_execution,
    wait_for,
)

pytestmark = pytest.mark.cluster
PEERING = "orchestrator"


@pytest.fixture(scope="module")
def ha(
    kube_cluster, kubectl, kube_api, project_image, image_pull_policy, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "charts/orchestrator/crds")
    )
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/kopfpeerings.kopf.dev",
        "crd/taskexecutions.orchestrator.dev",
    )
    namespace = f"e2e-ha-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube_api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
    )
    wait_for(
        lambda: (
            kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode
            == 0
        ),
        60,
        "the default ServiceAccount",
    )
    apply(
        kubectl,
        namespace,
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}},
    )
    repo = git_server(kubectl, namespace, project_image, image_pull_policy)
    apply(kubectl, namespace, adapter("patch", "patch", retry={"maxAttempts": 1}))
    operators = {
        name: OperatorProcess(
            kubeconfig=kube_cluster.kubeconfig,
            namespace=namespace,
            image=project_image,
            pull_policy=image_pull_policy,
            workdir=tmp_path_factory.mktemp(f"operator-{name}"),
            mode=("--peering", PEERING, "--priority", str(priority)),
        )
        for name, priority in (("leader", 100), ("standby", 50))
    }
    for op in operators.values():
        op.start()
    try:
        yield {"ns": namespace, "repo": repo, **operators}
    finally:
        for name, op in operators.items():
            op.stop()
            print(f"\n{name} log tail:\n{op.tail(2000)}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_only_the_higher_priority_peer_acts(kubectl, ha) -> None:
    standby: OperatorProcess = ha["standby"]
    leader: OperatorProcess = ha["leader"]

    def peers() -> int:
        status = get_json(kubectl, "kopfpeering", PEERING, "-n", ha["ns"]).get("status") or {}
        return len(status)

    # both operators have announced themselves in the peering object
    wait_for(lambda: peers() >= 2, 120, "both peers in the KopfPeering status")
    obj = task_execution(
        "ha-task", ha["repo"], "patch", task={"prompt": "x", "patch": demo_patch("add-multiply")}
    )
    apply(kubectl, ha["ns"], obj)

    def done() -> dict[str, Any] | None:
        status = get_json(kubectl, "tex", "ha-task", "-n", ha["ns"]).get("status", {})
        return status if status.get("state") in ("COMPLETED", "FAILED", "TIMEOUT") else None

    status = wait_for(done, 300, "ha-task to finish", lambda: leader.tail() + standby.tail())
    assert status["state"] == "COMPLETED" and status["attempt"] == 1
    jobs = get_json(
        kubectl, "jobs", "-n", ha["ns"], "-l", "orchestrator.dev/taskexecution=ha-task"
    )["items"]
    assert len(jobs) == 2  # one adapter Job, one gate Job: nobody acted twice
    assert "ha-task" in leader.tail(1_000_000)
    assert "ha-task" not in standby.tail(1_000_000)
    ledger = standby.workdir / ".state/patch_ledger.jsonl"
    assert not ledger.exists() or ledger.read_text() == ""

    # the standby was paused by the leader: when the leader goes, it takes over
    leader.stop()
    wait_for(
        lambda: "Resuming operations after the pause" in standby.tail(1_000_000),
        120,
        "the standby to resume after the leader left",
        standby.tail,
    )

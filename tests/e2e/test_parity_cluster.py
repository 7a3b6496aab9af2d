"""The parity suite on a real cluster: every scenario through the embedded executor and
through the operator (the control loop, out of cluster) with adapter and gate Jobs running
the project image; the two backends must record the same outcome, and the expected one.

The scenario's repository is served to the pods by an in-cluster git daemon (the same
commits the embedded backend clones from disk); the Adapters may reach only it (the cluster
enforces NetworkPolicy).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.db.database import default_url
from core.kube.client_api import ClientKubeApi
from tests.e2e.operator_harness import ROOT, get_json, git_server, wait_for
from tests.parity import (
    SCENARIOS,
    Cluster,
    Scenario,
    drive_kubernetes,
    outcomes,
    run_embedded,
    workdir_for,
)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crds(kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/taskexecutions.orchestrator.dev")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_the_cluster_records_what_the_embedded_backend_records(
    tmp_path: Path,
    scenario: Scenario,
    crds: None,
    kubectl: Any,
    kube_cluster: Any,
    project_image: str,
    image_pull_policy: str,
) -> None:
    embedded = run_embedded(tmp_path / "embedded", scenario)
    expected = dict(scenario.expect)
    assert {t: (o.state, o.failure_class, o.attempts) for t, o in embedded.items()} == expected
    assert scenario.gate_expectations(embedded) == (scenario.expect_gate or {})

    namespace = f"e2e-parity-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", namespace)
    try:
        wait_for(
            lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
            60,
            "the default ServiceAccount",
        )
        workdir = workdir_for(tmp_path / "kube", scenario)
        bundle = tmp_path / "repo.bundle"
        subprocess.run(
            ["git", "bundle", "create", str(bundle), "--all"],
            cwd=workdir / "repo",
            check=True,
            capture_output=True,
        )
        repo_url = git_server(kubectl, namespace, project_image, image_pull_policy, bundle)
        git_ip = get_json(kubectl, "pod", "git-server", "-n", namespace)["status"]["podIP"]

        def with_egress(adapter: dict[str, Any]) -> dict[str, Any]:
            adapter["spec"]["egress"] = [{"cidr": f"{git_ip}/32", "ports": [9418]}]
            return adapter

        operator = tmp_path / "operator"
        operator.mkdir()

        async def main() -> None:
            api = await ClientKubeApi.connect(kube_cluster.kubeconfig)

            async def connect() -> ClientKubeApi:
                return api

            try:
                await drive_kubernetes(
                    api,
                    workdir,
                    scenario,
                    operator_workdir=operator,
                    cluster=Cluster(
                        connect,
                        namespace,
                        runner_image=project_image,
                        image_pull_policy=image_pull_policy,
                        timeout=300,
                        # runner pods upload to the test's evidence server on the node address
                        evidence_host=os.environ.get(
                            "ORCHESTRATOR_E2E_EVIDENCE_HOST", "10.213.0.1"
                        ),
                    ),
                    adapter_patch=with_egress,
                    repo_url=repo_url,
                )
            finally:
                await api.close()

        asyncio.run(main())
        cluster = outcomes(default_url(operator), operator, [t["task_id"] for t in scenario.tasks])
        assert cluster == embedded
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)

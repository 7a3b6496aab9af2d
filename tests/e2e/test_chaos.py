"""The short form of the chaos run (issue 11; the recorded run is bench/chaos.py).

16 TaskExecutions of every kind (patch successes, gate failures, a retried flaky adapter, a
crashing adapter with a fallback, slow adapters, a budget running out) on the real cluster with
PostgreSQL, while the operator is SIGKILLed 10 times at random moments (seeded), 10 API faults
(the next 1-3 calls of a kind answered 500, 503, 429 or dropped) go through the fault proxy,
runner pods and a Job are deleted by hand and the leader of two replicas is killed. Then the invariant
checker compares what the API server (TaskExecutions, Jobs seen during the run, Events, pods,
ConfigMaps), the database, the ledger and the event log hold: every task terminal exactly
once, nothing lost, nothing written twice, no orphans after garbage collection.

The kube-apiserver restarts and PostgreSQL outages of the full run are not part of the suite:
both are shared with every other test session on the machine.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from core.db.database import upgrade
from tests.e2e.chaos_harness import ChaosRun, Cluster, Plan

pytestmark = pytest.mark.cluster


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    upgrade(postgres_url)
    yield postgres_url


@pytest.mark.timeout(900)  # setup, the disruptions, convergence and the checks
def test_operator_kills_lose_duplicate_and_strand_nothing(
    kube_cluster, kubectl, project_image, image_pull_policy, database, tmp_path
) -> None:
    cluster = Cluster(
        kubectl=kubectl,
        kubectl_bin=kube_cluster.kubectl_bin or "kubectl",
        kubeconfig=kube_cluster.kubeconfig,
        image=project_image,
        pull_policy=image_pull_policy,
    )
    plan = Plan(
        tasks=16,
        operator_kills=10,
        pods_deleted=2,
        jobs_deleted=1,
        leader_kills=1,
        api_faults=10,
        seed=20261129,
        max_in_flight=8,
        uptime=(0.2, 6.0),
        converge_timeout=300,
        gc_sample=3,
    )
    namespace = f"e2e-chaos-{uuid.uuid4().hex[:8]}"
    run = ChaosRun(
        cluster, plan, namespace=namespace, workdir=tmp_path / "work", database_url=database
    )
    try:
        run.setup()
        result = run.run()
    finally:
        run.close()
        for name, op in run.operators.items():
            print(f"\noperator {name} log tail:\n{op.tail(3000)}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    print({k: v for k, v in result.items() if k != "plan"})

    assert result["tasks"] == 16
    assert result["operator_kills"] == 10 and result["leader_kills"] == 1
    assert result["pods_deleted"] == 2 and result["jobs_deleted"] == 1
    # the faults were served to the operator, not only planned
    assert result["api_faults_injected"] == 10 and result["api_faults"] >= 5
    assert result["violations"] == []
    assert (result["lost"], result["duplicated"], result["stuck"]) == (0, 0, 0)
    # the run really exercised what it claims: attempts were recorded and Jobs were seen
    assert result["recorder"]["jobs_seen"] >= 16
    assert sum(result["outcomes"].values()) == 16

"""The chart's high-availability install on a real cluster: two replicas, one leader.

`helm install` with replicaCount=2, PostgreSQL (migrated by the chart's pre-install hook Job)
and a ReadWriteMany work dir, into a namespace enforcing `restricted`. Asserted on what the
API server, the database and the ledger saw:

* the replicas elect one leader: the Lease names one operator pod; both pods are Ready (the
  standby answers its probes), and each pod's own /healthz says which one leads;
* the quickstart's task completes exactly once: one Job per role, one TASK_STARTED and one
  TASK_COMPLETED Event, one task row, one patch_history row, one ledger entry; the Lease
  never changed hands meanwhile, so no other replica acted;
* the leader's pod is deleted: the standby takes the Lease at once (the leader released it
  on its way out), and a second task completes exactly once under the new leader; the
  ledger the two leaders wrote is one valid chain.

With ``operator.shards=4`` (horizontal shards, core/kube/shards.py), two replicas split the
four shard Leases 2/2 and each holds a member Lease (so no 403 on any of them: the chart's Role
names them all); tasks complete exactly once while the holders stay put; a deleted pod's
shards pass to the live replicas (its replacement joins and takes its share), and a task after
that completes exactly once; the ledger both replicas wrote at once is one valid chain.

PostgreSQL: pods cannot reach the test machine's loopback, so the ``cluster_postgres_url``
fixture runs a throwaway server on the node address (hack/postgres/for-cluster; traffic
stays on the machine), with a fresh database for this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from core.db.database import make_engine
from core.db.tables import ExecutionLog, PatchHistory, Task
from core.kube.shards import member_lease, shard_lease
from core.models import LedgerEntry
from tests.e2e.operator_harness import ROOT, get_json, wait_for
from tests.e2e.test_chart_e2e import (
    EXAMPLE_GIT_EGRESS,
    FORBIDDEN,
    _helm,
    _restricted,
    apply_example,
    host_volume,
    lease_of,
    wait_finished,
)
from tests.unit.test_chart import CHART

pytestmark = pytest.mark.cluster


@pytest.fixture
def ha_database(cluster_postgres_url: str) -> Iterator[str]:
    """A fresh database on the cluster-reachable server, dropped afterwards."""
    name = f"orch_ha_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        cluster_postgres_url.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"{cluster_postgres_url.rsplit('/', 1)[0]}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def operator_pods(kubectl: Any, ns: str, release: str) -> dict[str, dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    items = get_json(kubectl, "pods", "-n", ns, "-l", selector).get("items", [])
    return {p["metadata"]["name"]: p for p in items if not p["metadata"].get("deletionTimestamp")}


def ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def healthz(kubectl: Any, ns: str, pod: str) -> dict[str, Any]:
    """The pod's own /healthz (kopf's probes), through the API server's pod proxy."""
    out = kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}:8080/proxy/healthz")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def task_events(kubectl: Any, ns: str, name: str) -> list[str]:
    items = get_json(
        kubectl, "events", "-n", ns, "--field-selector", f"involvedObject.name={name}"
    ).get("items", [])
    return sorted(e["reason"] for e in items if e["reason"].startswith("TASK_"))


def task_jobs(kubectl: Any, ns: str, name: str) -> list[str]:
    items = get_json(
        kubectl, "jobs", "-n", ns, "-l", f"orchestrator.dev/taskexecution={name}"
    ).get("items", [])
    return sorted(j["metadata"]["labels"]["orchestrator.dev/role"] for j in items)


def db_rows(url: str, uid: str) -> tuple[list[str], list[str], list[int]]:
    """Task states, execution_log events and patch_history attempts of one TaskExecution."""
    engine = make_engine(url)
    with Session(engine) as s:
        tasks = [t.status for t in s.scalars(select(Task).where(Task.uid == uid))]
        events = [
            e.event
            for e in s.scalars(
                select(ExecutionLog).where(ExecutionLog.task_uid == uid).order_by(ExecutionLog.id)
            )
        ]
        attempts = [h.attempt for h in s.scalars(select(PatchHistory).where(PatchHistory.task_uid == uid))]
    engine.dispose()
    return tasks, events, attempts


@contextmanager
def _installed(
    kube_cluster: Any, release: str, ns: str, values: dict[str, Any], debug: Callable[[], str]
) -> Iterator[subprocess.CompletedProcess[str]]:
    """The chart installed (``helm install --wait``; its output), uninstalled afterwards."""
    out = _helm(kube_cluster.kubeconfig, "install", release, str(CHART), "-n", ns,
                "--wait", "--timeout", "5m", values=values)  # fmt: skip
    assert out.returncode == 0, f"{out.stderr}\n{debug()}"
    try:
        yield out
    finally:
        _helm(kube_cluster.kubeconfig, "uninstall", release, "-n", ns, "--wait",
              "--timeout", "3m")  # fmt: skip


def _release(
    kubectl: Any, ns: str, prefix: str, database_url: str
) -> tuple[str, str, Callable[[], str]]:
    """A release name for the namespace (restricted, with the database Secret), its full name,
    and what to show when a wait fails: pods, Jobs, Leases, Events and the operators' logs."""
    release = f"{prefix}-{uuid.uuid4().hex[:6]}"
    _restricted(kubectl, ns)
    kubectl("create", "secret", "generic", "orch-db", "-n", ns, f"--from-literal=url={database_url}")

    def debug() -> str:
        out = kubectl("get", "pods,jobs,leases,events", "-n", ns, check=False).stdout
        for pod in operator_pods(kubectl, ns, release):
            log = kubectl("logs", "-n", ns, pod, "--tail=60", check=False).stdout
            out += f"\n--- {pod}\n{log}"
        return out

    return release, f"{release}-orchestrator", debug


def test_two_replicas_elect_one_leader_and_the_task_completes_exactly_once(
    kube_cluster, kubectl, kube_namespace, project_image, image_pull_policy, ha_database
) -> None:
    ns = kube_namespace
    release, fullname, debug = _release(kubectl, ns, "ha", ha_database)
    repository, tag = project_image.rsplit(":", 1)

    with host_volume(kube_cluster, kubectl, f"orch-e2e-{ns}", "ReadWriteMany") as (volume, path):
        values = {
            "image": {"repository": repository, "tag": tag, "pullPolicy": image_pull_policy},
            "replicaCount": 2,
            "database": {"type": "postgresql", "postgresql": {"urlSecret": {"name": "orch-db"}}},
            "persistence": volume,
            "networkPolicy": {"extraEgress": [EXAMPLE_GIT_EGRESS]},
        }
        with _installed(kube_cluster, release, ns, values, debug) as out:
            assert f"get lease {fullname}" in out.stdout  # NOTES.txt names the Lease

            # --- one leader: the Lease names one of the two pods; both are Ready
            pods = wait_for(
                lambda: (p := operator_pods(kubectl, ns, release)) and len(p) == 2
                and all(ready(x) for x in p.values()) and p,
                180, "two Ready operator pods", debug,
            )  # fmt: skip
            leader = wait_for(
                lambda: lease_of(kubectl, ns, fullname).get("holderIdentity") in pods
                and lease_of(kubectl, ns, fullname)["holderIdentity"],
                120, "one replica to hold the Lease", debug,
            )  # fmt: skip
            (standby,) = set(pods) - {leader}
            lease = lease_of(kubectl, ns, fullname)
            # each pod's own probes: kopf's endpoint answers on both, and says who leads (kopf
            # caches probe results for 10 s: the leader's may predate its Lease at first)
            wait_for(lambda: healthz(kubectl, ns, leader)["leader"] is True, 60,
                     "the leader's /healthz to say so", debug)  # fmt: skip
            assert healthz(kubectl, ns, standby)["leader"] is False

            # --- the quickstart's task, exactly once
            te = apply_example(kubectl, ns, project_image, image_pull_policy)
            name = te["metadata"]["name"]
            status = wait_finished(kubectl, ns, name, debug)
            assert status["state"] == "COMPLETED" and status["attempt"] == 1, status
            uid = get_json(kubectl, "tex", name, "-n", ns)["metadata"]["uid"]
            assert task_jobs(kubectl, ns, name) == ["adapter", "gate"]
            assert task_events(kubectl, ns, name) == ["TASK_COMPLETED", "TASK_STARTED"]
            assert db_rows(ha_database, uid) == (
                ["COMPLETED"], ["TASK_STARTED", "TASK_COMPLETED"], [1]
            )
            # the Lease never changed hands: nobody but the leader could have acted
            now = lease_of(kubectl, ns, fullname)
            assert now["holderIdentity"] == leader
            assert now.get("leaseTransitions") == lease.get("leaseTransitions")
            assert operator_pods(kubectl, ns, release).keys() == pods.keys()
            assert ready(operator_pods(kubectl, ns, release)[standby])

            # --- the leader goes (a graceful delete): the standby leads at once
            kubectl("delete", "pod", leader, "-n", ns, "--wait=false")
            wait_for(
                lambda: lease_of(kubectl, ns, fullname).get("holderIdentity") == standby,
                60, "the standby to take the Lease", debug,
            )  # fmt: skip
            after = lease_of(kubectl, ns, fullname)
            assert after["leaseTransitions"] == lease["leaseTransitions"] + 1
            te2 = apply_example(kubectl, ns, project_image, image_pull_policy, name=f"{name}-2")
            status = wait_finished(kubectl, ns, te2["metadata"]["name"], debug)
            assert status["state"] == "COMPLETED" and status["attempt"] == 1, status
            uid2 = get_json(kubectl, "tex", te2["metadata"]["name"], "-n", ns)["metadata"]["uid"]
            assert task_jobs(kubectl, ns, te2["metadata"]["name"]) == ["adapter", "gate"]
            assert task_events(kubectl, ns, te2["metadata"]["name"]) == [
                "TASK_COMPLETED",
                "TASK_STARTED",
            ]
            assert db_rows(ha_database, uid2) == (
                ["COMPLETED"], ["TASK_STARTED", "TASK_COMPLETED"], [1]
            )
            assert db_rows(ha_database, uid)[2] == [1]  # the first task was not redone
            assert lease_of(kubectl, ns, fullname)["holderIdentity"] == standby

            # no replica was refused anything (the Lease verbs included)
            for pod in operator_pods(kubectl, ns, release):
                log = kubectl("logs", "-n", ns, pod, check=False).stdout
                assert not FORBIDDEN.search(log), (pod, log[-3000:])

            # --- one ledger, written by both leaders on the shared work dir, one chain
            if path is not None:
                lines = (path / ".state/patch_ledger.jsonl").read_text().splitlines()
                entries = [LedgerEntry.model_validate_json(x) for x in lines]
                assert sorted((e.task_id, e.attempt) for e in entries) == [
                    (name, 1),
                    (f"{name}-2", 1),
                ]
                verify = subprocess.run(
                    [sys.executable, "-m", "core.cli", "ledger", "verify",
                     "--workdir", str(path), "--database-url", ha_database],
                    capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
                )  # fmt: skip
                assert verify.returncode == 0, verify.stdout + verify.stderr


SHARDS = 4


def test_sharded_replicas_split_the_shards_and_each_task_completes_once(
    kube_cluster, kubectl, kube_namespace, project_image, image_pull_policy, ha_database
) -> None:
    ns = kube_namespace
    release, fullname, debug = _release(kubectl, ns, "sh", ha_database)
    repository, tag = project_image.rsplit(":", 1)

    def holders() -> list[str | None]:
        return [lease_of(kubectl, ns, shard_lease(fullname, i)).get("holderIdentity")
                for i in range(SHARDS)]  # fmt: skip

    def split_between(pods: set[str]) -> list[str | None] | None:
        """The shard holders once the live pods hold two shards each, else None."""
        now = holders()
        return now if set(now) == pods and sorted(Counter(now).values()) == [2, 2] else None

    def no_refusals() -> None:
        for pod in operator_pods(kubectl, ns, release):
            log = kubectl("logs", "-n", ns, pod, check=False).stdout
            assert not FORBIDDEN.search(log), (pod, log[-3000:])

    def completes_once(name: str) -> str:
        status = wait_finished(kubectl, ns, name, debug)
        assert status["state"] == "COMPLETED" and status["attempt"] == 1, status
        uid: str = get_json(kubectl, "tex", name, "-n", ns)["metadata"]["uid"]
        assert task_jobs(kubectl, ns, name) == ["adapter", "gate"]
        assert task_events(kubectl, ns, name) == ["TASK_COMPLETED", "TASK_STARTED"]
        assert db_rows(ha_database, uid) == (["COMPLETED"], ["TASK_STARTED", "TASK_COMPLETED"], [1])
        return uid

    with host_volume(kube_cluster, kubectl, f"orch-e2e-{ns}", "ReadWriteMany") as (volume, path):
        values = {
            "image": {"repository": repository, "tag": tag, "pullPolicy": image_pull_policy},
            "replicaCount": 2,
            "operator": {"shards": SHARDS},
            "database": {"type": "postgresql", "postgresql": {"urlSecret": {"name": "orch-db"}}},
            "persistence": volume,
            "networkPolicy": {"extraEgress": [EXAMPLE_GIT_EGRESS]},
        }
        with _installed(kube_cluster, release, ns, values, debug) as out:
            assert f"share {SHARDS} shards" in out.stdout  # NOTES.txt

            # --- the two replicas split the shards 2/2; each holds a member slot
            pods = wait_for(
                lambda: (p := operator_pods(kubectl, ns, release)) and len(p) == 2
                and all(ready(x) for x in p.values()) and p,
                180, "two Ready operator pods", debug,
            )  # fmt: skip
            split = wait_for(lambda: split_between(set(pods)), 120, "the shards to split 2/2", debug)
            members = {lease_of(kubectl, ns, member_lease(fullname, k)).get("holderIdentity")
                       for k in range(SHARDS)} - {None, ""}  # fmt: skip
            assert members == set(pods)
            transitions = [lease_of(kubectl, ns, shard_lease(fullname, i)).get("leaseTransitions")
                           for i in range(SHARDS)]  # fmt: skip

            # --- tasks complete exactly once; no shard changed hands meanwhile
            te = apply_example(kubectl, ns, project_image, image_pull_policy)
            name = te["metadata"]["name"]
            names = [name] + [f"{name}-{n}" for n in range(2, 5)]
            for other in names[1:]:
                apply_example(kubectl, ns, project_image, image_pull_policy, name=other)
            uids = [completes_once(n) for n in names]
            assert holders() == split
            assert [lease_of(kubectl, ns, shard_lease(fullname, i)).get("leaseTransitions")
                    for i in range(SHARDS)] == transitions  # fmt: skip
            no_refusals()

            # --- one replica goes (a graceful delete): its replacement joins, the shards split
            # again between the live pods, and the gone pod holds none
            gone = sorted(pods)[0]
            kubectl("delete", "pod", gone, "-n", ns, "--wait=false")
            now = wait_for(
                lambda: (p := operator_pods(kubectl, ns, release)) and len(p) == 2
                and gone not in p and all(ready(x) for x in p.values()) and p,
                180, "a Ready replacement pod", debug,
            )  # fmt: skip
            wait_for(lambda: split_between(set(now)), 120, "the shards to split again", debug)
            last = f"{name}-5"
            apply_example(kubectl, ns, project_image, image_pull_policy, name=last)
            completes_once(last)
            assert [db_rows(ha_database, uid)[2] for uid in uids] == [[1]] * len(uids)  # none redone
            no_refusals()

            # --- one ledger, appended to by both replicas at once, one valid chain
            if path is not None:
                lines = (path / ".state/patch_ledger.jsonl").read_text().splitlines()
                entries = [LedgerEntry.model_validate_json(x) for x in lines]
                assert sorted((e.task_id, e.attempt) for e in entries) == sorted(
                    (n, 1) for n in [*names, last]
                )
                verify = subprocess.run(
                    [sys.executable, "-m", "core.cli", "ledger", "verify",
                     "--workdir", str(path), "--database-url", ha_database],
                    capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
                )  # fmt: skip
                assert verify.returncode == 0, verify.stdout + verify.stderr

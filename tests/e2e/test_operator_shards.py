"""Two sharded operator replicas split a burst of TaskExecutions, and one takes over when the
other dies (issue 17, horizontal shards; the 1,000-task form is bench/shards_bench.py).

The replicas run with ``ORCHESTRATOR_SHARDS=4`` on one PostgreSQL database and one work dir,
as the HA setup does. The namespace admits no pods (ResourceQuota pods=0): every task gets
its adapter Job, its TASK_STARTED Event, its DB row and its IN_PROGRESS status, and then
waits, so the test costs the API server's work only. Asserted on what the API server and the
database saw: the shard Leases split 2/2; every task has exactly one Job, one TASK_STARTED
Event, one task row and one TASK_STARTED log row; the tasks lie in shards of both replicas
(so both worked: a replica that dropped its shards' keys would leave tasks without a Job);
after a SIGKILL the survivor holds every shard once the dead one's Leases expired, works new
tasks, and has redone none of the old ones.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from core.db.database import make_engine, upgrade
from core.db.tables import ExecutionLog, Task
from core.kube.shards import shard_lease, shard_of
from tests.e2e.operator_harness import (
    OperatorProcess,
    adapter,
    apply,
    apply_crds,
    demo_patch,
    free_port,
    get_json,
    task_execution,
    wait_for,
)

pytestmark = pytest.mark.cluster
LEASE = "orchestrator-operator"
SHARDS = 4
BURST = 60
REPO = "git://127.0.0.1:1/none.git"  # never cloned: no pod ever starts


@pytest.fixture(scope="module")
def shared_db(postgres_server_url: str) -> Iterator[str]:
    name = f"orch_shards_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        postgres_server_url.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{postgres_server_url.rsplit('/', 1)[0]}/{name}"
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def sharded(
    kube_cluster, kubectl, project_image, image_pull_policy, tmp_path_factory, shared_db
) -> Iterator[dict[str, Any]]:
    apply_crds(kubectl)
    namespace = f"e2e-shards-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", namespace)
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        60,
        "the default ServiceAccount",
    )
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }
    apply(kubectl, namespace, quota)
    apply(kubectl, namespace, adapter("patch", "patch", retry={"maxAttempts": 1}))
    workdir = tmp_path_factory.mktemp("sharded")
    evidence_port = free_port()
    operators = {
        name: OperatorProcess(
            kubeconfig=kube_cluster.kubeconfig,
            namespace=namespace,
            image=project_image,
            pull_policy=image_pull_policy,
            workdir=workdir,
            env={
                "ORCHESTRATOR_DATABASE_URL": shared_db,
                "ORCHESTRATOR_IDENTITY": name,
                "ORCHESTRATOR_SHARDS": str(SHARDS),
                "ORCHESTRATOR_LEASE_DURATION_SECONDS": "8",
                "ORCHESTRATOR_RENEW_DEADLINE_SECONDS": "5",
                "ORCHESTRATOR_RETRY_PERIOD_SECONDS": "1",
            },
            evidence_port=evidence_port,
        )
        for name in ("first", "second")
    }
    try:
        yield {"ns": namespace, "db": shared_db, **operators}
    finally:
        for name, op in operators.items():
            op.stop()
            print(f"\n{name} log tail:\n{op.tail(3000)}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def holders(kubectl, ns: str) -> list[str | None]:
    out = []
    for i in range(SHARDS):
        lease = get_json(kubectl, "lease", shard_lease(LEASE, i), "-n", ns)
        out.append((lease.get("spec") or {}).get("holderIdentity") if lease else None)
    return out


def burst(kubectl, ns: str, names: list[str]) -> None:
    apply_crds(kubectl)  # the shared cluster may hold another checkout's CRDs by now
    task = {"prompt": "x", "patch": demo_patch("add-multiply")}
    items = [task_execution(n, REPO, "patch", task=task, pendingTimeoutSeconds=3600) for n in names]
    apply(kubectl, ns, {"apiVersion": "v1", "kind": "List", "items": items})


def jobs_by_task(kubectl, ns: str) -> Counter[str]:
    items = get_json(kubectl, "jobs", "-n", ns).get("items", [])
    return Counter(j["metadata"]["labels"]["orchestrator.dev/taskexecution"] for j in items)


def started_events(kubectl, ns: str) -> Counter[str]:
    items = get_json(kubectl, "events", "-n", ns).get("items", [])
    return Counter(e["involvedObject"]["name"] for e in items if e["reason"] == "TASK_STARTED")


def uids(kubectl, ns: str) -> dict[str, str]:
    items = get_json(kubectl, "tex", "-n", ns).get("items", [])
    return {te["metadata"]["name"]: te["metadata"]["uid"] for te in items}


def db_counts(url: str) -> tuple[Counter[str], Counter[str]]:
    engine = make_engine(url)
    with Session(engine) as s:
        tasks = Counter(t.task_id for t in s.scalars(select(Task)))
        started = Counter(
            e.task_id
            for e in s.scalars(select(ExecutionLog).where(ExecutionLog.event == "TASK_STARTED"))
        )
    engine.dispose()
    return tasks, started


def all_started(kubectl, ns: str, names: list[str]) -> bool:
    jobs, events = jobs_by_task(kubectl, ns), started_events(kubectl, ns)
    return all(jobs[n] >= 1 and events[n] >= 1 for n in names)


def assert_once(kubectl, ns: str, db: str, names: list[str]) -> None:
    jobs, events = jobs_by_task(kubectl, ns), started_events(kubectl, ns)
    tasks, started = db_counts(db)
    assert {n: jobs[n] for n in names} == dict.fromkeys(names, 1)
    assert {n: events[n] for n in names} == dict.fromkeys(names, 1)
    assert {n: tasks[n] for n in names} == dict.fromkeys(names, 1)
    assert {n: started[n] for n in names} == dict.fromkeys(names, 1)


def test_two_shards_split_a_burst_and_the_survivor_takes_over(kubectl, sharded) -> None:
    first: OperatorProcess = sharded["first"]
    second: OperatorProcess = sharded["second"]
    ns, db = sharded["ns"], sharded["db"]

    def logs() -> str:
        return first.tail() + second.tail()

    first.start()
    second.start()
    wait_for(
        lambda: sorted(map(str, holders(kubectl, ns))) == ["first", "first", "second", "second"],
        180,
        "the shards to split 2/2",
        logs,
    )
    before = holders(kubectl, ns)

    names = [f"s-{i:03d}" for i in range(BURST)]
    burst(kubectl, ns, names)
    wait_for(lambda: all_started(kubectl, ns, names), 600, "every task's Job and Event", logs)
    assert holders(kubectl, ns) == before  # no handover during the burst: attribution is exact
    assert_once(kubectl, ns, db, names)
    by_uid = uids(kubectl, ns)
    worked = Counter(before[shard_of(by_uid[n], SHARDS)] for n in names)
    assert set(worked) == {"first", "second"}, worked  # both replicas worked

    # SIGKILL: no release; the survivor takes the dead one's shards once their Leases expire
    second.kill()
    wait_for(lambda: holders(kubectl, ns) == ["first"] * SHARDS, 120, "the takeover", first.tail)
    more = [f"t-{i:03d}" for i in range(20)]
    burst(kubectl, ns, more)
    wait_for(lambda: all_started(kubectl, ns, more), 300, "the new tasks", first.tail)
    assert_once(kubectl, ns, db, names + more)  # nothing redone by the takeover
    states = Counter(
        (te.get("status") or {}).get("state")
        for te in get_json(kubectl, "tex", "-n", ns).get("items", [])
    )
    assert states == {"IN_PROGRESS": BURST + len(more)}

"""Two operator replicas, one Lease: only the leader acts; when it dies the standby takes over.

The replicas share a PostgreSQL database and a work dir (the chart's HA setup: PostgreSQL and
a ReadWriteMany volume). Asserted on what the API server (Jobs, Events, the Lease), the
database and the ledger saw, not on log text: one Job per attempt and role, one TASK_STARTED
and one TASK_COMPLETED Event per task, one task row, one patch_history row and one ledger
entry per attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from core.db.database import make_engine, upgrade
from core.db.tables import ExecutionLog, PatchHistory, Task
from core.models import LedgerEntry
from tests.e2e.operator_harness import (
    ROOT,
    OperatorProcess,
    adapter,
    apply,
    demo_patch,
    free_port,
    get_json,
    git_server,
    task_execution,
    wait_for,
)

pytestmark = pytest.mark.cluster
LEASE = "orchestrator-operator"
SLEEPY = (
    "import pathlib, time\nfor i in range(20):\n    print('step', i, flush=True)\n"
    "    time.sleep(1)\npathlib.Path('docs/done.md').write_text('done\\n')\n"
)


@pytest.fixture(scope="module")
def shared_db(postgres_server_url: str) -> Iterator[str]:
    name = f"orch_ha_{uuid.uuid4().hex[:10]}"
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
def ha(
    kube_cluster, kubectl, project_image, image_pull_policy, tmp_path_factory, shared_db
) -> Iterator[dict[str, Any]]:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/taskexecutions.orchestrator.dev")
    namespace = f"e2e-ha-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", namespace)
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        60,
        "the default ServiceAccount",
    )
    repo = git_server(kubectl, namespace, project_image, image_pull_policy)
    git_pod_ip = get_json(kubectl, "pod", "git-server", "-n", namespace)["status"]["podIP"]
    egress = [{"cidr": f"{git_pod_ip}/32", "ports": [9418]}]
    apply(kubectl, namespace, adapter("patch", "patch", retry={"maxAttempts": 1}, egress=egress))
    apply(
        kubectl,
        namespace,
        adapter(
            "sleepy",
            "process",
            command=["{python}", "-c", SLEEPY],
            retry={"maxAttempts": 2, "backoffInitialSeconds": 1, "jitterSeconds": 0},
            egress=egress,
        ),
    )
    workdir = tmp_path_factory.mktemp("operators")
    evidence_port = free_port()  # one address for both, as a Service would give
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
                "ORCHESTRATOR_LEASE_DURATION_SECONDS": "8",
                "ORCHESTRATOR_RENEW_DEADLINE_SECONDS": "5",
                "ORCHESTRATOR_RETRY_PERIOD_SECONDS": "1",
            },
            evidence_port=evidence_port,
        )
        for name in ("first", "second")
    }
    try:
        yield {"ns": namespace, "repo": repo, "db": shared_db, "workdir": workdir, **operators}
    finally:
        for name, op in operators.items():
            op.stop()
            print(f"\n{name} log tail:\n{op.tail(3000)}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def holder(kubectl, ns: str) -> str | None:
    spec = get_json(kubectl, "lease", LEASE, "-n", ns).get("spec") or {}
    return spec.get("holderIdentity")


def finished(kubectl, ns: str, name: str, debug: Any) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = get_json(kubectl, "tex", name, "-n", ns).get("status", {})
        return status if status.get("state") in ("COMPLETED", "FAILED", "TIMEOUT") else None

    result: dict[str, Any] = wait_for(done, 300, f"{name} to finish", debug)
    return result


def events_of(kubectl, ns: str, name: str) -> list[str]:
    items = get_json(
        kubectl, "events", "-n", ns, "--field-selector", f"involvedObject.name={name}"
    ).get("items", [])
    return sorted(e["reason"] for e in items if e["reason"].startswith("TASK_"))


def jobs_of(kubectl, ns: str, name: str) -> list[str]:
    items = get_json(
        kubectl, "jobs", "-n", ns, "-l", f"orchestrator.dev/taskexecution={name}"
    ).get("items", [])
    return sorted(j["metadata"]["name"] for j in items)


def db_rows(url: str, task_id: str) -> tuple[list[Task], list[str], list[int]]:
    engine = make_engine(url)
    with Session(engine) as s:
        tasks = list(s.scalars(select(Task).where(Task.task_id == task_id)))
        events = [
            e.event for e in s.scalars(select(ExecutionLog).where(ExecutionLog.task_id == task_id))
        ]
        attempts = [
            h.attempt for h in s.scalars(select(PatchHistory).where(PatchHistory.task_id == task_id))
        ]
    engine.dispose()
    return tasks, events, attempts


def test_only_the_leader_acts_and_the_standby_takes_over(kubectl, ha) -> None:
    first: OperatorProcess = ha["first"]
    second: OperatorProcess = ha["second"]
    ns = ha["ns"]
    first.start()
    wait_for(lambda: holder(kubectl, ns) == "first", 120, "the first replica to lead", first.tail)
    second.start()
    # the standby is up and waiting: the Lease stays with the first replica
    wait_for(lambda: "controller ready" in second.tail(), 120, "the second replica to start")

    patch = {"prompt": "x", "patch": demo_patch("add-multiply")}
    apply(kubectl, ns, task_execution("ha-one", ha["repo"], "patch", task=patch))
    status = finished(kubectl, ns, "ha-one", lambda: first.tail() + second.tail())
    assert status["state"] == "COMPLETED" and status["attempt"] == 1
    assert len(jobs_of(kubectl, ns, "ha-one")) == 2  # one adapter Job, one gate Job
    assert events_of(kubectl, ns, "ha-one") == ["TASK_COMPLETED", "TASK_STARTED"]
    tasks, events, attempts = db_rows(ha["db"], "ha-one")
    assert [t.status for t in tasks] == ["COMPLETED"]
    assert events == ["TASK_STARTED", "TASK_COMPLETED"] and attempts == [1]
    assert holder(kubectl, ns) == "first"
    assert ledger_attempts(ha["workdir"], "ha-one") == [1]

    # the leader dies mid-attempt (SIGKILL: no step-down); the standby takes over the Lease
    # and finishes the task exactly once
    apply(kubectl, ns, task_execution("ha-two", ha["repo"], "sleepy"))
    wait_for(
        lambda: get_json(kubectl, "tex", "ha-two", "-n", ns).get("status", {}).get("state")
        == "IN_PROGRESS",
        120,
        "ha-two to start",
    )
    first.kill()
    wait_for(lambda: holder(kubectl, ns) == "second", 120, "the standby to lead", second.tail)
    status = finished(kubectl, ns, "ha-two", second.tail)
    assert status["state"] == "COMPLETED", status
    assert status["attempt"] == 1  # the running attempt was picked up, not redone
    assert len(jobs_of(kubectl, ns, "ha-two")) == 2
    assert events_of(kubectl, ns, "ha-two") == ["TASK_COMPLETED", "TASK_STARTED"]
    tasks, events, attempts = db_rows(ha["db"], "ha-two")
    assert [t.status for t in tasks] == ["COMPLETED"] and attempts == [1]
    assert events == ["TASK_STARTED", "TASK_COMPLETED"]
    assert ledger_attempts(ha["workdir"], "ha-two") == [1]


def ledger_attempts(workdir: Any, task_id: str) -> list[int]:
    lines = (workdir / ".state/patch_ledger.jsonl").read_text().splitlines()
    entries = [LedgerEntry.model_validate_json(x) for x in lines]
    return [e.attempt for e in entries if e.task_id == task_id]

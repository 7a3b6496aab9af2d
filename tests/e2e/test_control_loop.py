"""The control loop on a real cluster, one test per promise of issue 11.

The operator runs out of cluster (``kopf run``) and talks to the API server through the
fault-injecting proxy (tests/e2e/fault_proxy.py), so transient API errors are real HTTP
answers. Every assertion is on what the API server, the database and the ledger hold.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine
from core.db.tables import Adapter, Task
from core.kube.jobs import job_name
from tests.e2e.fault_proxy import FaultProxy, Rule
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
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}
SLEEPY = (
    "import pathlib, time\nfor i in range(15):\n    print('step', i, flush=True)\n"
    "    time.sleep(1)\npathlib.Path('docs/done.md').write_text('done\\n')\n"
)


@pytest.fixture(scope="module")
def env(
    kube_cluster, kubectl, project_image, image_pull_policy, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/taskexecutions.orchestrator.dev")
    ns = f"e2e-loop-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", ns)
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
        60,
        "the default ServiceAccount",
    )
    repo = git_server(kubectl, ns, project_image, image_pull_policy)
    git_ip = get_json(kubectl, "pod", "git-server", "-n", ns)["status"]["podIP"]
    egress = [{"cidr": f"{git_ip}/32", "ports": [9418]}]
    one = {"maxAttempts": 1}
    for obj in (
        adapter("patch", "patch", retry=one, egress=egress),
        adapter("sleepy", "process", command=["{python}", "-c", SLEEPY], retry=one, egress=egress),
        adapter(
            "no-image",
            "patch",
            image="localhost/orchestrator/does-not-exist:1",
            retry={"maxAttempts": 2, "infrastructureBackoffSeconds": 1, "jitterSeconds": 0},
            egress=egress,
        ),
    ):
        apply(kubectl, ns, obj)
    proxy = FaultProxy(kube_cluster.kubeconfig).start()
    workdir = tmp_path_factory.mktemp("loop")
    operator = OperatorProcess(
        kubeconfig=proxy.kubeconfig,
        namespace=ns,
        image=project_image,
        pull_policy=image_pull_policy,
        workdir=workdir,
        env={"ORCHESTRATOR_RESYNC_SECONDS": "3", "ORCHESTRATOR_LEADER_ELECTION": "false"},
    )
    operator.start()
    try:
        yield {
            "ns": ns,
            "repo": repo,
            "git_ip": git_ip,
            "proxy": proxy,
            "operator": operator,
            "workdir": workdir,
        }
    finally:
        operator.stop()
        proxy.stop()
        print(f"\noperator log tail:\n{operator.tail(4000)}")
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


def tex(kubectl, env, name: str) -> dict[str, Any]:
    return get_json(kubectl, "tex", name, "-n", env["ns"])


def finished(kubectl, env, name: str, timeout: float = 240) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = tex(kubectl, env, name).get("status", {})
        return status if status.get("state") in TERMINAL else None

    result: dict[str, Any] = wait_for(done, timeout, f"{name} to finish", env["operator"].tail)
    return result


def rows(env, task_id: str) -> list[Task]:
    engine = make_engine(default_url(env["workdir"]))
    with Session(engine) as s:
        found = list(s.scalars(select(Task).where(Task.task_id == task_id)))
    engine.dispose()
    return found


def patch_task(name: str, env) -> dict[str, Any]:
    return task_execution(
        name, env["repo"], "patch", task={"prompt": "x", "patch": demo_patch("add-multiply")}
    )


def test_transient_api_errors_are_retried_not_taken_as_lost(kubectl, env) -> None:
    """A 503 on reading the finished pod's log and on the first status write: the task still
    completes in one attempt (no 'pod lost' retry of the adapter)."""
    proxy: FaultProxy = env["proxy"]
    log_fault = proxy.add(
        Rule(verb="get", resource="pods/log", namespace=env["ns"], times=2, status=503)
    )
    status_fault = proxy.add(
        Rule(verb="patch", resource="taskexecutions/status", name="blip", times=1, status=500)
    )
    apply(kubectl, env["ns"], patch_task("blip", env))
    status = finished(kubectl, env, "blip")
    assert status["state"] == "COMPLETED" and status["attempt"] == 1, status
    assert log_fault.fired == 2 and status_fault.fired == 1
    assert [r.attempts for r in rows(env, "blip")] == [1]


def test_a_pod_that_cannot_start_is_an_infrastructure_failure_not_the_adapters(
    kubectl, env
) -> None:
    apply(
        kubectl,
        env["ns"],
        task_execution(
            "no-image",
            env["repo"],
            "no-image",
            task={"prompt": "x", "patch": demo_patch("add-multiply")},
        ),
    )
    started = time.monotonic()
    status = finished(kubectl, env, "no-image", timeout=180)
    assert status["state"] == "FAILED" and status["failureClass"] == "infrastructure", status
    assert "ErrImageNeverPull" in status["message"] or "ImagePull" in status["message"]
    assert [a["failureClass"] for a in status["attempts"]] == ["infrastructure", "infrastructure"]
    assert time.monotonic() - started < 150  # not the adapter's 30-minute budget
    engine = make_engine(default_url(env["workdir"]))
    with Session(engine) as s:
        breaker = s.scalars(
            select(Adapter).where(Adapter.scope == env["ns"], Adapter.id == "no-image")
        ).one()
    engine.dispose()
    assert breaker.breaker_state == "CLOSED" and breaker.breaker_failures == 0


def test_a_foreign_object_with_our_name_is_never_used(kubectl, env) -> None:
    operator: OperatorProcess = env["operator"]
    operator.stop()
    apply(kubectl, env["ns"], patch_task("squatted", env))
    uid = tex(kubectl, env, "squatted")["metadata"]["uid"]
    name = job_name("squatted", uid, 1, "adapter")
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "x.invalid/none", "command": ["true"]}],
                }
            },
        },
    }
    apply(kubectl, env["ns"], foreign)
    operator.start()
    wait_for(
        lambda: tex(kubectl, env, "squatted").get("status", {}).get("reason") == "ForeignObject",
        120,
        "the ForeignObject condition",
        operator.tail,
    )
    status = tex(kubectl, env, "squatted")["status"]
    assert name in status["message"] and status["state"] == "PENDING"
    job = get_json(kubectl, "job", name, "-n", env["ns"])
    assert not job["metadata"].get("ownerReferences")  # left as it was
    assert job["spec"]["suspend"] is True
    kubectl("delete", "job", name, "-n", env["ns"], "--wait=true")
    status = finished(kubectl, env, "squatted")
    assert status["state"] == "COMPLETED", status


def test_a_task_execution_deleted_while_no_operator_runs_is_recorded_cancelled(
    kubectl, env
) -> None:
    operator: OperatorProcess = env["operator"]
    apply(kubectl, env["ns"], task_execution("orphaned", env["repo"], "sleepy"))
    wait_for(
        lambda: tex(kubectl, env, "orphaned").get("status", {}).get("state") == "IN_PROGRESS",
        120,
        "orphaned to start",
    )
    operator.kill()
    kubectl("delete", "tex", "orphaned", "-n", env["ns"], "--wait=true")
    assert [r.status for r in rows(env, "orphaned")] == ["IN_PROGRESS"]
    operator.start()
    wait_for(
        lambda: [r.status for r in rows(env, "orphaned")] == ["CANCELLED"],
        120,
        "the sweep to record it CANCELLED",
        operator.tail,
    )
    assert rows(env, "orphaned")[0].failure_class == "cancelled"


def test_a_failure_says_why_in_the_runners_own_words(kubectl, env) -> None:
    missing = f"git://{env['repo'].split('//')[1].split('/')[0]}/missing.git"
    apply(
        kubectl,
        env["ns"],
        task_execution(
            "no-repo", missing, "patch", task={"prompt": "x", "patch": demo_patch("add-multiply")}
        ),
    )
    status = finished(kubectl, env, "no-repo")
    assert status["state"] == "FAILED" and status["failureClass"] == "infrastructure", status
    assert "the runner failed" in status["message"]
    assert "BackoffLimitExceeded" not in status["message"]


def test_every_object_gets_an_answer_naming_the_field(kubectl, env) -> None:
    apply(
        kubectl,
        env["ns"],
        task_execution(
            "waits", env["repo"], "later", task={"prompt": "x", "patch": demo_patch("add-multiply")}
        ),
    )
    wait_for(
        lambda: tex(kubectl, env, "waits").get("status", {}).get("reason") == "AdapterNotFound",
        30,
        "the AdapterNotFound answer",
        env["operator"].tail,
    )
    status = tex(kubectl, env, "waits")["status"]
    assert "spec.adapterRef.name" in status["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "Unknown"
    git = [{"cidr": f"{env['git_ip']}/32", "ports": [9418]}]
    apply(kubectl, env["ns"], adapter("later", "patch", retry={"maxAttempts": 1}, egress=git))
    assert finished(kubectl, env, "waits")["state"] == "COMPLETED"

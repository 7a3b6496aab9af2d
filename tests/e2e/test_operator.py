"""The operator end to end on a real cluster: `kopf run operator/handlers.py` out of cluster,
adapter and gate Jobs running the project image, a git server pod, real DB and ledger."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine
from core.db.tables import ExecutionLog, PatchHistory, Task
from core.engine.evidence import local_store
from core.engine.patch_ledger import verify
from core.engine.task_log import find_task_log
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

SLOW = "import time\nfor i in range(300):\n    print('working', i, flush=True)\n    time.sleep(1)\n"
SLEEP_THEN_WRITE = (
    "import pathlib, time\nfor i in range({n}):\n    print('step', i, flush=True)\n    time.sleep(1)\n"
    "pathlib.Path('docs/done.md').write_text('done\\n')\n"
)


@pytest.fixture(scope="module")
def env(
    kube_cluster, kubectl, kube_api, project_image, image_pull_policy, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/taskexecutions.orchestrator.dev",
        "crd/adapters.orchestrator.dev",
    )
    namespace = f"e2e-op-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    wait_for(
        lambda: (
            kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode
            == 0
        ),
        60,
        "the default ServiceAccount",
    )
    repo = git_server(kubectl, namespace, project_image, image_pull_policy)
    # NetworkPolicy sees the connection after the Service's DNAT (kube-network-policies,
    # Calico, Cilium): an ipBlock must name the git server pod, not its Service address.
    git_ip = get_json(kubectl, "pod", "git-server", "-n", namespace)["status"]["podIP"]
    for obj in (
        adapter(
            "patch",
            "patch",
            retry={"maxAttempts": 1},
            egress=[{"cidr": f"{git_ip}/32", "ports": [9418]}],
        ),
        adapter("slow", "process", command=["{python}", "-c", SLOW], retry={"maxAttempts": 1}),
        adapter(
            "sleepy",
            "process",
            command=["{python}", "-c", SLEEP_THEN_WRITE.format(n=12)],
            retry={"maxAttempts": 2, "backoffInitialSeconds": 1, "jitterSeconds": 0},
        ),
    ):
        apply(kubectl, namespace, obj)
    workdir = tmp_path_factory.mktemp("operator")
    operator = OperatorProcess(
        kubeconfig=kube_cluster.kubeconfig,
        namespace=namespace,
        image=project_image,
        pull_policy=image_pull_policy,
        workdir=workdir,
    )
    operator.start()
    try:
        yield {"ns": namespace, "repo": repo, "operator": operator, "workdir": workdir}
    finally:
        operator.stop()
        print(f"\noperator log tail:\n{operator.tail()}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def tex(kubectl, env, name: str) -> dict[str, Any]:
    return get_json(kubectl, "taskexecution", name, "-n", env["ns"])


def wait_state(kubectl, env, name: str, states: set[str], timeout: float = 300) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        obj = tex(kubectl, env, name)
        return obj if obj.get("status", {}).get("state") in states else None

    def debug() -> str:
        return (
            json.dumps(tex(kubectl, env, name).get("status"), indent=1)
            + "\n"
            + env["operator"].tail()
        )

    result: dict[str, Any] = wait_for(done, timeout, f"{name} to reach {states}", debug)
    return result


def jobs_of(kubectl, env, name: str) -> list[str]:
    items = get_json(
        kubectl, "jobs", "-n", env["ns"], "-l", f"orchestrator.dev/taskexecution={name}"
    ).get("items", [])
    return sorted(j["metadata"]["name"] for j in items)


def db_rows(env) -> tuple[list[Task], list[ExecutionLog], list[PatchHistory]]:
    engine = make_engine(default_url(env["workdir"]))
    with Session(engine) as s:
        out = (
            list(s.scalars(select(Task))),
            list(s.scalars(select(ExecutionLog).order_by(ExecutionLog.id))),
            list(s.scalars(select(PatchHistory).order_by(PatchHistory.seq))),
        )
    engine.dispose()
    return out


def test_patch_task_completes_with_diff_and_gate_in_status_and_db(kubectl, env) -> None:
    obj = task_execution(
        "add-multiply",
        env["repo"],
        "patch",
        task={"prompt": "Add mul.", "patch": demo_patch("add-multiply")},
    )
    apply(kubectl, env["ns"], obj)
    done = wait_state(kubectl, env, "add-multiply", {"COMPLETED", "FAILED", "TIMEOUT"})
    status = done["status"]
    assert status["state"] == "COMPLETED", status
    assert status["diff"]["filesChanged"] == 2 and status["diff"]["insertions"] == 8
    assert len(status["diff"]["sha256"]) == 64
    assert status["gate"]["passed"] and status["gate"]["applied"]
    assert [c["name"] for c in status["gate"]["checks"]] == ["compile", "unit-tests"]
    assert status["observedGeneration"] == done["metadata"]["generation"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Running": "False", "Succeeded": "True"}
    assert len(jobs_of(kubectl, env, "add-multiply")) == 2  # one adapter Job, one gate Job

    tasks, events, history = db_rows(env)
    row = next(t for t in tasks if t.task_id == "add-multiply")
    assert row.status == "COMPLETED" and row.attempts == 1
    names = [(e.task_id, e.event) for e in events if e.task_id == "add-multiply"]
    assert names == [("add-multiply", "TASK_STARTED"), ("add-multiply", "TASK_COMPLETED")]
    entry = next(h for h in history if h.task_id == "add-multiply")
    assert entry.diff_sha256 == status["diff"]["sha256"]
    report = verify(
        env["workdir"] / ".state/patch_ledger.jsonl",
        local_store(env["workdir"]),
        [(h.seq, h.entry_hash) for h in history],
    )
    assert report.ok, report.problems

    policy = get_json(kubectl, "networkpolicy", "orchestrator-adapter-patch", "-n", env["ns"])
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {"orchestrator.dev/adapter": "patch", "orchestrator.dev/role": "adapter"}
    }
    assert policy["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 9418}]
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "Adapter"

    table = kubectl("get", "tex", "-n", env["ns"]).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "STATE", "ADAPTER", "ATTEMPT", "REASON", "AGE"]
    assert "add-multiply" in table and "COMPLETED" in table and "Completed" in table
    described = kubectl("describe", "tex", "add-multiply", "-n", env["ns"]).stdout
    assert "TASK_STARTED" in described and "TASK_COMPLETED" in described
    assert "Succeeded" in described


def test_failing_gate_names_the_failing_check(kubectl, env) -> None:
    obj = task_execution(
        "break-subtract",
        env["repo"],
        "patch",
        task={"prompt": "x", "patch": demo_patch("break-subtract")},
    )
    apply(kubectl, env["ns"], obj)
    status = wait_state(kubectl, env, "break-subtract", {"COMPLETED", "FAILED", "TIMEOUT"})[
        "status"
    ]
    assert status["state"] == "FAILED" and status["failureClass"] == "gate_failed"
    assert status["reason"] == "GateFailed"
    failed = [c["name"] for c in status["gate"]["checks"] if c["status"] != "passed"]
    assert failed == ["unit-tests"]
    assert "unit-tests" in status["message"]


def test_adapter_over_budget_times_out_with_partial_logs(kubectl, env) -> None:
    obj = task_execution("too-slow", env["repo"], "slow", timeoutSeconds=8)
    apply(kubectl, env["ns"], obj)
    status = wait_state(kubectl, env, "too-slow", {"COMPLETED", "FAILED", "TIMEOUT"})["status"]
    assert status["state"] == "TIMEOUT" and status["failureClass"] == "adapter_timeout"
    log = find_task_log(Path(env["workdir"]), f"{env['ns']}/too-slow")
    assert log is not None and log.name.startswith(f"{env['ns']}.too-slow.")
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    worked = [r["line"] for r in lines if r.get("line", "").startswith("working")]
    assert 3 <= len(worked) < 30, worked


def test_invalid_task_execution_is_refused_by_the_api_server(kubectl, env) -> None:
    bad = task_execution("bad-commit", env["repo"], "patch")
    bad["spec"]["source"]["baseCommit"] = "main"
    out = apply(kubectl, env["ns"], bad, check=False)
    assert out.returncode != 0
    assert "spec.source.baseCommit" in out.stderr and "should match" in out.stderr
    twice = task_execution(
        "bad-fallback", env["repo"], "patch", fallbackAdapterRefs=[{"name": "patch"}]
    )
    out = apply(kubectl, env["ns"], twice, check=False)
    assert out.returncode != 0 and "fallbackAdapterRefs must not repeat adapterRef" in out.stderr
    assert tex(kubectl, env, "bad-commit") == {}
    # issue 11: accepted before, then the TaskExecution sat without an answer for minutes
    seq = adapter("seq", "process", command=["seq", "{i:07d}"])
    out = apply(kubectl, env["ns"], seq, check=False)
    assert out.returncode != 0
    assert "spec.command[1]" in out.stderr and "use only the placeholders" in out.stderr
    # issue 13: a target path that the tool would read as an option
    option = task_execution(
        "option-path", env["repo"], "patch", task={"prompt": "x", "targetPaths": ["--yes"]}
    )
    out = apply(kubectl, env["ns"], option, check=False)
    assert out.returncode != 0 and "spec.task.targetPaths[0]" in out.stderr
    assert tex(kubectl, env, "option-path") == {}


def test_operator_killed_mid_attempt_converges_exactly_once(kubectl, env) -> None:
    operator: OperatorProcess = env["operator"]
    apply(kubectl, env["ns"], task_execution("survivor", env["repo"], "sleepy"))
    wait_state(kubectl, env, "survivor", {"IN_PROGRESS"}, timeout=120)
    operator.kill()
    time.sleep(3)
    operator.start()
    status = wait_state(kubectl, env, "survivor", {"COMPLETED", "FAILED", "TIMEOUT"})["status"]
    assert status["state"] == "COMPLETED", status
    assert status["attempt"] == 1
    assert jobs_of(kubectl, env, "survivor") == sorted(
        [status["attempts"][0]["jobName"], status["attempts"][0]["gateJobName"]]
    )
    tasks, events, history = db_rows(env)
    assert [t.status for t in tasks if t.task_id == "survivor"] == ["COMPLETED"]
    assert len([h for h in history if h.task_id == "survivor"]) == 1
    assert [e.event for e in events if e.task_id == "survivor"] == [
        "TASK_STARTED",
        "TASK_COMPLETED",
    ]


def test_deleted_pod_is_an_infrastructure_failure_and_is_retried(kubectl, env) -> None:
    apply(kubectl, env["ns"], task_execution("lost-pod", env["repo"], "sleepy"))
    wait_state(kubectl, env, "lost-pod", {"IN_PROGRESS"}, timeout=120)
    job = tex(kubectl, env, "lost-pod")["status"]["jobName"]

    def running_pod() -> str | None:
        pods = get_json(kubectl, "pods", "-n", env["ns"], "-l", f"job-name={job}").get("items", [])
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running[0]["metadata"]["name"] if running else None

    pod = wait_for(running_pod, 120, "the adapter pod to run")
    kubectl("delete", "pod", pod, "-n", env["ns"], "--wait=false")
    status = wait_state(kubectl, env, "lost-pod", {"COMPLETED", "FAILED", "TIMEOUT"})["status"]
    assert status["state"] == "COMPLETED", status
    first, second = status["attempts"]
    assert first["failureClass"] == "infrastructure" and first["state"] == "FAILED"
    assert second["state"] == "COMPLETED"
    assert len(jobs_of(kubectl, env, "lost-pod")) == 3  # 2 adapter Jobs + 1 gate Job


def test_execute_with_the_kubernetes_backend_writes_local_outputs(
    kubectl, env, kube_cluster, tmp_path
) -> None:
    import subprocess
    import sys

    from tests.workdirs import make_workdir

    workdir = make_workdir(
        tmp_path / "w",
        run_id="kcli",
        tasks=[
            {"task_id": "mul", "prompt": "Add mul.", "patch": demo_patch("add-multiply")},
            {"task_id": "logo", "prompt": "New logo.", "patch": demo_patch("update-logo")},
        ],
        adapters=[{"id": "patch", "kind": "patch", "retry": {"max_attempts": 1}}],
        routes={"mul": "patch", "logo": "patch"},
    )
    for path in ("task_queue.json",):
        data = json.loads((workdir / ".state" / path).read_text())
        for task in data["tasks"]:
            task["repo"], task["base_commit"] = (
                env["repo"],
                "d143d8712a637d59f8cf0c2dc6a5dee0e71fa9cd",
            )
        (workdir / ".state" / path).write_text(json.dumps(data))
    cmd = [
        sys.executable,
        "-m",
        "core.cli",
        "execute",
        "--run",
        "kcli",
        "--workdir",
        str(workdir),
        "--backend",
        "kubernetes",
        "--namespace",
        env["ns"],
        "--follow-timeout",
        "300",
    ]
    run_env = {**__import__("os").environ, "KUBECONFIG": kube_cluster.kubeconfig}
    out = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 TaskExecution(s) created" in out.stdout
    results = json.loads((workdir / ".state/execution_results.json").read_text())
    assert results["backend"] == "kubernetes" and results["finished"] is True
    assert {t["task_id"]: t["state"] for t in results["tasks"]} == {
        "mul": "COMPLETED",
        "logo": "COMPLETED",
    }
    logo = next(t for t in results["tasks"] if t["task_id"] == "logo")
    assert logo["attempts"][0]["diff"]["binary_files"] == 1
    ledger = (workdir / ".state/patch_ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 2
    assert (workdir / "logs/execution/mul.jsonl").read_text().count('"patch_applied"') >= 1
    again = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=400)
    assert again.returncode == 0 and "0 TaskExecution(s) created" in again.stdout
    assert len((workdir / ".state/patch_ledger.jsonl").read_text().splitlines()) == 2


def test_breaker_state_is_mirrored_into_the_adapter_status(kubectl, env) -> None:
    crash = "import sys\nprint('model service down', flush=True)\nsys.exit(7)\n"
    apply(
        kubectl,
        env["ns"],
        adapter(
            "crashy",
            "process",
            command=["{python}", "-c", crash],
            retry={"maxAttempts": 1},
            breaker={"failureThreshold": 1, "cooldownSeconds": 3600},
        ),
    )
    apply(kubectl, env["ns"], task_execution("crash-once", env["repo"], "crashy"))
    status = wait_state(kubectl, env, "crash-once", {"COMPLETED", "FAILED", "TIMEOUT"})["status"]
    assert status["failureClass"] == "adapter_error" and "7" in status["message"]

    def breaker() -> str | None:
        adp = get_json(kubectl, "adapter", "crashy", "-n", env["ns"])
        return adp.get("status", {}).get("breakerState")

    assert wait_for(lambda: breaker() == "OPEN", 60, "the Adapter status to show OPEN")
    table = kubectl("get", "adp", "crashy", "-n", env["ns"]).stdout
    assert "OPEN" in table
    # the next task of that adapter waits with a visible reason instead of running
    apply(kubectl, env["ns"], task_execution("after-crash", env["repo"], "crashy"))
    parked = wait_for(
        lambda: (
            tex(kubectl, env, "after-crash").get("status", {}).get("reason") == "WaitingForBreaker"
        ),
        60,
        "the second task to wait for the breaker",
    )
    assert parked
    assert jobs_of(kubectl, env, "after-crash") == []


def test_deleting_a_running_task_execution_cancels_it(kubectl, env) -> None:
    apply(kubectl, env["ns"], task_execution("doomed", env["repo"], "slow", timeoutSeconds=120))
    wait_state(kubectl, env, "doomed", {"IN_PROGRESS"}, timeout=120)
    assert len(jobs_of(kubectl, env, "doomed")) == 1
    kubectl("delete", "tex", "doomed", "-n", env["ns"], "--wait=true", "--timeout=60s")
    wait_for(lambda: jobs_of(kubectl, env, "doomed") == [], 120, "the Job to be garbage-collected")

    def cancelled() -> bool:
        tasks, _, _ = db_rows(env)
        rows = [t for t in tasks if t.task_id == "doomed"]
        return bool(rows) and rows[0].status == "CANCELLED"

    assert wait_for(cancelled, 60, "the task to be recorded CANCELLED")
    _, events, _ = db_rows(env)
    assert [e.event for e in events if e.task_id == "doomed"] == ["TASK_STARTED", "TASK_FAILED"]

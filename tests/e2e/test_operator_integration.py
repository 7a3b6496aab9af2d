"""Issue 15 on the cluster: an ``Integration`` merges a run's completed TaskExecutions.

The operator runs as a real ``kopf run`` process. Two TaskExecutions of one run change the
end of ``calc/ops.py`` differently (both pass their own gate); the Integration merges them in
queue order onto ``orchestrator/integration/<run>``: the first is merged, the second is a
``conflict``. The merged-tree gate runs as a gate Job owned by the Integration; the branch is
pushed to the in-cluster git server (a git daemon that accepts pushes), which is asserted
from inside the git server's pod.
Then the send-backs: a second run whose conflicting TaskExecution retries on
``merge_conflict`` goes back to PENDING and its next attempt is merged; a third run whose two
changes pass their own gates but fail the merged tree's gate (the Adapters' checks, re-run by
the Integration's gate Jobs): the second retries on ``merge_gate_failed``, goes back to PENDING
with the gate's summary, and its next attempt (from the integration head) is merged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.operator_harness import (
    DIVIDE_PATCH,
    ROOT,
    OperatorProcess,
    adapter,
    apply,
    apply_crds,
    demo_patch,
    get_json,
    git_server,
    integration,
    task_execution,
    wait_for,
)

pytestmark = pytest.mark.cluster

RUN = "merge"
BRANCH = f"orchestrator/integration/{RUN}"
SMALL = {"cpu": "250m", "memory": "256Mi"}


@pytest.fixture(scope="module")
def env(
    kube_cluster, kubectl, kube_api, project_image, image_pull_policy, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/integrations.orchestrator.dev",
        "crd/taskexecutions.orchestrator.dev",
    )
    namespace = f"e2e-itg-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube_api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
    )
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        60,
        "the default ServiceAccount",
    )
    repo = git_server(kubectl, namespace, project_image, image_pull_policy, push=True)
    git_ip = get_json(kubectl, "pod", "git-server", "-n", namespace)["status"]["podIP"]
    apply(
        kubectl,
        namespace,
        adapter(
            "patch",
            "patch",
            retry={"maxAttempts": 1},
            egress=[{"cidr": f"{git_ip}/32", "ports": [9418]}],
            resources=SMALL,
        ),
    )
    workdir = tmp_path_factory.mktemp("operator-itg")
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


def git(kubectl, env, *args: str) -> str:
    out = kubectl("exec", "-n", env["ns"], "git-server", "--", "git", "--git-dir",
                  "/tmp/repos/calc.git", *args)  # fmt: skip
    return str(out.stdout).strip()


def test_two_conflicting_task_executions_the_second_conflicts_the_branch_is_pushed(
    kubectl, env
) -> None:
    ns = env["ns"]
    # queue order: creation order, then task id (these two may be created in one second)
    for name, patch in (("a-multiply", demo_patch("add-multiply")), ("b-divide", DIVIDE_PATCH)):
        obj = task_execution(name, env["repo"], "patch", task={"prompt": name, "patch": patch})
        obj["spec"]["runId"] = RUN
        apply(kubectl, ns, obj)
    apply(kubectl, ns, integration(RUN, RUN, resources=SMALL))

    def settled() -> dict[str, Any] | None:
        obj = get_json(kubectl, "integration", RUN, "-n", ns)
        return obj if (obj.get("status") or {}).get("state") in ("Succeeded", "Failed") else None

    def debug() -> str:
        obj = get_json(kubectl, "integration", RUN, "-n", ns)
        return json.dumps(obj.get("status"), indent=1) + "\n" + env["operator"].tail()

    done = wait_for(settled, 600, "the Integration to settle", debug)
    status = done["status"]
    assert status["state"] == "Succeeded", debug()
    for name in ("a-multiply", "b-divide"):  # each passed its own gate
        assert get_json(kubectl, "tex", name, "-n", ns)["status"]["state"] == "COMPLETED"
    assert [(t["taskId"], t["outcome"]) for t in status["tasks"]] == [
        ("a-multiply", "merged"),
        ("b-divide", "conflict"),
    ]
    merged, conflict = status["tasks"]
    assert "calc/ops.py" in conflict["reason"] and "not sent back" in conflict["reason"]
    assert status["branch"] == BRANCH and status["pushed"] is True
    assert status["repository"] == env["repo"] and status["headCommit"] == merged["commit"]
    assert status["stats"]["gateRuns"] == 1 and status["stats"]["merged"] == 1
    assert status["observedGeneration"] == done["metadata"]["generation"]

    # the integration branch on the git server holds the merged commit, and only it
    assert git(kubectl, env, "rev-parse", f"refs/heads/{BRANCH}") == merged["commit"]
    ops = git(kubectl, env, "show", f"{BRANCH}:calc/ops.py")
    assert "def mul(a, b):" in ops and "def div(a, b):" not in ops
    log = git(kubectl, env, "log", "--format=%s", f"{BRANCH}", "-n", "2").splitlines()
    assert "a-multiply" in log[0]

    # the merged-tree gate ran as a Job of the Integration, named for its gate run
    jobs = get_json(kubectl, "jobs", "-n", ns, "-l", f"orchestrator.dev/integration={RUN}").get(
        "items", []
    )
    assert len(jobs) == 1
    [job] = jobs
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Integration"
    assert job["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
    assert job["metadata"]["labels"]["orchestrator.dev/gate-run"] == "1"
    assert any(
        c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"]
    )
    table = kubectl("get", "itg", "-n", ns).stdout
    assert table.splitlines()[0].split()[:5] == ["NAME", "RUN", "STATE", "MERGED", "CONFLICT"]
    described = kubectl("describe", "itg", RUN, "-n", ns).stdout
    assert "INTEGRATION_FINISHED" in described


def test_integrate_from_a_client_follows_the_resource_and_writes_the_results(
    kubectl, env, kube_cluster, tmp_path
) -> None:
    """`orchestrator integrate --backend kubernetes`: the Integration of the run exists (the
    test above applied it): kept, followed, and its status written as the local results."""
    cmd = [
        sys.executable, "-m", "core.cli", "integrate", "--run", RUN, "--backend", "kubernetes",
        "--namespace", env["ns"], "--workdir", str(tmp_path), "--follow-timeout", "600",
    ]  # fmt: skip
    run_env = {**os.environ, "KUBECONFIG": kube_cluster.kubeconfig}
    out = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=700)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Integration {env['ns']}/{RUN} exists (kept)" in out.stdout
    assert "1 merged, 1 conflict, 0 gate_failed, 0 skipped" in out.stdout
    results = json.loads((tmp_path / ".state/integration_results.json").read_text())
    assert results["pushed"] is True and results["repository"] == env["repo"]
    assert [(t["task_id"], t["outcome"]) for t in results["tasks"]] == [
        ("a-multiply", "merged"),
        ("b-divide", "conflict"),
    ]


#: An adapter that does what the prompt's ``fake-ai:`` lines say (in the project image).
FAKE_AI = ["{python}", "-m", "core.testing.fake_ai", "--prompt-file", "{prompt_file}"]


def _merge_both(
    kubectl: Any,
    ns: str,
    env: dict[str, Any],
    run: str,
    prompts: dict[str, tuple[str, str]],
    *,
    sent_back: str,
    timeout: float,
) -> tuple[dict[str, Any], Callable[[], str]]:
    """Apply the run's two TaskExecutions (name: (adapter, prompt)) and its Integration, wait
    until both are merged (or the run failed); the Integration's status and a failure report
    showing it, ``sent_back``'s status and the operator's log."""
    for name, (adapter_name, prompt) in prompts.items():
        obj = task_execution(name, env["repo"], adapter_name, task={"prompt": prompt})
        obj["spec"]["runId"] = run
        apply(kubectl, ns, obj)
    apply(kubectl, ns, integration(run, run, resources=SMALL))

    def merged_both() -> dict[str, Any] | None:
        obj = get_json(kubectl, "integration", run, "-n", ns)
        status = obj.get("status") or {}
        if status.get("state") == "Failed":
            return obj
        done = status.get("state") == "Succeeded" and status.get("stats", {}).get("merged") == 2
        return obj if done else None

    def debug() -> str:
        obj = get_json(kubectl, "integration", run, "-n", ns)
        te = get_json(kubectl, "tex", sent_back, "-n", ns)
        return json.dumps([obj.get("status"), te.get("status")], indent=1) + env["operator"].tail()

    done = wait_for(merged_both, timeout, "the sent-back task to be merged", debug)
    status: dict[str, Any] = done["status"]
    assert status["state"] == "Succeeded", debug()
    return status, debug


@pytest.mark.timeout(1200)  # its own wait (900 s) fails first, showing the status
def test_a_conflicting_task_execution_is_sent_back_and_merged_on_its_next_attempt(
    kubectl, env
) -> None:
    """Issue 15's feedback on the cluster: the second TaskExecution's Adapter retries on
    ``merge_conflict``; it conflicts, goes back to PENDING, runs attempt 2 as a new Job with
    the conflict summary in its prompt (from the pushed integration head), and is merged."""
    ns, run = env["ns"], "sendback"
    branch = f"orchestrator/integration/{run}"
    git_ip = get_json(kubectl, "pod", "git-server", "-n", ns)["status"]["podIP"]
    egress = [{"cidr": f"{git_ip}/32", "ports": [9418]}]
    retry = {"maxAttempts": 3, "retryOn": ["infrastructure", "merge_conflict"],
             "backoffInitialSeconds": 1, "jitterSeconds": 0}  # fmt: skip
    apply(kubectl, ns, adapter("once", "process", command=FAKE_AI, egress=egress, resources=SMALL,
                               retry={"maxAttempts": 1}))  # fmt: skip
    apply(kubectl, ns, adapter("again", "process", command=FAKE_AI, egress=egress,
                               resources=SMALL, retry=retry))  # fmt: skip
    prompts = {
        "a-notes": ("once", "fake-ai: write notes.txt :: from A"),
        "b-notes": (
            "again",
            "fake-ai: echo-feedback\nfake-ai: write notes.txt :: from B\n"
            "fake-ai: on-feedback write notes.txt :: from A\\nfrom B",
        ),
    }
    status, debug = _merge_both(kubectl, ns, env, run, prompts, sent_back="b-notes", timeout=900)
    by_task = {t["taskId"]: (t["outcome"], t["attempt"]) for t in status["tasks"]}
    assert by_task == {"a-notes": ("merged", 1), "b-notes": ("merged", 2)}, debug()
    assert git(kubectl, env, "show", f"{branch}:notes.txt") == "from A\nfrom B"

    # the TaskExecution: attempt 1 sent back (merge_conflict), attempt 2 completed
    te = get_json(kubectl, "tex", "b-notes", "-n", ns)["status"]
    assert te["state"] == "COMPLETED" and te["attempt"] == 2
    first, second = te["attempts"]
    assert first["failureClass"] == "merge_conflict" and second.get("failureClass") is None
    jobs = get_json(
        kubectl, "jobs", "-n", ns, "-l",
        "orchestrator.dev/taskexecution=b-notes,orchestrator.dev/role=adapter",
    ).get("items", [])  # fmt: skip
    attempts = sorted(int(j["metadata"]["labels"]["orchestrator.dev/attempt"]) for j in jobs)
    assert attempts in ([1, 2], [2]), attempts  # attempt 1's Job may be gone (its short TTL)
    events = get_json(
        kubectl, "events", "-n", ns, "--field-selector", "involvedObject.name=b-notes"
    ).get("items", [])
    assert [e["reason"] for e in events].count("TASK_REOPENED") == 1
    assert [e["reason"] for e in events].count("TASK_STARTED") == 2

    # the feedback reached attempt 2's prompt: its adapter printed it back (the saved log)
    [log] = (env["workdir"] / "logs/execution").glob(f"{ns}.b-notes.*.jsonl")
    said = [
        r.get("line")
        for r in map(json.loads, log.read_text().splitlines())
        if r.get("attempt") == 2 and r.get("stream") == "stdout"
    ]
    assert "feedback: Conflicting files:" in said and "feedback: - notes.txt" in said


#: The gate of both Adapters below: each change alone passes it (a.txt, or b.txt, alone), the
#: two together fail it unless b.txt says it comes after A. argv only (no shell), no task field.
TOGETHER_CHECK = (
    "import os, sys\n"
    "both = os.path.exists('a.txt') and os.path.exists('b.txt')\n"
    "if both and 'after A' not in open('b.txt').read():\n"
    "    print('a.txt and b.txt disagree: b.txt must say it comes after A')\n"
    "    sys.exit(1)\n"
    "print('a.txt and b.txt agree')\n"
)
TOGETHER = [{"name": "together", "command": ["{python}", "-c", TOGETHER_CHECK], "report": "none"}]


@pytest.mark.timeout(1500)  # above wait_for's: a slow cluster fails with the status shown
def test_a_change_that_fails_the_merged_tree_gate_is_sent_back_and_merged_on_its_next_attempt(
    kubectl, env
) -> None:
    """Issue 15's other send-back on the cluster: two changes pass their own gates but fail
    the gate on the merged tree (a gate Job of the Integration); the second's Adapter retries on
    ``merge_gate_failed``: it is ``gate_failed``, goes back to PENDING, runs attempt 2 from the
    pushed integration head with the gate summary in its prompt, and is merged."""
    apply_crds(kubectl)  # this checkout's (the cluster is shared: another may have applied its own)
    ns, run = env["ns"], "gatefail"
    branch = f"orchestrator/integration/{run}"
    git_ip = get_json(kubectl, "pod", "git-server", "-n", ns)["status"]["podIP"]
    egress = [{"cidr": f"{git_ip}/32", "ports": [9418]}]
    retry = {"maxAttempts": 3, "retryOn": ["infrastructure", "merge_gate_failed"],
             "backoffInitialSeconds": 1, "jitterSeconds": 0}  # fmt: skip
    common = {"command": FAKE_AI, "egress": egress, "resources": SMALL, "gate": TOGETHER}
    apply(kubectl, ns, adapter("gate-once", "process", retry={"maxAttempts": 1}, **common))
    apply(kubectl, ns, adapter("gate-again", "process", retry=retry, **common))
    prompts = {
        "gate-a": ("gate-once", "fake-ai: write a.txt :: A"),
        "gate-b": (
            "gate-again",
            "fake-ai: echo-feedback\nfake-ai: write b.txt :: B\n"
            "fake-ai: on-feedback write b.txt :: B, after A",
        ),
    }
    status, debug = _merge_both(kubectl, ns, env, run, prompts, sent_back="gate-b", timeout=1200)
    by_task = {t["taskId"]: (t["outcome"], t["attempt"]) for t in status["tasks"]}
    assert by_task == {"gate-a": ("merged", 1), "gate-b": ("merged", 2)}, debug()
    # gate runs: A+B (fails), A alone (passes: A merged, B gate_failed), then B's attempt 2 on A
    stats = status["stats"]
    assert (stats["gateRuns"], stats["merged"], stats["gateFailed"]) == (3, 2, 0), stats
    assert stats["oneByOneGateRuns"] == 3  # verdicts that needed a gate: 2 merged + 1 failed
    assert status["pushed"] is True and status["branch"] == branch
    assert status["headCommit"] == status["tasks"][1]["commit"]

    # the pushed branch: A's commit, then B's attempt 2 (which knows about A)
    assert git(kubectl, env, "rev-parse", f"refs/heads/{branch}") == status["headCommit"]
    assert git(kubectl, env, "show", f"{branch}:a.txt") == "A"
    assert git(kubectl, env, "show", f"{branch}:b.txt") == "B, after A"
    log = git(kubectl, env, "log", "--format=%s%n%b", branch, "-n", "2")
    assert log.index("gate-b: ") < log.index("gate-a: ")
    assert "Task: gate-b" in log and "Attempt: 2" in log

    # the Integration said so twice: gate_failed and sent back, then both merged
    events = get_json(
        kubectl, "events", "-n", ns, "--field-selector",
        f"involvedObject.kind=Integration,involvedObject.name={run}",
    ).get("items", [])  # fmt: skip
    finished = [e["message"] for e in events if e["reason"] == "INTEGRATION_FINISHED"]
    assert len(finished) == 2, finished
    first_pass = next(m for m in finished if "sent back" in m)
    assert "1 merged, 0 conflict, 1 gate_failed" in first_pass
    assert first_pass.endswith("sent back: gate-b")
    assert any(m.startswith("2 merged, 0 conflict, 0 gate_failed") for m in finished), finished

    # the TaskExecution: attempt 1 sent back (merge_gate_failed), attempt 2 completed
    te = get_json(kubectl, "tex", "gate-b", "-n", ns)["status"]
    assert te["state"] == "COMPLETED" and te["attempt"] == 2
    first, second = te["attempts"]
    assert first["failureClass"] == "merge_gate_failed", first
    assert "fails the gate on the merged tree" in first["message"], first
    assert second.get("failureClass") is None and second["state"] == "COMPLETED", second
    assert get_json(kubectl, "tex", "gate-a", "-n", ns)["status"]["attempt"] == 1
    te_events = get_json(
        kubectl, "events", "-n", ns, "--field-selector", "involvedObject.name=gate-b"
    ).get("items", [])
    assert [e["reason"] for e in te_events].count("TASK_REOPENED") == 1
    assert [e["reason"] for e in te_events].count("TASK_STARTED") == 2

    # the three gate runs were gate Jobs of the Integration (they have no TTL: deleted with it)
    gate_jobs = get_json(
        kubectl, "jobs", "-n", ns, "-l", f"orchestrator.dev/integration={run}"
    ).get("items", [])
    runs = sorted(j["metadata"]["labels"]["orchestrator.dev/gate-run"] for j in gate_jobs)
    assert runs == ["1", "2", "3"], runs
    integration_uid = get_json(kubectl, "integration", run, "-n", ns)["metadata"]["uid"]
    for job in gate_jobs:
        [owner] = job["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("Integration", integration_uid)

    # the merged-tree gate failed in gate run 1, A and B together (its saved log) ...
    gate_log = env["workdir"] / "logs/integration" / f"{ns}.{run}.jsonl"
    records = [json.loads(line) for line in gate_log.read_text().splitlines()]
    saved = sorted({r["gate_run"] for r in records if r.get("event") == "gate_log_saved"})
    assert saved == [1, 2, 3], saved
    failed_run = [str(r.get("line")) for r in records if r.get("gate_run") == 1]
    assert any("b.txt must say it comes after A" in line for line in failed_run)
    # ... and its summary reached attempt 2's prompt: the adapter printed it back
    [te_log] = (env["workdir"] / "logs/execution").glob(f"{ns}.gate-b.*.jsonl")
    records = [json.loads(line) for line in te_log.read_text().splitlines()]
    said = {
        a: [
            str(r.get("line"))
            for r in records
            if r.get("attempt") == a and r.get("stream") == "stdout"
        ]
        for a in (1, 2)
    }
    assert "feedback: - check 'together': failed, exit code 1" in said[2], said
    assert any("b.txt must say it comes after A" in line for line in said[2]), said
    assert any(f"on the integration branch {branch}" in line for line in said[2]), said
    assert not any(line.startswith("feedback:") for line in said[1]), said  # none on attempt 1

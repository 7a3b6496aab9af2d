"""Evidence at any size on a real cluster (issue 12): bulk through the evidence store only.

The operator runs out of cluster (``kopf run``) with its local evidence store served on the
node address; adapter and gate pods fetch their request (and patch) and upload their full
log and diff through per-attempt grants. Shown here:

* a patch task whose inline patch is 130 KB (it used to die with E2BIG: the request was an
  environment variable) and the same patch from a ConfigMap (patchFrom): COMPLETED;
* a process adapter whose diff is 20 MiB, and a patch task applying that diff by its sha256
  from the store: COMPLETED, the patch never in etcd;
* the exported full patches apply on a fresh checkout and hash to the recorded sha256;
* a 20 MiB output flood: the task log keeps head and tail with an explicit truncation
  record, and the pod log holds only the small report;
* no patch ConfigMap is ever made, and finished Jobs are deleted after their TTL once their
  attempt is recorded.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.engine.task_log import find_task_log, read_records
from tests.e2e.operator_harness import (
    BASE_COMMIT,
    DEMO,
    ROOT,
    OperatorProcess,
    adapter,
    apply,
    apply_crds,
    get_json,
    git_server,
    task_execution,
    wait_for,
)

pytestmark = pytest.mark.cluster

JOB_TTL = 20
BULK_LINES = 330_000  # 65 bytes a line: a 21 MB file, a diff just over 20 MiB
BULK = (
    "import hashlib, pathlib\n"
    "pathlib.Path('data').mkdir(exist_ok=True)\n"
    "h = b'seed'\n"
    "with open('data/bulk.txt', 'w') as f:\n"
    f"    for i in range({BULK_LINES}):\n"
    "        h = hashlib.sha256(h).digest()\n"
    "        f.write(h.hex() + '\\n')\n"
)
FLOOD_LINES = 210_000  # ~107 bytes a line: 22 MB of output
FLOOD = (
    "import sys\n"
    "pad = 'x' * 99\n"
    f"for i in range({FLOOD_LINES}):\n"
    "    sys.stdout.write('%07d %s\\n' % (i, pad))\n"
    "sys.stdout.flush()\n"
    "open('docs/flood.md', 'w').write('flooded\\n')\n"
)


def checkout(where: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(DEMO / "repos/calc.bundle"), str(where)], check=True)
    subprocess.run(["git", "-C", str(where), "checkout", "-q", BASE_COMMIT], check=True)
    return where


def big_patch(tmp: Path, size: int) -> str:
    """A real git diff adding a ``size``-byte Markdown file to the demo repository."""
    tree = checkout(tmp / "patch-src")
    lines, total, i = [], 0, 0
    while total < size:
        line = f"line {i:06d} of a patch too large for one environment variable\n"
        lines.append(line)
        total += len(line)
        i += 1
    (tree / "docs").mkdir(exist_ok=True)
    (tree / "docs/big.md").write_text("".join(lines))
    subprocess.run(["git", "-C", str(tree), "add", "-A"], check=True)
    out = subprocess.run(
        ["git", "-C", str(tree), "diff", "--cached", "--binary", "--full-index"],
        check=True,
        capture_output=True,
    )
    return out.stdout.decode()


@pytest.fixture(scope="module")
def env(
    kube_cluster, kubectl, kube_api, project_image, image_pull_policy, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    apply_crds(kubectl)
    namespace = f"e2e-ev-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        60,
        "the default ServiceAccount",
    )
    repo = git_server(kubectl, namespace, project_image, image_pull_policy)
    git_ip = get_json(kubectl, "pod", "git-server", "-n", namespace)["status"]["podIP"]
    git = [{"cidr": f"{git_ip}/32", "ports": [9418]}]
    small = {"cpu": "500m", "memory": "512Mi"}
    once: dict[str, Any] = {"retry": {"maxAttempts": 1}, "resources": small}
    for obj in (
        # egress: its adapter pods are selected by a policy, which then must also list the
        # evidence store (the operator adds it)
        adapter("patch", "patch", egress=git, **once),
        adapter(
            "bulk",
            "process",
            command=["{python}", "-c", BULK],
            retry={"maxAttempts": 1},
            resources=small,
        ),
        adapter(
            "flood",
            "process",
            command=["{python}", "-c", FLOOD],
            retry={"maxAttempts": 1},
            resources=small,
        ),
    ):
        apply(kubectl, namespace, obj)
    workdir = tmp_path_factory.mktemp("operator-evidence")
    operator = OperatorProcess(
        kubeconfig=kube_cluster.kubeconfig,
        namespace=namespace,
        image=project_image,
        pull_policy=image_pull_policy,
        workdir=workdir,
        env={"ORCHESTRATOR_JOB_TTL_SECONDS": str(JOB_TTL)},
    )
    operator.start()
    try:
        yield {
            "ns": namespace,
            "repo": repo,
            "operator": operator,
            "workdir": workdir,
            "tmp": tmp_path_factory.mktemp("evidence-data"),
        }
    finally:
        operator.stop()
        print(f"\noperator log tail:\n{operator.tail()}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def run_task(kubectl, env, name: str, adapter_name: str, task: dict[str, Any]) -> dict[str, Any]:
    apply_crds(kubectl)  # the 1 MiB limit and patchFrom are this checkout's (a shared cluster)
    apply(kubectl, env["ns"], task_execution(name, env["repo"], adapter_name, task=task))

    def done() -> dict[str, Any] | None:
        obj = get_json(kubectl, "taskexecution", name, "-n", env["ns"])
        status = obj.get("status", {})
        return status if status.get("state") in ("COMPLETED", "FAILED", "TIMEOUT") else None

    def debug() -> str:
        obj = get_json(kubectl, "taskexecution", name, "-n", env["ns"])
        pods = kubectl("get", "pods,jobs", "-n", env["ns"], check=False).stdout
        return f"{pods}\n{json.dumps(obj.get('status'), indent=1)}\n{env['operator'].tail()}"

    status: dict[str, Any] = wait_for(done, 600, f"{name} to finish", debug)
    assert status["state"] == "COMPLETED", debug()
    return status


def export_applies(env, task: str, status: dict[str, Any]) -> None:
    """`orchestrator export` writes the recorded bytes; they apply on a fresh checkout and
    the applied tree diffs to the very same sha256."""
    out = env["tmp"] / f"{task}.diff"
    cmd = [sys.executable, "-m", "core.cli", "export", "--workdir", str(env["workdir"]),
           "--run", "e2e", "--task", task, "-o", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    assert len(data) == status["diff"]["bytes"]
    assert hashlib.sha256(data).hexdigest() == status["diff"]["sha256"]
    tree = checkout(env["tmp"] / f"fresh-{task}")
    subprocess.run(["git", "-C", str(tree), "apply", "--index", str(out)], check=True)
    again = subprocess.run(
        ["git", "-C", str(tree), "diff", "--cached", "--binary", "--full-index", BASE_COMMIT],
        check=True,
        capture_output=True,
    ).stdout
    assert hashlib.sha256(again).hexdigest() == status["diff"]["sha256"]


def managed(kubectl, env, kinds: str) -> list[str]:
    out = kubectl("get", kinds, "-n", env["ns"], "-l", "app.kubernetes.io/managed-by=orchestrator",
                  "-o", "name", check=False)  # fmt: skip
    return out.stdout.split()


def test_a_130kb_inline_patch_and_the_same_from_a_configmap_complete(kubectl, env) -> None:
    patch = big_patch(env["tmp"], 130_000)
    assert len(patch.encode()) > 130_000  # more than one environment string may hold
    status = run_task(kubectl, env, "inline-130kb", "patch", {"prompt": "p", "patch": patch})
    assert status["diff"]["sha256"] == hashlib.sha256(patch.encode()).hexdigest()
    assert status["gate"]["passed"] is True
    export_applies(env, "inline-130kb", status)

    source = env["tmp"] / "cm.diff"
    source.write_text(patch)
    kubectl(
        "create", "configmap", "big-patch", "-n", env["ns"], f"--from-file=change.diff={source}"
    )
    ref = {"configMapKeyRef": {"name": "big-patch", "key": "change.diff"}}
    status = run_task(kubectl, env, "configmap-130kb", "patch", {"prompt": "p", "patchFrom": ref})
    assert status["diff"]["sha256"] == hashlib.sha256(patch.encode()).hexdigest()
    export_applies(env, "configmap-130kb", status)


def test_a_20mib_diff_is_kept_whole_and_applied_again_from_the_store(kubectl, env) -> None:
    status = run_task(kubectl, env, "bulk-20mib", "bulk", {"prompt": "make bulk"})
    diff = status["diff"]
    assert diff["bytes"] > 20 * 1024 * 1024 and not diff["truncated"]
    assert diff["patchRef"] == f"patches/{diff['sha256']}.diff.gz"
    assert status["gate"]["passed"] is True
    export_applies(env, "bulk-20mib", status)

    # the same 20 MiB change as a patch task: the patch comes from the store by its sha256
    ref = {"evidence": {"sha256": diff["sha256"]}}
    again = run_task(kubectl, env, "bulk-replay", "patch", {"prompt": "p", "patchFrom": ref})
    assert again["diff"]["sha256"] == diff["sha256"] and again["gate"]["passed"] is True
    export_applies(env, "bulk-replay", again)


def test_an_output_flood_keeps_head_and_tail_and_the_pod_log_stays_small(kubectl, env) -> None:
    status = run_task(kubectl, env, "flood-20mib", "flood", {"prompt": "flood"})
    job = status["attempts"][-1]["jobName"]
    pod_log = kubectl("logs", "-n", env["ns"], f"job/{job}", check=False)
    assert status["attempts"][-1]["logTruncated"] is True
    assert status["attempts"][-1]["logBytes"] <= 2 * 1024 * 1024 + 64 * 1024
    path = find_task_log(env["workdir"], "flood-20mib")
    assert path is not None
    records = list(read_records(path))
    lines = [r["line"] for r in records if r.get("stream") == "stdout"]
    assert lines[0].startswith("0000000 ")  # the head
    assert lines[-1].startswith(f"{FLOOD_LINES - 1:07d} ")  # the tail
    cut = [r for r in records if r.get("event") == "output_truncated"]
    assert len(cut) == 1 and cut[0]["dropped_records"] > 0, cut
    # the pod log (read within the Job's TTL) carried the report and notes, not the flood
    assert pod_log.returncode == 0, pod_log.stderr
    assert len(pod_log.stdout) < 64 * 1024
    assert "0000000 " not in pod_log.stdout and '"orchestrator_result"' in pod_log.stdout


def test_no_patch_configmap_and_finished_jobs_go_after_their_ttl(kubectl, env) -> None:
    done = [n for n in ("inline-130kb", "bulk-20mib", "flood-20mib")
            if get_json(kubectl, "taskexecution", n, "-n", env["ns"]).get("status", {}).get("state")]  # fmt: skip
    assert done, "run after the tests that make tasks"
    assert managed(kubectl, env, "configmaps") == []
    configmaps = get_json(kubectl, "configmaps", "-n", env["ns"])["items"]
    assert sorted(c["metadata"]["name"] for c in configmaps) == sorted(
        ["big-patch", "calc-bundle", "kube-root-ca.crt"]
    )
    # every recorded attempt's Jobs carry the short TTL; the TTL controller deletes them
    wait_for(
        lambda: managed(kubectl, env, "jobs") == [],
        JOB_TTL + 180,
        "the finished Jobs to be deleted after their TTL",
        lambda: str(managed(kubectl, env, "jobs,pods")),
    )
    wait_for(lambda: managed(kubectl, env, "pods") == [], 120, "their pods to go")
    # and the store holds no upload that was not adopted
    incoming = env["workdir"] / ".ledger" / "incoming"
    assert not incoming.exists() or not any(p.is_file() for p in incoming.rglob("*"))

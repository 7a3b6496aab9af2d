"""etcd object count over a long run on a real cluster (issue 12): bounded, not growing.

Before the evidence store every gated attempt left a patch ConfigMap (up to 512 KiB) and
every attempt its Jobs and pods in etcd, forever. Now bulk goes to the evidence store and a
recorded attempt's Jobs get a short TTL. This bench runs N patch tasks through the operator
(``kopf run`` out of cluster, its local evidence store served on the node address, as the
e2e tests run it) at most W at a time, samples what etcd holds in the run's namespace every
few seconds (Jobs, pods, ConfigMaps, Events, TaskExecutions: one API list each) and the API
server's own count of stored objects (``apiserver_storage_objects``, cluster-wide), and
writes the series and its maxima to ``bench/results/etcd-objects.json``.

Bounded means: operator-made objects (Jobs, pods, ConfigMaps) stay under a ceiling set by the
concurrency and the Job TTL, independent of N. TaskExecutions are the user's own objects (one
per task, deleted by whoever made them; ``--delete-finished`` does that as a pipeline would);
Events expire after the API server's ``--event-ttl`` (1 h here).

    .venv/bin/python bench/etcd_objects.py --tasks 1000 --concurrency 8 --job-ttl 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.operator_harness import (  # noqa: E402
    OperatorProcess,
    adapter,
    demo_patch,
    git_server,
    task_execution,
)

KINDS = ("jobs", "pods", "configmaps", "events", "taskexecutions")


def kubectl_runner(kubeconfig: str, binary: str) -> Any:
    def kubectl(*args: str, check: bool = True, input: str | None = None, timeout: float = 120):
        out = subprocess.run(
            [binary, "--kubeconfig", kubeconfig, *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out

    return kubectl


def count(kubectl: Any, ns: str) -> dict[str, int]:
    counts = {}
    for kind in KINDS:
        out = kubectl("get", kind, "-n", ns, "-o", "name", check=False)
        counts[kind] = len(out.stdout.split())
    managed = kubectl(
        "get",
        "jobs,pods,configmaps",
        "-n",
        ns,
        "-o",
        "name",
        "-l",
        "app.kubernetes.io/managed-by=orchestrator",
        check=False,
    )
    counts["operator_made"] = len(managed.stdout.split())
    return counts


def storage_objects(kubectl: Any) -> int:
    out = kubectl("get", "--raw", "/metrics", check=False).stdout
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in out.splitlines()
            if line.startswith("apiserver_storage_objects{")
        )
    )


def states(kubectl: Any, ns: str) -> dict[str, str]:
    out = kubectl("get", "taskexecutions", "-n", ns, "-o", "json", check=False, timeout=300)
    items = json.loads(out.stdout or "{}").get("items", [])
    return {i["metadata"]["name"]: (i.get("status") or {}).get("state", "") for i in items}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--job-ttl", type=int, default=30)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--delete-finished", action="store_true")
    parser.add_argument(
        "--cpu",
        default="500m",
        help="the adapter's CPU request and limit; on a 2-core node 500m lets 3 pods run at "
        "once, and a patch adapter's pod needs far less",
    )
    parser.add_argument("--out", default=str(ROOT / "bench/results/etcd-objects.json"))
    args = parser.parse_args()

    kubeconfig = (
        subprocess.run([str(ROOT / "hack/cluster/up")], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    env = dict(
        line.split("=", 1)
        for line in Path("/var/lib/orchestrator-cluster/images.env").read_text().split()
        if "=" in line
    )
    image = env["PROJECT_IMAGE"]
    binary = (
        subprocess.run(
            ["bash", "-c", f"source {ROOT}/hack/cluster/lib.sh; echo $BIN_DIR"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        + "/kubectl"
    )
    kubectl = kubectl_runner(kubeconfig, binary)
    # the commit the operator runs: read now, not when the run ends
    code = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    ns = f"bench-etcd-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    for _ in range(120):
        if kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0:
            break
        time.sleep(0.5)
    repo = git_server(kubectl, ns, image, "Never")
    kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(
            adapter(
                "patch",
                "patch",
                gate=[],
                retry={"maxAttempts": 1},
                resources={"cpu": args.cpu, "memory": "256Mi"},
            )
        ),
    )
    patch = demo_patch("add-multiply")
    workdir = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
    operator = OperatorProcess(
        kubeconfig=kubeconfig,
        namespace=ns,
        image=image,
        pull_policy="Never",
        workdir=workdir,
        env={"ORCHESTRATOR_JOB_TTL_SECONDS": str(args.job_ttl)},
    )
    operator.start()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    submitted, finished = 0, 0
    final: dict[str, str] = {}
    try:
        last_sample = 0.0
        while finished < args.tasks:
            now = states(kubectl, ns)
            done = {n for n, s in now.items() if s in ("COMPLETED", "FAILED", "TIMEOUT")}
            final |= {n: now[n] for n in done}
            finished = len(final)
            if args.delete_finished and done:
                kubectl(
                    "delete", "taskexecutions", "-n", ns, "--wait=false", *sorted(done), check=False
                )
            running = submitted - finished
            while submitted < args.tasks and running < args.concurrency:
                name = f"t{submitted:05d}"
                body = task_execution(name, repo, "patch", task={"prompt": "p", "patch": patch})
                kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
                submitted += 1
                running += 1
            if time.monotonic() - last_sample >= args.sample_seconds:
                last_sample = time.monotonic()
                sample = {
                    "t": round(last_sample - started, 1),
                    "submitted": submitted,
                    "finished": finished,
                    **count(kubectl, ns),
                    "apiserver_storage_objects": storage_objects(kubectl),
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
            time.sleep(1.0)
        # after the last task: the Jobs go after their TTL
        deadline = time.monotonic() + args.job_ttl + 300
        while time.monotonic() < deadline:
            sample = {
                "t": round(time.monotonic() - started, 1),
                "submitted": submitted,
                "finished": finished,
                **count(kubectl, ns),
                "apiserver_storage_objects": storage_objects(kubectl),
            }
            samples.append(sample)
            if sample["operator_made"] == 0:
                break
            time.sleep(args.sample_seconds)
    finally:
        operator.stop()
        kubectl("delete", "namespace", ns, "--wait=false", check=False)
    outcomes: dict[str, int] = {}
    for state in final.values():
        outcomes[state] = outcomes.get(state, 0) + 1
    during = [s for s in samples if s["finished"] < args.tasks]
    report = {
        "bench": "etcd-objects",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tasks": args.tasks,
        "concurrency": args.concurrency,
        "job_ttl_seconds": args.job_ttl,
        "delete_finished": args.delete_finished,
        "adapter_cpu": args.cpu,
        "code": code,
        "wall_seconds": round(time.monotonic() - started, 1),
        "outcomes": outcomes,
        "max_during_run": {
            k: max((s[k] for s in during), default=0)
            for k in (*KINDS, "operator_made", "apiserver_storage_objects")
        },
        "at_end": samples[-1] if samples else {},
        "loadavg": os.getloadavg(),
        "samples": samples,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    return 0 if outcomes.get("COMPLETED") == args.tasks else 1


if __name__ == "__main__":
    raise SystemExit(main())

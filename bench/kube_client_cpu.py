#!/usr/bin/env python
"""Client CPU per Job create: the generated kubernetes.aio method vs ClientKubeApi.

bench/README.md (operator, fix 7) measured that the generated ``*_without_preload_content``
methods validate every body into typed models (``validate_call``). ClientKubeApi sends the
same JSON through the client's ``param_serialize``/``call_api`` instead. This creates ``--n``
suspended Jobs (the operator's adapter Job manifest, so no pod starts) each way, in rounds
(the order swapped every round), in a fresh namespace of the local cluster, and records this
process's CPU time (``time.process_time``) and wall time per create.

``.venv/bin/python bench/kube_client_cpu.py --n 200`` -> bench/results/kube-client-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def manifest(name: str) -> dict[str, Any]:
    from core.kube.jobs import job_manifest

    te = {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {"name": "bench", "namespace": "x", "uid": str(uuid.uuid4())},
    }
    body = job_manifest(
        te=te,
        name=name,
        role="adapter",
        run_id="bench",
        task_id="bench",
        attempt=1,
        image="bench.invalid/none",
        # two grants of about the size the operator makes (a few KiB of JSON together)
        fetch_grant=json.dumps({"kind": "fetch", "padding": "x" * 1000}),
        runner_grant=json.dumps({"kind": "upload", "padding": "x" * 1000}),
        deadline_seconds=60,
        adapter=None,
    )
    body["metadata"].pop("ownerReferences")  # no owner: the collector leaves them alone
    body["metadata"].pop("namespace")
    body["spec"]["suspend"] = True
    return body


async def measure(kubeconfig: str, namespace: str, n: int) -> dict[str, Any]:
    from kubernetes.aio import client

    from core.kube.client_api import ClientKubeApi

    api = await ClientKubeApi.connect(kubeconfig)
    batch = client.BatchV1Api(api.api_client)

    async def generated(body: dict[str, Any]) -> None:
        resp = await batch.create_namespaced_job_without_preload_content(namespace, body)
        assert resp.status == 201, await resp.read()
        resp.release()

    async def protocol(body: dict[str, Any]) -> None:
        assert (await api.create_job(namespace, body)).created

    samples: dict[str, dict[str, list[float]]] = {
        k: {"cpu_ms": [], "wall_ms": []} for k in ("generated", "client_api")
    }
    try:
        order = [("generated", generated), ("client_api", protocol)]
        for i in range(n):
            for label, call in order if i % 2 else order[::-1]:  # no order bias
                body = manifest(f"{label[:3]}-{i:05d}")
                cpu, wall = time.process_time(), time.perf_counter()
                await call(body)
                samples[label]["cpu_ms"].append(1000 * (time.process_time() - cpu))
                samples[label]["wall_ms"].append(1000 * (time.perf_counter() - wall))
    finally:
        await api.close()

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "mean": round(statistics.fmean(values), 3),
            "p50": round(ordered[len(ordered) // 2], 3),
            "p95": round(ordered[int(len(ordered) * 0.95)], 3),
        }

    return {k: {m: summary(v) for m, v in d.items()} for k, d in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/kube-client-cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    kubeconfig = (
        os.environ.get("KUBECONFIG")
        or subprocess.run(
            [str(ROOT / "hack/cluster/kubeconfig")], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    kubectl = ["kubectl", "--kubeconfig", kubeconfig]
    namespace = f"kcpu-{uuid.uuid4().hex[:6]}"
    subprocess.run([*kubectl, "create", "namespace", namespace], check=True, capture_output=True)
    started = datetime.now(UTC)
    try:
        result = asyncio.run(measure(kubeconfig, namespace, args.n))
    finally:
        subprocess.run(
            [*kubectl, "delete", "namespace", namespace, "--wait=false"], capture_output=True
        )
    report = {
        "benchmark": "kube-client-cpu",
        "creates_each": args.n,
        "what": "one suspended adapter Job POST; this process's CPU and wall time per call",
        **result,
        "cpu_saved_per_create_ms": round(
            result["generated"]["cpu_ms"]["mean"] - result["client_api"]["cpu_ms"]["mean"], 3
        ),
        "started": started.isoformat(),
        "machine": {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Horizontal shards (issue 17): a burst of N TaskExecutions on one replica, then on two
sharded replicas, with the raw Job-create limit and the CPU of every process, in one run.

Both forms use the same PostgreSQL server (a fresh database each, migrated before the
operators start) and a namespace that admits no pods (ResourceQuota pods=0: Jobs exist, no
pod ever starts), so what is measured is the operator-bound part of a start: TaskExecution
applied -> adapter Job created, then IN_PROGRESS status, TASK_STARTED Event and DB row.

``one``  one replica, ``ORCHESTRATOR_SHARDS`` unset (today's single Lease).
``two``  two replicas, ``ORCHESTRATOR_SHARDS=S`` (default 2): the shard Leases split before
         the burst; each replica's own probe (bench/operator_bench.py's, loaded next to
         operator/handlers.py) counts its Job POSTs, so "no double action" is measured per
         process: the POSTs of the two add up to N and none met a 409.

The aggregate rate is N / (last adapter Job seen - first POST), both on this process's clock.
CPU seconds per process (operators, kube-apiserver, etcd, kube-controller-manager) over the
burst name the bottleneck: on this 2-core machine the sum is bounded by 2 CPU-seconds per
second of wall time, whoever spends them.

``.venv/bin/python bench/shards_bench.py --n 1000`` -> bench/results/operator-shards.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.operator_bench import (  # noqa: E402
    RESULTS,
    Cluster,
    Session,
    _events_named,
    cpu_seconds,
    loadavg,
    pids_named,
    rate,
    raw_job_rate,
    summary,
    wait_until,
)

LEASE = "orchestrator-operator"


def fresh_database(server_url: str) -> str:
    from sqlalchemy import create_engine, text

    from core.db.database import upgrade

    name = f"opbench_shards_{uuid.uuid4().hex[:8]}"
    admin = create_engine(
        server_url.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = f"{server_url.rsplit('/', 1)[0]}/{name}"
    upgrade(url)
    return url


def db_started(url: str, run_id: str) -> int:
    from sqlalchemy import func, select

    from core.db.database import make_engine
    from core.db.tables import ExecutionLog

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            query = select(func.count()).where(
                ExecutionLog.run_id == run_id, ExecutionLog.event == "TASK_STARTED"
            )
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def shard_holders(cluster: Cluster, ns: str, shards: int) -> list[str | None]:
    out: list[str | None] = []
    for i in range(shards):
        proc = cluster.kubectl(
            "get", "lease", f"{LEASE}-shard-{i}", "-n", ns, "-o", "json", check=False
        )
        spec = json.loads(proc.stdout).get("spec", {}) if proc.returncode == 0 else {}
        out.append(spec.get("holderIdentity"))
    return out


def start_second(s: Session) -> tuple[Any, Path]:
    """A second operator process in the session's namespace and work dir, its own probe file
    and identity (Session runs one; this reuses its start, then puts the first one back)."""
    first, first_stats, first_env = s.proc, s.stats_path, dict(s.extra_env)
    s.stats_path = s.workdir / "probe-stats-second.json"
    s.extra_env = {**first_env, "ORCHESTRATOR_IDENTITY": "second"}
    try:
        s.start_operator()
        second, second_stats = s.proc, s.stats_path
    finally:
        s.proc, s.stats_path, s.extra_env = first, first_stats, first_env
    return second, second_stats


def probe(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads(path.read_text()))
    return {}


def job_posts(stats: dict[str, Any]) -> dict[str, int]:
    """Job creates of one operator and those that failed (409 included), from its probe
    (``<verb>:<resource>`` keys of ``core.kube.api.ApiCall``)."""
    posts = int(stats.get("api", {}).get("create:jobs", {}).get("n", 0))
    failed = sum(n for k, n in stats.get("api_errors", {}).items() if k.startswith("create:jobs:"))
    return {"job_posts": posts, "job_post_errors": failed}


def run(
    cluster: Cluster, args: argparse.Namespace, replicas: int, server_url: str
) -> dict[str, Any]:
    shards = args.shards if replicas > 1 else 0
    db = fresh_database(server_url)
    env = {
        "ORCHESTRATOR_IDENTITY": "first",
        "ORCHESTRATOR_EVIDENCE_LISTEN": f"127.0.0.1:{args.evidence_port}",
        "ORCHESTRATOR_EVIDENCE_URL": f"http://127.0.0.1:{args.evidence_port}",
        "ORCHESTRATOR_EVIDENCE_REUSE_PORT": "true",
        "ORCHESTRATOR_MIGRATE": "false",
    }
    if shards:
        env["ORCHESTRATOR_SHARDS"] = str(shards)
    tag = f"shards{replicas}"
    with Session(
        cluster, tag, git=False, quota_pods=0, db_url=db, resync=args.resync, env=env
    ) as s:
        procs: dict[str, Any] = {"first": s.proc}
        stats_paths = {"first": s.stats_path}
        try:
            if replicas > 1:
                procs["second"], stats_paths["second"] = start_second(s)
                wait_until(
                    lambda: (
                        sorted(map(str, shard_holders(cluster, s.ns, shards)))
                        == sorted(["first", "second"] * (shards // 2) + ["first"] * (shards % 2))
                    ),
                    180,
                    "the shards to split",
                    1.0,
                )
            s.create_te("warmup")
            wait_until(lambda: "warmup" in s.jobs.by_te("adapter"), 120, "warm-up Job", 0.01)
            time.sleep(2.0)
            raw = raw_job_rate(s, args.raw, args.threads)
            time.sleep(3.0)
            pids = {f"operator_{k}": p.pid for k, p in procs.items()}
            pids |= pids_named("kube-apiserver", "etcd", "kube-controller")
            cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
            posts0 = {k: job_posts(probe(p)) for k, p in stats_paths.items()}
            names = [f"b-{i:05d}" for i in range(args.n)]
            t0 = time.monotonic()
            post_s = s.bulk_create(names, args.threads)
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda: all(n in s.jobs.by_te("adapter") for n in names),
                    args.job_timeout,
                    "all adapter Jobs",
                    0.05,
                )
            jobs = s.jobs.by_te("adapter")
            made = [n for n in names if n in jobs]
            span = max(jobs[n]["added"] for n in made) - t0 if made else None
            cpu1 = {k: cpu_seconds(v) for k, v in pids.items()}
            from_post, _ = s.job_latencies(names)

            def done() -> bool:
                return _events_named(cluster, s.ns, "TASK_STARTED") >= len(names) + 1

            with contextlib.suppress(TimeoutError):
                wait_until(done, args.job_timeout, "TASK_STARTED Events", 1.0)
            time.sleep(5.0)
            posts1 = {k: job_posts(probe(p)) for k, p in stats_paths.items()}
            holders = shard_holders(cluster, s.ns, shards) if shards else []
        finally:
            for name, proc in procs.items():
                if name != "first" and proc is not None:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=30)
        cpu = {k: _delta(cpu0[k], cpu1[k]) for k in pids}
        per_replica = {k: {q: posts1[k][q] - posts0[k][q] for q in posts1[k]} for k in stats_paths}
        return {
            "replicas": replicas,
            "shards": shards,
            "tasks": args.n,
            "jobs_created": len(made),
            "te_post_rate_per_s": rate(args.n, post_s),
            "to_adapter_job_created": {"seconds": _round(span), "per_s": rate(len(made), span)},
            "apply_to_adapter_job_ms": summary(from_post),
            "raw_job_create_limit": {k: v for k, v in raw.items() if k != "jobs_created_s"},
            "cpu_seconds_during_burst": cpu,
            "cpu_ms_per_task": {
                k: round(1000 * v / max(1, len(made)), 2) for k, v in cpu.items() if v is not None
            },
            "machine_cpu_busy_share": _round(
                sum(v for v in cpu.values() if v is not None) / ((os.cpu_count() or 1) * span)
                if span
                else None
            ),
            "job_posts_by_replica": per_replica,
            "task_started_events": _events_named(cluster, s.ns, "TASK_STARTED") - 1,
            "task_started_db_rows": db_started(db, s.run_id) - 1,
            "shard_holders_after": holders,
        }


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 3)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--shards", type=int, default=2, help="ORCHESTRATOR_SHARDS of the two")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--raw", type=int, default=1000, help="Jobs for the raw create rate")
    p.add_argument("--resync", type=float, default=30.0)
    p.add_argument("--job-timeout", type=float, default=900.0)
    p.add_argument("--evidence-port", type=int, default=18531)
    p.add_argument("--pg-url", default=os.environ.get("ORCHESTRATOR_TEST_POSTGRES_URL"))
    p.add_argument("--out", type=Path, default=RESULTS / "operator-shards.json")
    args = p.parse_args(argv)
    server = (
        args.pg_url
        or subprocess.run(
            [str(ROOT / "hack/postgres/up")], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    cluster = Cluster()
    started, load = datetime.now(UTC), loadavg()
    one = run(cluster, args, 1, server)
    two = run(cluster, args, 2, server)
    r1, r2 = one["to_adapter_job_created"]["per_s"], two["to_adapter_job_created"]["per_s"]
    report = {
        "benchmark": "shards",
        "one_replica": one,
        "two_sharded_replicas": two,
        "aggregate_job_rate_two_vs_one": round(r2 / r1, 3) if r1 and r2 else None,
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "load_avg_start_end": [load, loadavg()],
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
        "versions": cluster.versions(),
        "git_head": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("out", "pg_url")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

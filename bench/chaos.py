#!/usr/bin/env python
"""Chaos run of the operator on the local cluster with PostgreSQL (issue 11).

At least 200 TaskExecutions (patch successes on the demo repository's in-cluster git server,
gate failures, retries, fallbacks, slow adapters, timeouts) while the operator is SIGKILLed at
random moments (seeded), API calls fail through the fault proxy (500, 503, 429, dropped
connections), runner pods and Jobs are deleted by hand, the leader of a 2-replica
pair is killed, the kube-apiserver is restarted and PostgreSQL is stopped; then the invariant
checker (core/testing/invariants.py) compares the cluster, the database, the ledger and the
event log. The scenario is tests/e2e/chaos_harness.py (its short form runs in the e2e suite).

The PostgreSQL is the run's own (``--pg-state``, ``--pg-port``; started with hack/postgres/up),
never the shared one of hack/postgres/up, so it can be stopped. The kube-apiserver is shared
by everyone on the machine: before restarting it the run waits (up to ``--wait-for-others``
seconds) until no other pytest session runs e2e tests.

    .venv/bin/python bench/chaos.py --tasks 200 --kills 100 --apiserver-restarts 3 \
        --db-outages 2 --out bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from core.db.database import upgrade  # noqa: E402
from tests.e2e.chaos_harness import ChaosRun, Cluster, Plan  # noqa: E402
from tests.e2e.disruptions import Postgres, others_running_e2e  # noqa: E402


def _env_lines(text_: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text_.splitlines() if "=" in line)


def local_cluster() -> Cluster:
    kubeconfig = (
        subprocess.run(
            [str(ROOT / "hack/cluster/kubeconfig")], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    # the project image of this checkout (built and imported if missing)
    subprocess.run(
        [str(ROOT / "hack/cluster/images"), "all"], check=True, stdout=subprocess.DEVNULL
    )
    refs = _env_lines(
        subprocess.run(
            [str(ROOT / "hack/cluster/images"), "refs"], capture_output=True, text=True, check=True
        ).stdout
    )
    bin_dir = subprocess.run(
        ["bash", "-c", f'source "{ROOT}/hack/cluster/lib.sh" && echo "$BIN_DIR"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    kubectl_bin = str(Path(bin_dir) / "kubectl")
    if not Path(kubectl_bin).exists():
        kubectl_bin = shutil.which("kubectl") or "kubectl"

    def kubectl(
        *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [kubectl_bin, "--kubeconfig", kubeconfig, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc

    return Cluster(kubectl, kubectl_bin, kubeconfig, refs["PROJECT_IMAGE"], "Never")


def create_database(server_url: str) -> str:
    name = f"chaos_{uuid.uuid4().hex[:10]}"
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


def wait_for_others(limit: float, log: Callable[[str], None]) -> float:
    """Wait until no other session runs e2e tests (up to ``limit`` s); the seconds waited."""
    started = time.monotonic()
    while True:
        others = others_running_e2e()
        if not others:
            return round(time.monotonic() - started, 1)
        if time.monotonic() - started > limit:
            raise SystemExit(f"other e2e sessions still running after {limit:.0f}s: {others}")
        log(f"waiting: {len(others)} other e2e process(es): {others[0]}")
        time.sleep(120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--pods-deleted", type=int, default=10)
    p.add_argument("--jobs-deleted", type=int, default=5)
    p.add_argument("--leader-kills", type=int, default=1)
    p.add_argument(
        "--api-faults",
        type=int,
        default=100,
        help="API errors injected through tests/e2e/fault_proxy.py during the kills (0: none)",
    )
    p.add_argument("--apiserver-restarts", type=int, default=0)
    p.add_argument("--db-outages", type=int, default=0)
    p.add_argument("--db-outage-seconds", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--cpu", default="150m", help="CPU of each runner pod (request = limit)")
    p.add_argument("--converge-timeout", type=float, default=1200.0)
    p.add_argument("--pg-state", default="/tmp/chaos-pg")
    p.add_argument("--pg-port", type=int, default=25433)
    p.add_argument(
        "--wait-for-others",
        type=float,
        default=3600.0,
        help="before an apiserver restart, wait this long for other e2e sessions",
    )
    p.add_argument("--keep", action="store_true", help="keep the namespace and work dir")
    p.add_argument("--out", default=str(ROOT / "bench/results/chaos.json"))
    args = p.parse_args()

    def log(msg: str) -> None:
        print(f"[chaos {datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)

    plan = Plan(
        tasks=args.tasks,
        operator_kills=args.kills,
        pods_deleted=args.pods_deleted,
        jobs_deleted=args.jobs_deleted,
        leader_kills=args.leader_kills,
        api_faults=args.api_faults,
        apiserver_restarts=args.apiserver_restarts,
        db_outages=args.db_outages,
        db_outage_seconds=args.db_outage_seconds,
        seed=args.seed,
        max_in_flight=args.max_in_flight,
        cpu=args.cpu,
        converge_timeout=args.converge_timeout,
    )
    cluster = local_cluster()
    postgres = Postgres(Path(args.pg_state), args.pg_port)
    db_url = create_database(postgres.up())
    ns = f"chaos-{uuid.uuid4().hex[:6]}"
    workdir = Path(f"/tmp/{ns}")
    log(f"namespace {ns}, work dir {workdir}, database {db_url}, image {cluster.image}")
    run = ChaosRun(
        cluster,
        plan,
        namespace=ns,
        workdir=workdir,
        database_url=db_url,
        postgres=postgres,
        log=log,
    )
    if plan.apiserver_restarts:
        run.before_disruption = lambda: wait_for_others(args.wait_for_others, log)
    started = datetime.now(UTC)
    code = subprocess.run(  # the commit the run started from (the checkout may move on)
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    try:
        run.setup()
        result = run.run()
    finally:
        run.close()
        if not args.keep:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    waited = run.waited_for_others
    load = os.getloadavg()
    result = {
        **result,
        "seed": args.seed,
        "command": " ".join(["bench/chaos.py", *sys.argv[1:]]),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "waited_for_other_sessions_seconds": waited,
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "load_avg_at_end": [round(x, 2) for x in load],
        },
        "code": code,
        "workdir": str(workdir),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log(
        f"wrote {args.out}: tasks {result['tasks']}, kills {result['operator_kills']}, "
        f"API faults {result['api_faults']}, "
        f"lost {result['lost']}, duplicated {result['duplicated']}, stuck {result['stuck']}, "
        f"violations {len(result['violations'])}"
    )
    for v in result["violations"][:50]:
        log(f"  violation: {v}")
    ok = not (result["lost"] or result["duplicated"] or result["stuck"] or result["violations"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

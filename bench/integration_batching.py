#!/usr/bin/env python
"""Gate runs per merged change: the merge queue's batching against one-by-one integration.

Two parts, both written to ``bench/results/integration-batching.json``:

1. **simulated** (counts, exact): the real :func:`core.engine.merge_queue.run_queue` over a
   simulated repository (a commit is the set of changes in its tree). N changes, each a
   *culprit* with probability p (a tree containing a culprit fails the gate: it passed alone,
   it breaks with the others); policies one-by-one (K=1), fixed K=4, fixed K=8, adaptive from 4
   (doubling after a pass up to 32, halving after a failure). Per (p, policy): the mean over
   ``--seeds`` random draws of gate runs per merged change, and of one-by-one's (merged +
   gate_failed) per merged change; the verdicts are checked to be the same for every policy.
2. **real** (``--real N``): N completed tasks of a fake-ai run with one culprit, integrated by
   the real worker (git, the unittest gate on the merged tree) with ``--batch-size 1`` and with
   the default adaptive batches: gate runs and the wall time of ``integrate`` (not asserted:
   it depends on the machine).

Run: ``.venv/bin/python bench/integration_batching.py --n 64 --seeds 200 --real 16``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.engine.integration_repo import MergeConflict  # noqa: E402
from core.engine.merge_queue import BatchPolicy, QueueReport, Verdict, run_queue  # noqa: E402
from core.models import GateResult, IntegrationOutcome  # noqa: E402

POLICIES = {
    "one-by-one (K=1)": BatchPolicy(size=1, adaptive=False),
    "fixed K=4": BatchPolicy(size=4, adaptive=False),
    "fixed K=8": BatchPolicy(size=8, adaptive=False, max_size=8),
    "adaptive from 4 (max 32)": BatchPolicy(size=4, adaptive=True, max_size=32),
}


class SimulatedRepo:
    def __init__(self, culprits: set[str]) -> None:
        self.culprits = culprits
        self.trees: dict[str, frozenset[str]] = {"base": frozenset()}

    def stack(self, head: str, candidate: str) -> str | MergeConflict:
        commit = f"{head}+{candidate}"
        self.trees[commit] = self.trees[head] | {candidate}
        return commit

    def gate(self, base: str, head: str, candidates: Sequence[str], number: int) -> GateResult:
        return GateResult(passed=not (self.trees[head] & self.culprits), applied=True)


def simulate(n: int, p: float, seeds: int) -> dict[str, Any]:
    per_policy: dict[str, list[float]] = {name: [] for name in POLICIES}
    one_by_one: list[float] = []
    culprit_counts = []
    for seed in range(seeds):
        rng = random.Random(seed)
        names = [f"c{i:03d}" for i in range(n)]
        culprits = {c for c in names if rng.random() < p}
        culprit_counts.append(len(culprits))
        outcomes = None
        for name, policy in POLICIES.items():
            verdicts: list[Verdict[str]] = []
            report: QueueReport = run_queue(
                names, "base", SimulatedRepo(culprits), verdicts.append, policy=policy
            )
            got = {v.candidate: v.outcome for v in verdicts}
            assert outcomes is None or got == outcomes, "policies must agree on verdicts"
            outcomes = got
            merged = max(report.merged, 1)
            per_policy[name].append(report.gate_runs / merged)
        assert outcomes is not None
        merged = sum(1 for o in outcomes.values() if o is IntegrationOutcome.MERGED)
        one_by_one.append(len(names) / max(merged, 1))
    return {
        "n": n,
        "p": p,
        "seeds": seeds,
        "mean_culprits": round(statistics.fmean(culprit_counts), 2),
        "one_by_one_gate_runs_per_merge": round(statistics.fmean(one_by_one), 3),
        "gate_runs_per_merge": {k: round(statistics.fmean(v), 3) for k, v in per_policy.items()},
    }


# --------------------------------------------------------------------------- the real worker


def real(n: int, culprit: int, scratch: Path) -> dict[str, Any]:
    from core.db.database import default_url, upgrade
    from core.engine.executor import Clocks, ExecutorConfig, build_executor
    from core.engine.integration_worker import IntegrationConfig, build_integration_worker
    from core.engine.monitoring.metrics import Metrics
    from core.engine.monitoring.progress import SilentProgress
    from tests.workdirs import fake_ai_adapter, make_workdir

    limit = (
        "import os\\nimport unittest\\n\\n\\nclass Limit(unittest.TestCase):\\n"
        "    def test_few(self):\\n        self.assertLessEqual(len(os.listdir('features')), 2)"
    )
    gate = {
        "name": "unit",
        "command": ["{python}", "-m", "unittest", "discover", "-s", "tests", "-t", "."],
    }
    tasks = []
    for i in range(1, n + 1):
        prompt = f"fake-ai: write features/f{i}.txt :: {i}"
        if i == culprit:
            prompt += f"\nfake-ai: write tests/test_limit.py :: {limit}"
        tasks.append({"task_id": f"t{i}", "title": f"Feature {i}", "prompt": prompt})
    ok = "import unittest\n\n\nclass Ok(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
    template = make_workdir(
        scratch / "template",
        run_id="bench",
        tasks=tasks,
        adapters=[fake_ai_adapter(gate=[gate])],
        routes={t["task_id"]: "fake-ai" for t in tasks},
        files={"tests/__init__.py": "", "tests/test_ok.py": ok},
    )
    upgrade(default_url(template))
    build_executor(
        ExecutorConfig(run_id="bench", workdir=template),
        progress=SilentProgress(),
        clocks=Clocks(sleep=lambda _: None),
    ).run()
    runs = {}
    for name, policy in (
        ("one-by-one (K=1)", BatchPolicy(size=1, adaptive=False)),
        ("adaptive from 4", BatchPolicy(size=4)),
        ("fixed K=8", BatchPolicy(size=8, adaptive=False, max_size=8)),
    ):
        workdir = scratch / name.replace(" ", "_").replace("(", "").replace(")", "")
        shutil.copytree(template, workdir, symlinks=True)
        worker = build_integration_worker(
            IntegrationConfig(run_id="bench", workdir=workdir, batch=policy), metrics=Metrics()
        )
        started = time.perf_counter()
        done = worker.run()
        wall = time.perf_counter() - started
        stats = done.results.stats
        runs[name] = {
            "merged": stats.merged,
            "gate_failed": stats.gate_failed,
            "gate_runs": stats.gate_runs,
            "gate_runs_per_merge": stats.gate_runs_per_merge,
            "one_by_one_gate_runs": stats.one_by_one_gate_runs,
            "integrate_wall_s": round(wall, 2),
        }
    return {"n": n, "culprit": f"t{culprit}", "runs": runs}


def environment() -> dict[str, Any]:
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "git": git,
        "platform": platform.platform(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="changes per simulated run")
    parser.add_argument(
        "--p", type=float, nargs="+", default=[0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4]
    )
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--real", type=int, default=0, help="tasks of the real run (0: skip)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/integration-batching.json"
    )
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "integration_batching",
        "environment": environment(),
        "simulated": [simulate(args.n, p, args.seeds) for p in args.p],
    }
    if args.real:
        with tempfile.TemporaryDirectory(prefix="integration-bench-") as tmp:
            report["real"] = real(args.real, culprit=max(3, args.real * 2 // 3), scratch=Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["simulated"]:
        cells = "  ".join(f"{k}: {v:.3f}" for k, v in row["gate_runs_per_merge"].items())
        print(f"p={row['p']:.4f}  one-by-one {row['one_by_one_gate_runs_per_merge']:.3f}  {cells}")
    if "real" in report:
        print(json.dumps(report["real"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

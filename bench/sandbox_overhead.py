#!/usr/bin/env python
"""What the embedded sandbox (bubblewrap, issue 13) costs: per process and per attempt.

1. **per process**: ``--launches`` runs of ``true`` through ``run_process_group`` (own
   session, piped output, pidfd wait), unconfined vs in the sandbox as the executor starts it
   (a work dir with state to hide, the tree and HOME bound writable, the prompt read-only),
   with the network on and off. Reported: mean/p50/p95 wall per launch and the CPU of the
   children, and the difference to unconfined.
2. **per attempt**: ``executor.run()`` on N trivial tasks (adapter ``true``, one gate check
   ``true``, SQLite) with ``sandbox=False`` and with the sandbox, back to back (alternating
   which goes first), ``--repeat`` times; the median of the paired differences of wall and
   CPU per task is the sandbox's cost per attempt (two sandboxed processes, handing the
   trees to the sandbox user when root; ``build_executor`` adds the one probe at start).

Run: ``.venv/bin/python bench/sandbox_overhead.py --tasks 100 --launches 200 --repeat 3``.
Results: ``bench/results/sandbox_overhead.json``; summary in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import engine_overhead as eo  # noqa: E402

from core.db.database import default_url, upgrade  # noqa: E402
from core.engine.process_group import run_process_group  # noqa: E402
from core.engine.sandbox import Confinement, Sandbox, select_sandbox  # noqa: E402


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _dist_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": _ms(eo.pct(values, 50)),
        "p95_ms": _ms(eo.pct(values, 95)),
        "max_ms": _ms(max(values)),
        "mean_ms": _ms(statistics.fmean(values)),
    }


def _bwrap_version() -> str | None:
    try:
        return subprocess.run(
            ["bwrap", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class _Quiet:
    def line(self, stream: str, text: str) -> None:
        pass


def _workdir_with_state(root: Path) -> tuple[Path, Path, Path, Path]:
    """A work dir shaped like the executor's: (work dir, tree, home, prompt)."""
    wd = root / "work"
    for rel in (".state", ".ledger/patches", "logs/execution", "tools", ".work/mirrors/r.git"):
        (wd / rel).mkdir(parents=True)
    (wd / "orchestrator.db").write_bytes(b"SQLite format 3\0")
    adir = wd / ".work" / "run" / "t" / "1"
    tree, home = adir / "tree", adir / "home"
    tree.mkdir(parents=True)
    home.mkdir()
    prompt = adir / "prompt.md"
    prompt.write_text("prompt\n")
    return wd, tree, home, prompt


def launches(sandbox: Sandbox | None, n: int, cwd: Path, confinement: Confinement) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(confinement.writable[-1]), "LANG": "C.UTF-8"}
    walls: list[float] = []
    cpu = eo.cpu_now()
    for _ in range(n):
        t = time.perf_counter()
        result = run_process_group(
            ["true"],
            cwd=cwd,
            env=env,
            timeout=60,
            sink=_Quiet(),
            sandbox=sandbox,
            confinement=confinement,
        )
        walls.append(time.perf_counter() - t)
        if result.exit_code != 0:
            raise SystemExit(f"launch failed: {result}")
    used = eo.cpu_since(cpu)
    return {
        "launches": n,
        **_dist_ms(walls),
        "children_cpu_per_launch_ms": _ms(used["children_s"] / n),
        "self_cpu_per_launch_ms": _ms(used["self_s"] / n),
    }


def per_process(scratch: Path, n: int) -> dict[str, Any]:
    wd, tree, home, prompt = _workdir_with_state(scratch / f"launch-{uuid.uuid4().hex[:6]}")
    sandbox = select_sandbox(True, workdir=wd, hidden=[wd / "orchestrator.db"])
    out: dict[str, Any] = {}
    for label, sb, network in (
        ("unconfined", None, True),
        ("sandbox", sandbox, True),
        ("sandbox, network off", sandbox, False),
    ):
        confinement = Confinement((tree, home), (prompt,), network)
        launches(sb, min(n, 10), tree, confinement)  # warm up (page cache, handover)
        out[label] = launches(sb, n, tree, confinement)
    base = out["unconfined"]["mean_ms"]
    for label in ("sandbox", "sandbox, network off"):
        out[label]["extra_mean_ms"] = round(out[label]["mean_ms"] - base, 2)
    return out


def per_attempt(scratch: Path, n: int, repeat: int) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {"unconfined": [], "sandbox": []}
    for i in range(repeat):
        order = [False, True] if i % 2 == 0 else [True, False]
        for sandboxed in order:
            root = scratch / f"attempts-{sandboxed}-{uuid.uuid4().hex[:6]}"
            workdir, _ = eo.make_workdir(root / "workdir", n)
            url = default_url(workdir)
            upgrade(url)
            result = eo.engine_round(workdir, url, n, sandbox=sandboxed)
            shutil.rmtree(root, ignore_errors=True)
            cpu = result["cpu"]
            rounds["sandbox" if sandboxed else "unconfined"].append(
                {
                    "wall_per_task_ms": _ms(result["wall_s"] / n),
                    "cpu_per_task_ms": _ms((cpu["self_s"] + cpu["children_s"]) / n),
                    "attempt_p50_ms": _ms(eo.pct(result["attempt_latency_s"], 50)),
                    "build_executor_ms": _ms(result["build_executor_s"]),
                }
            )
    keys = ("wall_per_task_ms", "cpu_per_task_ms", "attempt_p50_ms", "build_executor_ms")
    summary = {
        label: {key: round(statistics.median(r[key] for r in runs), 2) for key in keys}
        for label, runs in rounds.items()
    }
    # each repeat ran both variants back to back: the median of the paired differences is
    # robust to the load of the machine drifting between repeats
    paired = {
        key: round(
            statistics.median(
                s[key] - u[key]
                for s, u in zip(rounds["sandbox"], rounds["unconfined"], strict=True)
            ),
            2,
        )
        for key in keys
    }
    return {
        "tasks": n,
        "repeat": repeat,
        "median": summary,
        "sandbox_minus_unconfined": paired,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/sandbox_overhead.py", description=__doc__)
    parser.add_argument("--tasks", type=int, default=100, help="tasks per engine run")
    parser.add_argument("--launches", type=int, default=200, help="launches per variant")
    parser.add_argument("--repeat", type=int, default=3, help="engine runs per variant")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/sandbox_overhead.json")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args(argv)
    scratch_parent = args.scratch or Path(tempfile.gettempdir())
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sandbox-overhead-", dir=scratch_parent))
    try:
        env = eo.environment(scratch)
        env["bwrap"] = _bwrap_version()
        env["euid"] = os.geteuid()
        print("per process ...", file=sys.stderr, flush=True)
        process = per_process(scratch, args.launches)
        print("per attempt ...", file=sys.stderr, flush=True)
        attempt = per_attempt(scratch, args.tasks, args.repeat)
        report = {
            "benchmark": "sandbox_overhead",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "environment": env,
            "per_process": process,
            "per_attempt": attempt,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        brief = {
            "per_process_mean_ms": {k: v["mean_ms"] for k, v in process.items()},
            "per_attempt_extra": attempt["sandbox_minus_unconfined"],
        }
        print(json.dumps(brief, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

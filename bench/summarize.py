#!/usr/bin/env python
"""Print the Markdown tables of bench/README.md from the recorded JSON results.

``.venv/bin/python bench/summarize.py [bench/results/engine_overhead-*.json ...]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def overhead_table(reports: list[dict[str, Any]]) -> str:
    head = (
        "| db | tasks | wall/task | bare/task | overhead/task | wall/bare | CPU overhead/task "
        "| attempt p50 / p95 | cycle p50 / p95 | overhead over repeats "
        "| load avg (1 min) before → after |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    rows = []
    for report in reports:
        for run in report["runs"]:
            e, b = run["engine"], run["bare"]
            a, c = e["attempt_latency"], e["cycle"]
            reps = run.get("repeats", [])
            spread = ", ".join(f"{r['overhead_per_task_ms']:.1f}" for r in reps) or "-"
            rows.append(
                f"| {run['db']} | {run['tasks']} | {e['wall_per_task_ms']:.1f} ms "
                f"| {b['per_task_ms']:.1f} ms | **{run['overhead_per_task_ms']:.1f} ms** "
                f"| {run['overhead_ratio']:.2f}x | {run['cpu_overhead_per_task_ms']:.1f} ms "
                f"| {a['p50_ms']:.1f} / {a['p95_ms']:.1f} ms "
                f"| {c['p50_ms']:.1f} / {c['p95_ms']:.1f} ms | {spread} "
                f"| {run['loadavg_before'][0]:.2f} → {run['loadavg_after'][0]:.2f} |"
            )
    return head + "\n".join(rows) + "\n"


def profile_tables(report: dict[str, Any]) -> str:
    out = []
    timed = report.get("breakdown")
    if timed:
        out.append(
            f"Timers on the engine's entry points, {timed['tasks']} tasks on {timed['db']} "
            f"(wall {timed['wall_per_task_ms']} ms/task, exclusive time):\n"
        )
        out.append("| group | ms/task | share of wall |\n|---|---:|---:|")
        for row in timed["groups"]:
            out.append(f"| {row['group']} | {row['ms_per_task']} | {row['share_of_wall']:.1%} |")
        out.append("\n| function | calls/task | exclusive ms/task |\n|---|---:|---:|")
        for row in timed["functions"]:
            out.append(
                f"| `{row['function']}` ({row['group']}) | {row['calls_per_task']} "
                f"| {row['exclusive_ms_per_task']} |"
            )
        out.append("")
    prof = report.get("profile")
    if prof and prof.get("profiler") == "cProfile":
        out.append(
            f"cProfile, {prof['tasks']} tasks on {prof['db']} "
            f"(profiled wall {prof['profiled_wall_per_task_ms']} ms/task):\n"
        )
        out.append("| operation | calls/task | cumulative ms/task |\n|---|---:|---:|")
        for op in prof["operations"]:
            out.append(
                f"| {op['operation'].strip()} (`{op['function']}`) | {op['calls_per_task']} "
                f"| {op['cum_ms_per_task']} |"
            )
        out.append("\n| top self time | calls/task | self ms/task | share |\n|---|---:|---:|---:|")
        for row in prof["top_self"][:15]:
            out.append(
                f"| `{row['function']}` | {row['calls_per_task']} | {row['self_ms_per_task']} "
                f"| {row['self_share']:.1%} |"
            )
        out.append("\n| self time by category | ms/task | share |\n|---|---:|---:|")
        for row in prof["self_time_by_category"]:
            out.append(f"| {row['category']} | {row['ms_per_task']} | {row['share']:.1%} |")
    pyi = report.get("profile_pyinstrument") or (
        prof if prof and prof.get("profiler") == "pyinstrument" else None
    )
    if pyi:
        out.append(
            f"\npyinstrument, {pyi['tasks']} tasks on {pyi['db']} "
            f"(profiled wall {pyi['profiled_wall_per_task_ms']} ms/task), inclusive time:\n"
        )
        out.append("| group | ms/task | share of wall |\n|---|---:|---:|")
        for row in pyi["groups"]:
            out.append(f"| {row['group']} | {row['ms_per_task']} | {row['share_of_wall']:.1%} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(
        RESULTS.glob("engine_overhead-*.json"), key=lambda p: ("postgres" in p.name, p.name)
    )
    reports = [json.loads(p.read_text()) for p in paths]
    print(overhead_table(reports))
    for report in reports:
        print(profile_tables(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Print the Markdown tables of bench/README.md from the recorded JSON results, and draw its
plots.

``.venv/bin/python bench/summarize.py [bench/results/engine_overhead-*.json ...]``
``.venv/bin/python bench/summarize.py --plots`` draws ``bench/burst.png`` (Jobs created over
time, the operator against the raw client, from ``results/operator-burst.json``) and
``bench/soak.png`` (operator RSS over the soak, from ``results/operator-memory.json``) with
matplotlib; a result that is not recorded yet is skipped with a note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _cumulative(times: list[float]) -> tuple[list[float], list[int]]:
    """Step data: after the i-th event (sorted), i objects exist."""
    xs = sorted(times)
    return [0.0, *xs], list(range(len(xs) + 1))


def burst_plot(report: dict[str, Any], out: Path) -> Any:
    """Jobs created over time: the operator's burst against the raw client's, same run."""
    plt = _pyplot()
    timeline = report["timeline"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [
        ("TaskExecutions POSTed", timeline["te_posts_s"], ":"),
        ("Jobs created by the operator", timeline["operator_jobs_s"], "-"),
        ("raw client, before", timeline["raw_jobs_s_before"], "--"),
        ("raw client, after", timeline["raw_jobs_s_after"], "--"),
    ]
    for label, times, style in series:
        xs, ys = _cumulative(times)
        ax.step(xs, ys, where="post", linestyle=style, label=label)
    targets = report.get("targets", {})
    ax.set_title(
        f"{report['tasks']} TaskExecutions at once: Jobs at "
        f"{targets.get('job_rate_ratio', '?')} of the raw rate "
        f"({report['client_threads']} client threads)"
    )
    ax.set_xlabel("seconds from the first POST")
    ax.set_ylabel("objects created")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


def soak_plot(report: dict[str, Any], out: Path) -> Any:
    """Operator RSS over the soak, with the target and the objects present."""
    plt = _pyplot()
    soak = report["soak"]
    samples = [p for p in soak["samples"] if p.get("rss_kib")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(
        [p["t_s"] / 60 for p in samples],
        [p["rss_kib"] / 1024 for p in samples],
        label="operator RSS",
    )
    target = report.get("targets", {}).get("rss_mib_target")
    if target is not None:
        ax.axhline(target, color="red", linestyle="--", label=f"target {target} MiB")
    ax.set_title(
        f"{soak['present_parked']} TaskExecutions present, a task every "
        f"{soak['task_interval_s']} s arriving and completing"
    )
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


PLOTS: tuple[tuple[str, str, Any, Any], ...] = (
    # (result, picture, draw, whether the result holds what the picture needs)
    ("operator-burst.json", "burst.png", burst_plot, lambda r: "timeline" in r),
    # the soak with steady arrivals and completions (older results soaked parked objects)
    (
        "operator-memory.json",
        "soak.png",
        soak_plot,
        lambda r: "present_parked" in r.get("soak", {}),
    ),
)


def draw_plots(results: Path = RESULTS, into: Path = BENCH) -> list[Path]:
    """Every plot whose result is recorded; returns the files written."""
    written = []
    for source, name, draw, usable in PLOTS:
        path = results / source
        report = json.loads(path.read_text()) if path.is_file() else None
        if report is None or not usable(report):
            print(f"{name}: skipped, {source} has no recorded data for it", file=sys.stderr)
            continue
        draw(report, into / name)
        written.append(into / name)
    return written


def main(argv: list[str]) -> int:
    if argv == ["--plots"]:
        for path in draw_plots():
            print(path)
        return 0
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

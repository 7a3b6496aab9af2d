"""Smoke test of bench/engine_overhead.py: it runs end to end and writes a well-formed report.

No timing thresholds: only the shape of the JSON and values that must hold on any machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "bench" / "engine_overhead.py"


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "result-{db}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "--tasks",
            "3",
            "--db",
            "sqlite",
            "--out",
            str(out),
            "--scratch",
            str(tmp_path / "scratch"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / "result-sqlite.json").read_text())


def test_report_has_the_expected_shape_and_sane_values(tmp_path: Path) -> None:
    report = _run(tmp_path, "--profile")

    assert report["benchmark"] == "engine_overhead"
    env = report["environment"]
    for key in ("date", "nproc", "cpu_model", "mem_total_mib", "python", "git", "sqlite"):
        assert key in env
    assert env["nproc"] >= 1

    (run,) = report["runs"]
    assert run["db"] == "sqlite" and run["tasks"] == 3
    engine, bare = run["engine"], run["bare"]
    assert engine["summary"]["COMPLETED"] == 3 and engine["summary"]["total"] == 3
    assert engine["wall_s"] > 0 and engine["wall_per_task_ms"] > 0
    assert bare["per_task_ms"] > 0 and len(bare["rounds"]) == 2
    for dist in (engine["attempt_latency"], engine["cycle"]):
        assert 0 < dist["p50_ms"] <= dist["p95_ms"] <= dist["max_ms"]
    # the overhead is exactly wall/task minus bare/task (rounding aside)
    assert math.isclose(
        run["overhead_per_task_ms"],
        engine["wall_per_task_ms"] - bare["per_task_ms"],
        abs_tol=0.05,
    )
    assert isinstance(run["meets_target"], bool) and run["target_ms"] == 50.0
    assert math.isclose(
        run["overhead_share_of_bare"],
        run["overhead_per_task_ms"] / bare["per_task_ms"],
        abs_tol=0.01,
    )
    assert run["target_share_of_bare"] == 0.30 and isinstance(run["meets_share_target"], bool)
    # what the engine did, counted per task: the adapter and the gate check are two child
    # processes, git several more, and every attempt writes the database
    counts = engine["per_task"]
    assert counts["child_processes"] >= counts["git_processes"] + 2
    assert counts["git_processes"] >= 2
    assert counts["db_statements"] >= counts["db_commits"] >= 1

    prof = report["profile"]
    assert prof["profiler"] == "cProfile" and prof["tasks"] == 3
    assert prof["top_self"] and all("function" in r for r in prof["top_self"])
    ops = {o["function"]: o for o in prof["operations"]}
    # every trivial task runs the adapter and one gate check, and makes git calls
    assert ops["core/engine/process_group.py:run_process_group"]["calls_per_task"] == 2
    assert ops["core/engine/workspace.py:git"]["calls_per_task"] >= 4
    assert prof["self_time_by_category"] and prof["summary"]

    breakdown = report["breakdown"]
    groups = {g["group"]: g for g in breakdown["groups"]}
    assert groups["git subprocesses"]["ms_per_task"] > 0
    assert groups["adapter + gate commands"]["ms_per_task"] > 0
    assert all(0 <= g["share_of_wall"] <= 1 for g in breakdown["groups"] if g["ms_per_task"] >= 0)
    calls = {f["function"]: f["calls_per_task"] for f in breakdown["functions"]}
    assert calls["run_process_group"] == 2 and calls["Store.finish_attempt"] == 1

    # the scratch work dirs are cleaned up
    assert not any((tmp_path / "scratch").iterdir())


def test_several_sizes_are_recorded_in_order(tmp_path: Path) -> None:
    out = tmp_path / "r-{db}.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--tasks", "1", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r-sqlite.json").read_text())
    assert [r["tasks"] for r in report["runs"]] == [1, 2]
    assert "profile" not in report


def test_sandbox_overhead_harness_runs_and_reports_both_variants(tmp_path: Path) -> None:
    out = tmp_path / "sandbox.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "sandbox_overhead.py"),
            "--tasks",
            "2",
            "--launches",
            "3",
            "--repeat",
            "1",
            "--out",
            str(out),
            "--scratch",
            str(tmp_path / "scratch"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "sandbox_overhead"
    process = report["per_process"]
    assert set(process) == {"unconfined", "sandbox", "sandbox, network off"}
    for variant in process.values():
        assert variant["launches"] == 3
        assert 0 < variant["p50_ms"] <= variant["p95_ms"] <= variant["max_ms"]
    attempt = report["per_attempt"]
    assert attempt["tasks"] == 2 and set(attempt["rounds"]) == {"unconfined", "sandbox"}
    assert all(len(r) == 1 for r in attempt["rounds"].values())
    assert set(attempt["sandbox_minus_unconfined"]) == set(attempt["median"]["sandbox"])
    assert not any((tmp_path / "scratch").iterdir())

"""Edge cases found in review: escaped grandchildren, baseline semantics, log prefix."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from core.engine.gate_verdict import CheckRun, judge
from core.engine.process_group import DRAIN_SECONDS, run_process_group
from core.engine.task_log import TaskLog, read_records
from core.models import CheckStatus, GatePolicy

ESCAPE = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
)


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def line(self, stream: str, text: str) -> None:
        self.lines.append((stream, text))


def test_grandchild_that_left_the_group_cannot_hold_the_run_open(tmp_path: Path) -> None:
    sink = Lines()
    started = time.monotonic()
    result = run_process_group(
        [sys.executable, "-c", ESCAPE], cwd=tmp_path, env=dict(os.environ), timeout=20, sink=sink
    )
    took = time.monotonic() - started
    escaped = int(sink.lines[0][1])
    try:
        assert result.exit_code == 0 and not result.timed_out
        assert took < DRAIN_SECONDS + 3, took
        assert ("stderr", "orchestrator: output pipe held open after exit; closed") in sink.lines
    finally:
        os.kill(escaped, signal.SIGKILL)


def _run(name: str, status: CheckStatus) -> CheckRun:
    return CheckRun(name=name, status=status, exit_code=None, duration_seconds=0.1)


def test_only_checks_that_failed_on_both_trees_are_pre_existing() -> None:
    # checks without per-test results: judged by status (granularity "check")
    patched = [
        _run("lint", CheckStatus.FAILED),
        _run("missing-tool", CheckStatus.ERROR),
        _run("slow", CheckStatus.TIMEOUT),
        _run("new-failure", CheckStatus.FAILED),
    ]
    baseline = {
        "lint": _run("lint", CheckStatus.FAILED),
        "missing-tool": _run("missing-tool", CheckStatus.ERROR),
        "slow": _run("slow", CheckStatus.TIMEOUT),
        "new-failure": _run("new-failure", CheckStatus.PASSED),
    }
    judged = [judge(run, baseline[run.name], GatePolicy()) for run in patched]
    marked = {c.name: (c.status, c.baseline_status) for c in judged}
    assert marked == {
        "lint": (CheckStatus.PRE_EXISTING, CheckStatus.FAILED),
        "missing-tool": (CheckStatus.ERROR, CheckStatus.ERROR),
        "slow": (CheckStatus.TIMEOUT, CheckStatus.TIMEOUT),
        "new-failure": (CheckStatus.FAILED, CheckStatus.PASSED),
    }
    assert {c.granularity for c in judged} == {"check"}


def test_a_cut_log_stays_a_prefix_of_the_output(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=10) as log:
        log.line("stdout", "12345")
        log.line("stdout", "1234567890")  # does not fit: cut here
        log.line("stdout", "ab")  # would fit, but comes after the cut
    records = list(read_records(path))
    lines = [r["line"] for r in records if "line" in r]
    assert lines == ["12345"]
    assert [r.get("event") for r in records if "event" in r] == [
        "output_truncated",
        "output_dropped",
    ]
    assert records[-1]["bytes"] == 12

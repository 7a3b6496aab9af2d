"""kill -9 the executor mid-attempt, start it again: the task finishes exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.tables import ExecutionLog, Task
from core.engine.executor import ExecutorConfig, build_executor
from core.engine.monitoring.progress import SilentProgress
from core.engine.process_group import process_group_alive
from core.models import FailureClass, LedgerEntry, TaskState
from tests.workdirs import fake_ai_adapter, git, make_workdir

PROMPT = (
    "Write out.txt, slowly.\n"
    "fake-ai: spawn-sleeper 120\n"
    "fake-ai: sleep 3\n"
    "fake-ai: write out.txt :: done\n"
)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_member(pgid: int, comm: str) -> int | None:
    """The host pid of a process named ``comm`` in process group ``pgid`` (the sandbox has a
    PID namespace of its own: the pid the adapter sees is not the host's)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if name == comm and int(fields[2]) == pgid:
            return int(entry)
    return None


def test_kill_9_mid_attempt_then_restart_finishes_exactly_once(tmp_path: Path) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="crash",
        tasks=[{"task_id": "slow-write", "prompt": PROMPT}],
        adapters=[fake_ai_adapter()],
        routes={"slow-write": "fake-ai"},
    )
    url = default_url(workdir)
    upgrade(url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "core.engine.executor", "--run", "crash", "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    engine = make_engine(url)

    def live_row() -> Task | None:
        with Session(engine) as s:
            row = s.get(Task, ("crash", "slow-write", ""))
            return row if row is not None and row.pid and row.workspace else None

    row = wait_for(live_row, what="the attempt's process group in the DB")
    sleeper_file = Path(row.workspace) / "sleeper.pid"
    wait_for(lambda: sleeper_file.exists() and sleeper_file.read_text(), what="sleeper")
    sleeper = wait_for(lambda: group_member(row.pid, "sleep"), what="the sleeper's host pid")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert process_group_alive(row.pid), "the orphaned adapter group should outlive a kill -9"
    assert pid_alive(sleeper)

    results = build_executor(
        ExecutorConfig(run_id="crash", workdir=workdir), progress=SilentProgress()
    ).run()

    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED
    assert [a.failure_class for a in task.attempts] == [FailureClass.INFRASTRUCTURE, None]
    # the interrupted attempt is charged the time it ran (it ran until the kill -9)
    assert task.attempts[0].duration_seconds > 0
    assert not process_group_alive(row.pid)
    assert not pid_alive(sleeper)

    entries = [
        LedgerEntry.model_validate_json(line)
        for line in (workdir / ".state/patch_ledger.jsonl").read_text().splitlines()
    ]
    assert [(e.attempt, e.state) for e in entries] == [
        (1, TaskState.FAILED),
        (2, TaskState.COMPLETED),
    ]
    with Session(engine) as s:
        events = [
            (e.attempt, e.event) for e in s.scalars(select(ExecutionLog).order_by(ExecutionLog.id))
        ]
        completed = s.scalars(select(Task).where(Task.status == "COMPLETED")).all()
    assert events == [
        (1, "TASK_STARTED"),
        (1, "ATTEMPT_FAILED"),
        (2, "TASK_STARTED"),
        (2, "TASK_COMPLETED"),
        (None, "EXECUTION_FINISHED"),
    ]
    assert len(completed) == 1
    jsonl = [
        json.loads(x)["event_key"]
        for x in (workdir / "logs/executor.jsonl").read_text().splitlines()
    ]
    assert len(jsonl) == len(set(jsonl)) == len(events)

    # no leftover worktrees or attempt dirs
    assert not (workdir / ".work/crash/slow-write").exists()
    mirror = next((workdir / ".work/mirrors").glob("*.git"))
    assert git("worktree", "list", "--porcelain", cwd=mirror).count("worktree ") == 1
    engine.dispose()

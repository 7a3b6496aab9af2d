"""Continuous mode: `orchestrator execute --watch` as a real process on a real work dir.

It executes the run it finds, picks up a second run that phase 4 drops into the work dir
while it waits (file-system notifications), and on SIGTERM stops the running attempt,
records it as interrupted and exits 0; a later `execute` resumes that task, and nothing is
lost or duplicated (database, ledger, events). Also: the seed's Python entry point with plain
arguments, and the watcher on its own (notifications and polling).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.engine.executor import run_executor_loop
from core.engine.monitoring.progress import SilentProgress
from core.engine.run_watcher import RunWatcher, inputs_fingerprint
from core.identity import TaskKey
from core.models import FailureClass, TaskState
from tests.workdirs import fake_ai_adapter, git, make_workdir

ORCHESTRATOR = [sys.executable, "-m", "core.cli"]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.2)


def state(store: Store, run: str, task: str) -> TaskState | None:
    record = store.find_task(TaskKey(run, task))
    return record.status if record else None


def drop_run(workdir: Path, run_id: str, tasks: list[dict], adapters: list[dict]) -> None:
    """What phase 4 does: the queue and the routing, then the flag last, each by rename."""
    base = git("rev-parse", "HEAD", cwd=workdir / "repo")
    queue = {"run_id": run_id, "tasks": [{"repo": "repo", "base_commit": base, **t} for t in tasks]}
    routing = {
        "run_id": run_id,
        "adapters": adapters,
        "decisions": [{"task_id": t["task_id"], "adapter_id": adapters[0]["id"]} for t in tasks],
    }
    flag = {"run_id": run_id, "completed_at": "2026-01-02T00:00:00Z"}
    for name, data in (
        ("task_queue.json", queue),
        ("routing_decisions.json", routing),
        ("ROUTING_COMPLETE", flag),
    ):
        tmp = workdir / ".state" / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, workdir / ".state" / name)


def test_run_executor_loop_takes_plain_arguments(tmp_path: Path) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="demo",
        tasks=[{"task_id": "t1", "prompt": "fake-ai: write out.txt :: hi"}],
        adapters=[fake_ai_adapter()],
        routes={"t1": "fake-ai"},
    )
    upgrade(default_url(workdir))
    results = run_executor_loop(run_id="demo", workdir=workdir, progress=SilentProgress())
    assert results.run_id == "demo" and results.finished
    assert [t.state for t in results.tasks] == [TaskState.COMPLETED]


def test_execute_watch_picks_up_a_second_run_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    adapter = fake_ai_adapter()
    workdir = make_workdir(
        tmp_path / "w",
        run_id="first",
        tasks=[{"task_id": "a1", "prompt": "fake-ai: write a1.txt :: one"}],
        adapters=[adapter],
        routes={"a1": "fake-ai"},
    )
    upgrade(default_url(workdir))
    store = Store(make_engine(default_url(workdir)))
    # the adapter runs in the sandbox, whose /tmp is its own: the release file lives in a
    # directory of the work dir, which the sandbox shows read-only (and live)
    signals = workdir / "signals"
    signals.mkdir()
    release = signals / "release-b2"
    out, errs = open(tmp_path / "watch.out", "w"), open(tmp_path / "watch.err", "w")
    proc = subprocess.Popen(
        [*ORCHESTRATOR, "execute", "--watch", "--workdir", str(workdir)],
        stdout=out,
        stderr=errs,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for("run first", lambda: state(store, "first", "a1") is TaskState.COMPLETED)
        wait_for("idle", lambda: "waiting for new runs" in (tmp_path / "watch.err").read_text())
        drop_run(
            workdir,
            "second",
            [
                {"task_id": "b1", "prompt": "fake-ai: write b1.txt :: two"},
                {"task_id": "b2", "prompt": f"fake-ai: wait-file {release} 300\nfake-ai: write b2.txt :: x"},
            ],
            [adapter],
        )
        wait_for("run second, b1", lambda: state(store, "second", "b1") is TaskState.COMPLETED)
        log = workdir / "logs/execution/b2.jsonl"
        wait_for("b2 running", lambda: log.exists() and "fake-ai: waiting for" in log.read_text())
        assert state(store, "second", "b2") is TaskState.IN_PROGRESS
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
        errs.close()
    err_text = (tmp_path / "watch.err").read_text()
    assert "received SIGTERM" in err_text and "Traceback" not in err_text
    assert "run first: 1 completed" in (tmp_path / "watch.out").read_text()

    # the interrupted attempt is recorded (infrastructure, not the adapter's fault) ...
    b2 = store.task(TaskKey("second", "b2"))
    assert b2.status is TaskState.PENDING and b2.attempts == 1
    [interrupted] = b2.attempt_results
    assert interrupted.failure_class is FailureClass.INFRASTRUCTURE
    assert "interrupted" in interrupted.failure_message
    # ... and the next start resumes it: attempt 2 completes; nothing lost or duplicated
    release.write_text("go")
    done = subprocess.run(
        [*ORCHESTRATOR, "execute", "--run", "second", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    b2 = store.task(TaskKey("second", "b2"))
    assert b2.status is TaskState.COMPLETED and b2.attempts == 2
    assert [t.status for t in store.tasks("first")] == [TaskState.COMPLETED]
    assert [t.status for t in store.tasks("second")] == [TaskState.COMPLETED] * 2
    events = [(e.run_id, e.task_id, e.attempt, e.event) for e in store.events()]
    assert len(events) == len(set(events))
    assert ("second", "b2", 1, "ATTEMPT_FAILED") in events
    assert ("second", "b2", 2, "TASK_COMPLETED") in events
    assert ("second", None, None, "EXECUTION_FINISHED") in events
    ledger = (workdir / ".state/patch_ledger.jsonl").read_text().splitlines()
    assert [(json.loads(x)["run_id"], json.loads(x)["task_id"]) for x in ledger] == [
        ("first", "a1"),
        ("second", "b1"),
        ("second", "b2"),
        ("second", "b2"),
    ]
    verify = subprocess.run(
        [*ORCHESTRATOR, "ledger", "verify", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("polling", [False, True], ids=["notifications", "polling"])
def test_the_watcher_wakes_on_a_new_flag_and_on_stop(tmp_path: Path, polling: bool) -> None:
    workdir = tmp_path / "w"
    stop = threading.Event()
    watcher = RunWatcher(workdir, stop, force_polling=polling, poll_seconds=0.2)
    first = watcher.wait(None)  # no inputs yet: a fingerprint of nothing
    assert first == inputs_fingerprint(workdir)
    threading.Timer(0.5, (workdir / ".state/ROUTING_COMPLETE").write_text, ['{"run_id": "x"}']).start()
    second = watcher.wait(first)
    assert second is not None and second != first
    # a file that is not an input changes nothing; the stop event ends the wait
    (workdir / ".state/execution_results.json").write_text("{}")
    threading.Timer(0.5, stop.set).start()
    assert watcher.wait(second) is None
    watcher.close()
    assert watcher.mode == ("polling" if polling else "notifications")

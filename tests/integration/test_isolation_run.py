"""Isolation on the embedded backend, end to end: a hostile adapter through the real executor.

The adapter (a script of the work dir, run by `build_executor(...).run()` in the bubblewrap
sandbox) tries to write a host path in /tmp and the work dir's state, to read the task queue,
the database and the ledger, to write into the shared mirror, and plants ``core.fsmonitor``,
``core.hooksPath`` and a filter driver in its checkout's git config whose payload would write
a marker file outside the tree. It also does its job: a file in its tree. The host must stay
untouched, the payload must never run, the job must be in the recorded diff, and the
attempt's isolation level must be recorded in the results, the database and the ledger.
`execute` without a working sandbox refuses and names --no-sandbox.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress
from core.engine.sandbox import BWRAP_ENV
from core.identity import TaskKey
from core.models import IsolationLevel, LedgerEntry, TaskState
from tests.workdirs import make_workdir

HOSTILE = r'''
import json, os, socket, subprocess, sys
from pathlib import Path

wd = Path(os.environ["HOSTILE_WORKDIR"])
report = {}


def attempt(name, action):
    try:
        action()
        report[name] = "done"
    except OSError as exc:
        report[name] = f"refused: {exc.strerror}"


attempt("host_tmp", lambda: Path(os.environ["HOSTILE_TMP"]).write_text("escaped"))
attempt("state_write", lambda: (wd / ".state" / "evil.json").write_text("{}"))
attempt("state_read", lambda: (wd / ".state" / "task_queue.json").read_text())
attempt("db_read", lambda: (wd / "orchestrator.db").read_bytes()[:16].decode("ascii"))
attempt("logs_read", lambda: (wd / "logs" / "executor.jsonl").read_text())
for mirror in sorted((wd / ".work" / "mirrors").glob("*.git")) if (wd / ".work" / "mirrors").exists() else []:
    attempt("mirror_config", lambda: (mirror / "config").write_text("[core]\n\tfsmonitor = x\n"))
    attempt("mirror_objects", lambda: (mirror / "objects" / "evil").write_text("x"))
if os.environ.get("HOSTILE_PORT"):
    def connect():
        with socket.create_connection(("127.0.0.1", int(os.environ["HOSTILE_PORT"])), timeout=5):
            pass
    attempt("network", connect)

# Plant everything that would run a command in git executed on this tree.
payload = Path(".payload.sh").resolve()
payload.write_text("#!/bin/sh\necho ran >> " + os.environ["HOSTILE_MARKER"] + "\ncat\n")
payload.chmod(0o755)
hooks = Path(".hooks").resolve()
hooks.mkdir()
for hook in ("pre-commit", "post-checkout", "post-index-change"):
    (hooks / hook).write_text(f"#!/bin/sh\nexec {payload}\n")
    (hooks / hook).chmod(0o755)
for key, value in (
    ("core.fsmonitor", str(payload)),
    ("core.hooksPath", str(hooks)),
    ("filter.evil.clean", str(payload)),
    ("filter.evil.smudge", str(payload)),
    ("diff.evil.textconv", str(payload)),
):
    subprocess.run(["git", "config", key, value], check=True)
Path(".gitattributes").write_text("*.txt filter=evil diff=evil\n")

# ... and the job itself.
Path("feature.txt").write_text("the adapter's work\n")
print("REPORT " + json.dumps(report), flush=True)
'''


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP listener on the host's loopback, created by the test itself."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def hostile_workdir(root: Path, *, port: int, network: bool = True) -> tuple[Path, Path, Path]:
    """(work dir, host /tmp path the adapter tries, marker the planted payload would write)."""
    host_tmp = Path("/tmp") / f"orchestrator-escape-{uuid.uuid4().hex}"
    marker = root / "PAYLOAD-RAN"
    workdir = root / "w"
    adapter = {
        "id": "hostile",
        "kind": "process",
        "command": [sys.executable, "{workdir}/tools/hostile.py"],
        "env": {
            "HOSTILE_WORKDIR": str(workdir.resolve()),
            "HOSTILE_TMP": str(host_tmp),
            "HOSTILE_MARKER": str(marker),
            "HOSTILE_PORT": str(port),
        },
        "sandbox": {"network": network},
        "gate": [{"name": "reads-the-tree", "command": ["/bin/sh", "-c", "cat feature.txt"]}],
        "retry": {"max_attempts": 1},
    }
    make_workdir(
        workdir,
        run_id="iso",
        tasks=[{"task_id": "t1", "prompt": "Add feature.txt."}],
        adapters=[adapter],
        routes={"t1": "hostile"},
        files={"README.md": "hello\n", "notes.txt": "text\n"},
    )
    (workdir / "tools").mkdir()
    (workdir / "tools" / "hostile.py").write_text(HOSTILE)
    upgrade(default_url(workdir))
    return workdir, host_tmp, marker


def execute(workdir: Path, **config: Any) -> Any:
    executor = build_executor(
        ExecutorConfig(run_id="iso", workdir=workdir, **config),
        progress=SilentProgress(),
        metrics=Metrics(),
        clocks=Clocks(sleep=lambda _: None),
    )
    return executor.run()


def adapter_report(workdir: Path) -> dict[str, str]:
    log = workdir / "logs" / "execution" / "t1.jsonl"
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("stream") == "stdout" and record.get("line", "").startswith("REPORT "):
            report: dict[str, str] = json.loads(record["line"][len("REPORT ") :])
            return report
    raise AssertionError(f"no report in {log}")


def recorded_isolation(workdir: Path) -> tuple[Any, Any, Any]:
    """The attempt's isolation as results file, database and ledger recorded it."""
    results = json.loads((workdir / ".state" / "execution_results.json").read_text())
    in_file = results["tasks"][0]["attempts"][0]["isolation"]
    store = Store(make_engine(default_url(workdir)))
    in_db = store.task(TaskKey("iso", "t1")).attempt_results[0].isolation
    ledger = (workdir / ".state" / "patch_ledger.jsonl").read_text().splitlines()
    in_ledger = LedgerEntry.model_validate_json(ledger[0]).result.isolation
    return in_file, in_db, in_ledger


@pytest.mark.parametrize("network", [True, False])
def test_a_hostile_adapter_leaves_the_host_untouched_and_its_work_is_kept(
    tmp_path: Path, listener: int, network: bool
) -> None:
    workdir, host_tmp, marker = hostile_workdir(tmp_path, port=listener, network=network)
    queue_before = (workdir / ".state" / "task_queue.json").read_text()

    results = execute(workdir)

    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED, task
    report = adapter_report(workdir)
    # Inside the sandbox: its private /tmp took the write; the state was not there to read.
    for name in ("state_read", "db_read", "logs_read"):
        assert report[name].startswith("refused"), report
    assert report["network"] == ("done" if network else "refused: Connection refused"), report
    # On the host: nothing it tried outside its tree happened.
    assert not host_tmp.exists()
    assert not (workdir / ".state" / "evil.json").exists()
    assert (workdir / ".state" / "task_queue.json").read_text() == queue_before
    for mirror in (workdir / ".work" / "mirrors").glob("*.git"):
        assert "fsmonitor" not in (mirror / "config").read_text()
        assert not (mirror / "objects" / "evil").exists()
    # The planted fsmonitor, hooks and filter driver ran nothing in the executor's git
    # (diff capture, the gate's checkout, patch application and tamper guard).
    assert not marker.exists(), marker.read_text()
    # Its work is in the recorded diff (the planted .git config is not).
    attempt = task.attempts[0]
    files = {f.path for f in attempt.diff.files}
    assert "feature.txt" in files and not any(p.startswith(".git/") for p in files)
    assert attempt.gate is not None and attempt.gate.passed
    expected = IsolationLevel.SANDBOX if network else IsolationLevel.SANDBOX_NO_NETWORK
    assert attempt.isolation is expected
    assert recorded_isolation(workdir) == (expected.value, expected, expected)


def test_execute_without_a_sandbox_refuses_and_names_no_sandbox(
    tmp_path: Path, listener: int
) -> None:
    workdir, host_tmp, marker = hostile_workdir(tmp_path, port=listener)
    env = {**os.environ, BWRAP_ENV: str(tmp_path / "no-bubblewrap-here")}
    argv = [sys.executable, "-m", "core.cli", "execute", "--run", "iso", "--workdir", str(workdir)]
    refused = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert refused.returncode == 2, refused
    assert "--no-sandbox" in refused.stderr and "no sandbox" in refused.stderr
    # Nothing was executed or recorded.
    assert not (workdir / ".work").exists()
    assert not (workdir / ".state" / "execution_results.json").exists()
    assert not (workdir / ".state" / "patch_ledger.jsonl").exists()

    # The same run with --no-sandbox runs unconfined, and records that it did.
    unconfined = subprocess.run(
        [*argv, "--no-sandbox"], capture_output=True, text=True, env=env, check=False
    )
    try:
        assert unconfined.returncode == 0, unconfined
        assert recorded_isolation(workdir) == ("none", IsolationLevel.NONE, IsolationLevel.NONE)
        # unconfined, its write to a host path outside the tree did land (what the sandbox
        # prevents); the executor's git still ran none of its planted payloads
        assert host_tmp.exists()
        assert not marker.exists()
    finally:
        host_tmp.unlink(missing_ok=True)

"""examples/fallback: the documented circuit-breaker scenario behaves as its README says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from core.db.database import default_url, upgrade
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.monitoring.progress import SilentProgress
from core.models import TaskState


def test_breaker_opens_and_fallback_takes_over(tmp_path: Path, repo_root: Path) -> None:
    workdir = tmp_path / "fallback"
    shutil.copytree(repo_root / "examples/fallback", workdir)
    upgrade(default_url(workdir))
    results = build_executor(
        ExecutorConfig(run_id="fallback", workdir=workdir),
        progress=SilentProgress(),
        clocks=Clocks(sleep=lambda _: None),
    ).run()
    assert [t.state for t in results.tasks] == [TaskState.COMPLETED] * 5
    assert [[a.adapter_id for a in t.attempts] for t in results.tasks] == [
        ["broken-cli", "fake-ai"],
        ["broken-cli", "fake-ai"],
        ["fake-ai"],
        ["fake-ai"],
        ["fake-ai"],
    ]
    first = results.tasks[0].attempts[0]
    assert "ConnectionResetError" in first.failure_message  # named by the traceback detector
    status = subprocess.run(
        [sys.executable, "-m", "core.cli", "status", "--run", "fallback", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "circuit breaker broken-cli: OPEN" in status.stdout

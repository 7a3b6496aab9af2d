"""The gate pod's runner (Kubernetes backend) judges per test like the embedded gate.

``python -m core.runner gate`` runs for real as a subprocess with a pod-like environment, on a
real pytest project; what the operator reads back is the result line of its stdout, and what
it writes into the TaskExecution status is the bounded summary of that result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.engine.workspace import add_worktree, capture_diff
from core.kube.attempts import gate_summary
from core.models import CheckStatus
from core.runner.protocol import EXIT_OK, parse_pod_log
from tests.gate_projects import CALC_PY, pytest_project


def test_runner_gate_names_the_new_failure_and_the_flaky_test(
    git_repo: Any, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project(flaky=True))
    author = add_worktree(repo.path, tmp_path / "author", repo.base)
    gt.write_files(author, {"calc.py": CALC_PY.replace("return a - b", "return a + b")})
    patch_file = tmp_path / "etc" / "patch"
    patch_file.parent.mkdir()
    patch_file.write_bytes(capture_diff(author, repo.base, 10_000_000).patch)
    workdir = tmp_path / "pod-work"
    workdir.mkdir()
    request = {
        "kind": "gate",
        "run_id": "run-1",
        "task": {
            "task_id": "t1",
            "prompt": "Change calc.",
            "repo": "repo",
            "base_commit": repo.base,
            "gate_policy": {"flaky_reruns": 1},
        },
        "adapter": {"id": "patcher", "kind": "patch"},
        "attempt": 1,
        "repo_url": str(repo.path),
        "timeout_seconds": 60,
        "gate_checks": [{"name": "pytest", "command": ["{python}", "-m", "pytest", "-q", "tests"]}],
        "gate_baseline": True,
        "patch_file": str(patch_file),
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir / "home"),
        "ORCHESTRATOR_WORKDIR": str(workdir),
        "ORCHESTRATOR_REQUEST_FILE": str(workdir.parent / "request.json"),
    }
    (workdir.parent / "request.json").write_text(json.dumps(request))
    proc = subprocess.run(
        [sys.executable, "-m", "core.runner", "gate"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == EXIT_OK, proc.stderr
    parsed = parse_pod_log(proc.stdout)
    assert parsed.result is not None and parsed.result.gate is not None
    gate = parsed.result.gate
    check = gate.checks[0]
    assert not gate.passed and check.status is CheckStatus.FAILED
    assert check.new_failures.names == ["tests/test_calc.py::test_sub"]
    assert check.pre_existing_failures.names == ["tests/test_calc.py::test_mul"]
    assert check.flaky.names == ["tests/test_flaky.py::test_flaky"]
    finished = next(r for r in parsed.records if r.get("event") == "gate_finished")
    assert finished["blamed"] == ["pytest (new failures: tests/test_calc.py::test_sub)"]
    # the rerun's output reached the pod log under its own stream
    assert any(r.get("stream", "").startswith("gate:pytest:rerun") for r in parsed.records)

    summary = gate_summary(gate)
    assert summary is not None
    listed = summary.checks[0]
    assert listed.new_failures is not None
    assert listed.new_failures.names == ["tests/test_calc.py::test_sub"]
    assert listed.flaky is not None and listed.flaky.count == 1

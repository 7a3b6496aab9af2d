"""Build small phase-4 work dirs for tests: a real git repository plus the three state files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_repo(path: Path, files: dict[str, str] | None = None) -> str:
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    for rel, text in (files or {"README.md": "hello\n"}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", "base", cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


def fake_ai_adapter(adapter_id: str = "fake-ai", **extra: Any) -> dict[str, Any]:
    return {
        "id": adapter_id,
        "kind": "process",
        "command": [sys.executable, "-m", "core.testing.fake_ai", "--prompt-file", "{prompt_file}"],
        **extra,
    }


def make_workdir(
    root: Path,
    *,
    run_id: str,
    tasks: list[dict[str, Any]],
    adapters: list[dict[str, Any]],
    routes: dict[str, str | list[str]],
    files: dict[str, str] | None = None,
) -> Path:
    """``routes`` maps task id -> adapter id, or a list [primary, *fallbacks]; ``files`` are
    the repository's base commit (default: a README)."""
    root.mkdir(parents=True, exist_ok=True)
    base = make_repo(root / "repo", files)
    state = root / ".state"
    state.mkdir()
    full = [{"repo": "repo", "base_commit": base, **t} for t in tasks]
    decisions = []
    for t in tasks:
        route = routes[t["task_id"]]
        chain = [route] if isinstance(route, str) else route
        decisions.append(
            {"task_id": t["task_id"], "adapter_id": chain[0], "fallback_adapter_ids": chain[1:]}
        )
    (state / "task_queue.json").write_text(json.dumps({"run_id": run_id, "tasks": full}))
    (state / "routing_decisions.json").write_text(
        json.dumps({"run_id": run_id, "adapters": adapters, "decisions": decisions})
    )
    (state / "ROUTING_COMPLETE").write_text(
        json.dumps({"run_id": run_id, "completed_at": "2026-01-01T00:00:00Z"})
    )
    return root


DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "examples/demo/repos/calc.bundle"


def demo_remote(tmp_path: Path) -> tuple[Path, Path]:
    """A bare clone of the demo's calc repository (``tmp_path/calc.git``, the tasks' remote)
    and an empty operator work dir (``tmp_path/operator``)."""
    bare = tmp_path / "calc.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(DEMO_BUNDLE), str(bare)],
        check=True,
        capture_output=True,
    )
    workdir = tmp_path / "operator"
    workdir.mkdir()
    return bare, workdir

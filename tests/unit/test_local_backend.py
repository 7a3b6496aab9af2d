"""core.engine.process_spawner.LocalBackend: the commit check done once per process and the
process adapter's start written once -- with real git and the real sandbox.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.engine.backend import AttemptRequest
from core.engine.process_spawner import LocalBackend
from core.engine.workspace import mirror_path
from core.identity import TaskKey
from core.models import AdapterSpec, DiffSummary, GateCheck, TaskSpec
from tests.unit.conftest import run_git


class Hooks:
    """Records what the backend reports, as the executor would write it."""

    def __init__(self) -> None:
        self.starts: list[tuple[int | None, Path | None]] = []

    def started(self, pgid: int | None, workspace: Path | None) -> None:
        self.starts.append((pgid, workspace))

    def validating(self, diff: DiffSummary) -> None:
        pass


def request(repo: Any, attempt: int = 1) -> AttemptRequest:
    return AttemptRequest(
        key=TaskKey("run1", "t1"),
        task=TaskSpec(
            task_id="t1", prompt="add a file", repo=str(repo.path), base_commit=repo.base
        ),
        adapter=AdapterSpec(
            id="sh", kind="process", command=["/bin/sh", "-c", "echo new > added.txt"]
        ),
        attempt=attempt,
        repo_url=str(repo.path),
        timeout_seconds=30,
        gate_checks=(GateCheck(name="sees", command=["/bin/sh", "-c", "test -f added.txt"]),),
        gate_baseline=False,
        max_log_bytes=100_000,
        max_diff_bytes=100_000,
    )


def attempt(backend: LocalBackend, req: AttemptRequest, hooks: Hooks | None = None) -> bool:
    run = backend.run_adapter(req, hooks or Hooks())
    assert run.outcome.start_error is None, run.outcome
    gate = backend.run_gate(req, run)
    backend.release(run)
    return gate.passed


def test_a_process_adapter_reports_its_start_once_with_group_and_checkout(
    git_repo: Any, tmp_path: Path, make_sandbox: Any
) -> None:
    repo = git_repo({"a.txt": "a\n"})
    workdir = tmp_path / "work"
    backend = LocalBackend(workdir, sandbox=make_sandbox(workdir))
    hooks = Hooks()
    assert attempt(backend, request(repo), hooks)
    [(pgid, workspace)] = hooks.starts
    assert pgid is not None and pgid > 0
    assert workspace == backend.attempt_dir(TaskKey("run1", "t1"), 1) / "tree"


def test_a_commit_gone_from_the_mirror_is_fetched_again(
    git_repo: Any, tmp_path: Path, make_sandbox: Any
) -> None:
    """The commit is looked up in the mirror once per process; should the mirror lose it,
    the checkout fails and the mirror is checked (and fetched) the long way."""
    repo = git_repo({"a.txt": "a\n"})
    workdir = tmp_path / "work"
    backend = LocalBackend(workdir, sandbox=make_sandbox(workdir))
    assert attempt(backend, request(repo, attempt=1))
    mirror = mirror_path(backend.workdir / ".work/mirrors", str(repo.path))
    shutil.rmtree(mirror)
    run_git(tmp_path, "init", "--quiet", "--bare", str(mirror))  # empty: the commit is gone
    assert attempt(backend, request(repo, attempt=2))
    assert run_git(mirror, "cat-file", "-t", repo.base).strip() == b"commit"


def test_a_released_attempt_leaves_nothing_and_its_gate_scratch_was_in_the_attempt_dir(
    git_repo: Any, tmp_path: Path, make_sandbox: Any, git_calls: Any
) -> None:
    """The gate's HOME and report files live in the attempt dir and go with it (deleted in
    the background). git processes of an attempt that added a file: the adapter's
    checkout, staging, the patch and its file list; the gate's checkout, the patch
    applied, the deleted-tests diff, the tamper snapshot and one comparison after the
    check (the first attempt also clones the mirror and looks the commit up)."""
    repo = git_repo({"a.txt": "a\n"})
    workdir = tmp_path / "work"
    backend = LocalBackend(workdir, sandbox=make_sandbox(workdir))
    check = GateCheck(
        name="home", command=["/bin/sh", "-c", 'test -f added.txt && touch "$HOME/x"']
    )
    req = replace(request(repo), gate_checks=(check,))
    git_calls.clear()
    run = backend.run_adapter(req, Hooks())
    adir = backend.attempt_dir(req.key, req.attempt)
    gate = backend.run_gate(req, run)
    assert gate.passed, gate
    [scratch] = adir.glob("gate-scratch-*")
    assert (scratch / "patched" / "home" / "x").is_file()
    assert not list(adir.glob("gate-[0-9]*")), "the gate checkout is gone after the gate"
    backend.release(run)
    assert not adir.exists() and not (workdir / ".work" / "run1").exists()
    backend.drain()
    assert list((workdir / ".work" / "trash").iterdir()) == []
    commands = [c for c in git_calls.commands() if c not in ("clone", "cat-file")]
    assert commands == [
        "read-tree", "add", "diff", "diff",
        "read-tree", "apply", "diff", "write-tree", "diff",
    ]  # fmt: skip

"""How many git processes an attempt starts (issue 17: each costs 2-4 ms of a trivial task's
cost), counted at the process level by a logging ``git`` on ``PATH``, on real repositories,
together with what the processes must still find (tamper evidence, deleted tests, diffs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.engine.test_gate import run_gate
from core.engine.workspace import ensure_mirror
from core.models import GateCheck

TEST_FILE = "tests/test_a.py"


def mirror_of(repo: Any, tmp_path: Path, git_calls: Any) -> Path:
    """A bare mirror of ``repo`` (as the backends check out from); the count starts after."""
    mirror = ensure_mirror(tmp_path / "mirrors", str(repo.path), repo.base)
    git_calls.clear()
    return mirror


def checks(*commands: str) -> list[GateCheck]:
    return [
        GateCheck(name=f"c{i}", command=["/bin/sh", "-c", cmd]) for i, cmd in enumerate(commands)
    ]


def test_gate_of_an_empty_patch_runs_one_git_process_per_check(
    git_repo: Any, worktree_checkout: Any, make_sink: Any, git_calls: Any, tmp_path: Path
) -> None:
    repo = git_repo({"a.txt": "x\n", TEST_FILE: "def test(): pass\n"})
    gate = run_gate(
        checks("true", "true"),
        patch=b"",
        checkout=worktree_checkout(mirror_of(repo, tmp_path, git_calls), repo.base),
        sinks=lambda name: make_sink(),
    )
    assert gate.passed and gate.apply_method == "empty"
    # the checkout, then one work-tree comparison per check: no write-tree (the snapshot is
    # the base commit), no deleted-tests diff (nothing applied), no comparison of the
    # tree's own index (untouched since we handed it over)
    assert git_calls.commands() == ["read-tree", "diff", "diff"]
    assert gate.tamper.modified_files == [] and gate.tamper.deleted_test_files == []


def test_what_checks_change_is_still_found_without_the_skipped_processes(
    git_repo: Any, worktree_checkout: Any, make_sink: Any, git_calls: Any, tmp_path: Path
) -> None:
    repo = git_repo({"a.txt": "x\n", "b.txt": "y\n"})
    gate = run_gate(
        checks("echo z >> a.txt", "true", "echo w > c.txt; git add c.txt", "true"),
        patch=b"",
        checkout=worktree_checkout(mirror_of(repo, tmp_path, git_calls), repo.base),
        sinks=lambda name: make_sink(),
    )
    assert [c.modified_files for c in gate.checks] == [["a.txt"], [], ["c.txt"], []]
    # one comparison per check until one stages in the tree's own index: from then on the
    # guard compares that index too (it stays changed); the checks' own git (the gate's
    # pinned PATH) is not counted
    assert git_calls.commands() == ["read-tree", "diff", "diff", "diff", "diff", "diff", "diff"]


def test_gate_of_a_patch_snapshots_it_and_looks_for_deleted_tests(
    git_repo: Any, worktree_checkout: Any, make_sink: Any, git_calls: Any, gt: Any, tmp_path: Path
) -> None:
    repo = git_repo({"a.txt": "x\n", TEST_FILE: "def test(): pass\n"})
    work = tmp_path / "work"
    gt.run_git(repo.path, "worktree", "add", "--detach", "--quiet", str(work), repo.base)
    (work / TEST_FILE).unlink()
    (work / "a.txt").write_text("changed\n")
    patch = gt.run_git(work, "diff", "--binary", "HEAD")

    gate = run_gate(
        checks("true", "echo again > a.txt"),
        patch=patch,
        checkout=worktree_checkout(mirror_of(repo, tmp_path, git_calls), repo.base),
        sinks=lambda name: make_sink(),
    )
    assert gate.applied and gate.tamper.deleted_test_files == [TEST_FILE]
    assert [c.modified_files for c in gate.checks] == [[], ["a.txt"]]
    assert git_calls.commands() == ["read-tree", "apply", "diff", "write-tree", "diff", "diff"]

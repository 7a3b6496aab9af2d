"""How many git processes an attempt starts (issue 17: each costs 2-4 ms of a trivial task's
cost), counted at the process level by a logging ``git`` on ``PATH``, on real repositories,
together with what the processes must still find (tamper evidence, deleted tests, diffs)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from core.engine.test_gate import run_gate
from core.engine.workspace import (
    add_worktree,
    apply_patch,
    capture_diff,
    checkout_index,
    ensure_mirror,
)
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


# --------------------------------------------------------------------------- diff capture

BIG = 10 * 1024 * 1024
BASE = {"a.txt": "one\n", "run.sh": "echo hi\n", "dir/b.txt": "two\n"}


def _symlink(tree: Path) -> None:
    (tree / "a.txt").unlink()
    (tree / "a.txt").symlink_to("run.sh")


def _dir_for_file(tree: Path) -> None:
    (tree / "a.txt").unlink()
    (tree / "a.txt").mkdir()
    (tree / "a.txt" / "inner").write_text("x\n")


CHANGES = {
    "modified": lambda t: (t / "a.txt").write_text("changed\n"),
    "deleted": lambda t: (t / "dir" / "b.txt").unlink(),
    "added": lambda t: (t / "new.txt").write_text("new\n"),
    "empty file added": lambda t: (t / "empty").write_bytes(b""),
    "mode": lambda t: (t / "run.sh").chmod(0o755),
    "renamed": lambda t: (t / "a.txt").rename(t / "moved.txt"),
    "symlink": _symlink,
    "file became a dir": _dir_for_file,
}


@pytest.mark.parametrize("kind", sorted(CHANGES))
def test_a_change_is_captured_as_without_the_shortcut(
    kind: str, git_repo: Any, git_calls: Any, tmp_path: Path
) -> None:
    repo = git_repo(BASE)
    mirror = mirror_of(repo, tmp_path, git_calls)
    trees = [add_worktree(mirror, tmp_path / name / "tree", repo.base) for name in ("a", "b")]
    index = checkout_index(trees[0])
    for tree in trees:
        CHANGES[kind](tree)
    git_calls.clear()
    fast = capture_diff(trees[0], repo.base, BIG, checkout=index)
    assert git_calls.commands() == ["add", "diff", "diff"]
    plain = capture_diff(trees[1], repo.base, BIG)
    assert not fast.summary.empty and fast.summary.files_changed > 0
    assert fast.summary == plain.summary and fast.patch == plain.patch


def test_a_commit_the_adapter_made_is_captured(
    git_repo: Any, git_calls: Any, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(BASE)
    tree = add_worktree(mirror_of(repo, tmp_path, git_calls), tmp_path / "t" / "tree", repo.base)
    index = checkout_index(tree)
    (tree / "a.txt").write_text("committed\n")
    gt.run_git(tree, "commit", "-qam", "the adapter's own commit")
    diff = capture_diff(tree, repo.base, BIG, checkout=index)
    assert [f.path for f in diff.summary.files] == ["a.txt"] and b"+committed" in diff.patch


def test_nothing_changed_is_one_git_process(git_repo: Any, git_calls: Any, tmp_path: Path) -> None:
    repo = git_repo(BASE)
    tree = add_worktree(mirror_of(repo, tmp_path, git_calls), tmp_path / "t" / "tree", repo.base)
    index = checkout_index(tree)
    (tree / "a.txt").write_text("edited\n")
    (tree / "a.txt").write_text("one\n")  # and reverted: same content, new stat
    git_calls.clear()
    diff = capture_diff(tree, repo.base, BIG, tmp_path / "spool.patch", checkout=index)
    assert git_calls.commands() == ["add"]
    assert diff.summary.empty and diff.summary.files_changed == 0
    assert diff.path == tmp_path / "spool.patch" and diff.patch == b""
    assert diff.summary.sha256 == hashlib.sha256(b"").hexdigest()


def test_an_index_changed_since_the_checkout_is_diffed(
    git_repo: Any, git_calls: Any, tmp_path: Path
) -> None:
    """A patch applied with ``--index`` (patch adapters) leaves nothing for ``git add`` to
    stage: the index is no longer the checkout's, so the diff is taken."""
    repo = git_repo(BASE)
    mirror = mirror_of(repo, tmp_path, git_calls)
    source = add_worktree(mirror, tmp_path / "s" / "tree", repo.base)
    (source / "a.txt").write_text("patched\n")
    patch = capture_diff(source, repo.base, BIG).patch
    tree = add_worktree(mirror, tmp_path / "t" / "tree", repo.base)
    index = checkout_index(tree)
    assert apply_patch(tree, patch) is not None
    git_calls.clear()
    diff = capture_diff(tree, repo.base, BIG, checkout=index)
    assert git_calls.commands() == ["add", "diff", "diff"]
    assert diff.patch == patch

"""core.engine.workspace: mirrors, worktrees, binary-safe diff capture and re-application."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from core.engine.workspace import (
    MAX_DIFF_FILES,
    CapturedDiff,
    add_worktree,
    apply_patch,
    capture_diff,
    ensure_mirror,
    has_commit,
    mirror_path,
    remove_worktree,
)
from core.errors import InfrastructureError, MissingCommitError

BIG = 10 * 1024 * 1024

BINARY_OLD = bytes(range(256)) * 4
BINARY_NEW = b"\x00\xff\xfe" + bytes(reversed(range(256))) * 8 + b"\x00"
RENAMED_CONTENT = "".join(f"rename me line {i}\n" for i in range(20))

BASE_FILES = {
    "keep.txt": "unchanged\n",
    "modify.txt": "line1\nline2\nline3\n",
    "delete.txt": "a\nb\n",
    "rename_src.txt": RENAMED_CONTENT,
    "bin.dat": BINARY_OLD,
    "dir with space/old name.txt": "spaced\n",
}


def worktree(repo: Any, tmp_path: Path, name: str, commit: str | None = None) -> Path:
    return add_worktree(repo.path, tmp_path / "wt" / name, commit or repo.base)


def make_all_kinds_of_changes(tree: Path, gt: Any) -> None:
    # The adapter commits part of its work itself ...
    gt.write_files(tree, {"committed.txt": "c\n"})
    gt.run_git(tree, "add", "committed.txt")
    gt.run_git(tree, "commit", "--quiet", "-m", "adapter commit")
    # ... and leaves the rest uncommitted, some of it untracked.
    gt.write_files(
        tree,
        {
            "modify.txt": "line1\nLINE2\nline3\nline4\n",
            "delete.txt": None,
            "bin.dat": BINARY_NEW,
            "new.bin": b"\x89PNG\r\n\x1a\n\x00\x00" + os.urandom(64),
            "ünï cødé/файл с пробелом.txt": "привет\n",
            "dir with space/new name.txt": "fresh\n",
        },
    )
    (tree / "rename_src.txt").rename(tree / "renamed dst.txt")


@pytest.fixture
def repo(git_repo: Any) -> Any:
    return git_repo(BASE_FILES)


def by_path(diff: CapturedDiff) -> dict[str, object]:
    return {f.path: f for f in diff.summary.files}


# --------------------------------------------------------------------------- capture


def test_capture_includes_every_kind_of_change(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    make_all_kinds_of_changes(tree, gt)
    diff = capture_diff(tree, repo.base, BIG)
    files = by_path(diff)

    assert set(files) == {
        "committed.txt",
        "modify.txt",
        "delete.txt",
        "bin.dat",
        "new.bin",
        "ünï cødé/файл с пробелом.txt",
        "dir with space/new name.txt",
        "renamed dst.txt",
    }
    assert files["committed.txt"].status == "added"
    assert files["modify.txt"].status == "modified"
    assert files["delete.txt"].status == "deleted"
    assert files["new.bin"].status == "added"
    assert files["bin.dat"].status == "modified"
    assert files["renamed dst.txt"].status == "renamed"
    assert files["renamed dst.txt"].old_path == "rename_src.txt"
    assert files["ünï cødé/файл с пробелом.txt"].status == "added"

    assert files["bin.dat"].binary and files["new.bin"].binary
    assert not files["modify.txt"].binary
    assert diff.summary.binary_files == 2

    # The patch itself names the files (unquoted, UTF-8) and carries binary data.
    assert "ünï cødé/файл с пробелом.txt".encode() in diff.patch
    assert b"GIT binary patch" in diff.patch
    assert b"rename from rename_src.txt" in diff.patch
    assert b"rename to renamed dst.txt" in diff.patch
    assert b"deleted file mode" in diff.patch


def test_capture_counts(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    make_all_kinds_of_changes(tree, gt)
    diff = capture_diff(tree, repo.base, BIG)
    files = by_path(diff)
    counts = {p: (f.insertions, f.deletions) for p, f in files.items()}
    assert counts == {
        "committed.txt": (1, 0),
        "modify.txt": (2, 1),
        "delete.txt": (0, 2),
        "bin.dat": (0, 0),
        "new.bin": (0, 0),
        "ünï cødé/файл с пробелом.txt": (1, 0),
        "dir with space/new name.txt": (1, 0),
        "renamed dst.txt": (0, 0),
    }
    s = diff.summary
    assert s.files_changed == 8
    assert s.insertions == 5
    assert s.deletions == 3
    assert not s.empty and not s.truncated


def test_counts_match_git_numstat(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {"modify.txt": "x\n" * 7, "more.txt": "1\n2\n3\n"})
    diff = capture_diff(tree, repo.base, BIG)
    expected_ins = expected_del = 0
    # the same count from the tree's own repository (capture_diff stages in a private index)
    gt.run_git(tree, "add", "--all")
    for row in gt.run_git(tree, "diff", "--cached", "--numstat", repo.base).decode().splitlines():
        ins, dels, _ = row.split("\t", 2)
        expected_ins += int(ins)
        expected_del += int(dels)
    assert (diff.summary.insertions, diff.summary.deletions) == (expected_ins, expected_del)
    assert (expected_ins, expected_del) == (10, 3)


def test_sha256_and_bytes_match_the_patch(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    make_all_kinds_of_changes(tree, gt)
    diff = capture_diff(tree, repo.base, BIG)
    assert diff.summary.sha256 == hashlib.sha256(diff.patch).hexdigest()
    assert diff.summary.bytes == len(diff.patch)
    # And the patch is what git itself produces for that tree against the base.
    gt.run_git(tree, "add", "--all")
    reference = gt.run_git(
        tree, "diff", "--cached", "--find-renames", "--binary", "--full-index", repo.base
    )
    assert diff.patch == reference


def test_capture_is_relative_to_base_not_head(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {"modify.txt": "committed\n"})
    gt.run_git(tree, "commit", "--quiet", "-am", "one")
    gt.write_files(tree, {"other.txt": "x\n"})
    gt.run_git(tree, "add", "other.txt")
    gt.run_git(tree, "commit", "--quiet", "-m", "two")
    diff = capture_diff(tree, repo.base, BIG)
    assert set(by_path(diff)) == {"modify.txt", "other.txt"}


def test_empty_diff(repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    diff = capture_diff(tree, repo.base, BIG)
    assert diff.patch == b""
    assert diff.summary.empty
    assert diff.summary.bytes == 0
    assert diff.summary.files_changed == 0
    assert diff.summary.files == []
    assert diff.summary.sha256 == hashlib.sha256(b"").hexdigest()
    assert not diff.summary.truncated


def test_edit_then_revert_is_empty(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {"modify.txt": "other\n"})
    gt.run_git(tree, "commit", "--quiet", "-am", "edit")
    gt.write_files(tree, {"modify.txt": BASE_FILES["modify.txt"]})
    assert capture_diff(tree, repo.base, BIG).summary.empty


def test_gitignored_files_are_not_captured(gt: Any, git_repo: Any, tmp_path: Path) -> None:
    repo = git_repo({".gitignore": "*.log\nbuild/\n", "a.txt": "a\n"})
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {"debug.log": "noise\n", "build/out.o": b"\x00", "a.txt": "b\n"})
    diff = capture_diff(tree, repo.base, BIG)
    assert [f.path for f in diff.summary.files] == ["a.txt"]


def test_over_the_hard_limit_nothing_is_kept(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {"big.txt": "".join(f"line {i}\n" for i in range(2000))})
    full = capture_diff(tree, repo.base, BIG)
    assert full.path is not None and not full.summary.truncated
    assert full.summary.sha256 == hashlib.sha256(full.patch).hexdigest()
    assert full.summary.bytes == len(full.patch) == full.path.stat().st_size
    full_size = len(full.patch)
    limit = 1000
    diff = capture_diff(tree, repo.base, limit)

    # capture stopped at the limit: no spool, no bytes, no sha of a diff nobody holds
    assert diff.summary.truncated and diff.path is None and diff.patch == b""
    assert not (tree.parent / "diff.patch").exists()
    assert diff.summary.sha256 == ""
    assert limit < diff.summary.bytes <= full_size
    # the stats (from git's numstat) still describe the whole change
    assert diff.summary.insertions == 2000 and diff.summary.files_changed == 1
    assert not diff.summary.empty


def test_file_list_is_capped_and_the_count_kept(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {f"many/f{i:04}.txt": f"{i}\n" for i in range(MAX_DIFF_FILES + 50)})
    summary = capture_diff(tree, repo.base, BIG).summary
    assert summary.files_changed == MAX_DIFF_FILES + 50
    assert len(summary.files) == MAX_DIFF_FILES
    assert summary.insertions == MAX_DIFF_FILES + 50


def test_truncation_boundary(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {"x.txt": "x\n"})
    size = len(capture_diff(tree, repo.base, BIG).patch)
    assert not capture_diff(tree, repo.base, size).summary.truncated
    assert capture_diff(tree, repo.base, size - 1).summary.truncated


# --------------------------------------------------------------------------- apply


def test_apply_reproduces_the_tree_byte_for_byte(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    make_all_kinds_of_changes(tree, gt)
    (tree / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "script.sh").chmod(0o755)
    diff = capture_diff(tree, repo.base, BIG)

    fresh = worktree(repo, tmp_path, "gate")
    assert gt.tree_snapshot(fresh) != gt.tree_snapshot(tree)
    method = apply_patch(fresh, diff.patch)
    assert method == "git apply --index --binary"
    assert gt.tree_snapshot(fresh) == gt.tree_snapshot(tree)
    assert os.access(fresh / "script.sh", os.X_OK)
    assert (fresh / "bin.dat").read_bytes() == BINARY_NEW
    # Re-capturing the applied tree gives the identical patch.
    assert capture_diff(fresh, repo.base, BIG).patch == diff.patch


def test_apply_empty_patch(gt: Any, repo: Any, tmp_path: Path) -> None:
    fresh = worktree(repo, tmp_path, "gate")
    before = gt.tree_snapshot(fresh)
    assert apply_patch(fresh, b"") == "empty"
    assert gt.tree_snapshot(fresh) == before


def test_apply_returns_none_when_patch_does_not_apply(gt: Any, repo: Any, tmp_path: Path) -> None:
    fresh = worktree(repo, tmp_path, "gate")
    before = gt.tree_snapshot(fresh)
    bad = (
        b"diff --git a/modify.txt b/modify.txt\n"
        b"--- a/modify.txt\n+++ b/modify.txt\n"
        b"@@ -1,3 +1,3 @@\n-nothing\n-like\n-this\n+x\n+y\n+z\n"
    )
    assert apply_patch(fresh, bad) is None
    assert gt.tree_snapshot(fresh) == before
    assert gt.run_git(fresh, "status", "--porcelain") == b""


def test_apply_garbage_returns_none(repo: Any, tmp_path: Path) -> None:
    fresh = worktree(repo, tmp_path, "gate")
    assert apply_patch(fresh, b"this is not a patch\n") is None


def test_three_way_fallback_when_context_moved(gt: Any, git_repo: Any, tmp_path: Path) -> None:
    lines = [f"line {i}\n" for i in range(1, 21)]
    repo = git_repo({"long.txt": "".join(lines)})
    # A later commit changes line 5; the adapter worked on that later commit and changed line 8.
    later_lines = list(lines)
    later_lines[4] = "line 5 changed upstream\n"
    later = repo.commit({"long.txt": "".join(later_lines)})
    tree = worktree(repo, tmp_path, "adapter", later)
    adapter_lines = list(later_lines)
    adapter_lines[7] = "line 8 changed by adapter\n"
    gt.write_files(tree, {"long.txt": "".join(adapter_lines)})
    diff = capture_diff(tree, later, BIG)

    fresh = worktree(repo, tmp_path, "gate")  # at the original base
    assert apply_patch(fresh, diff.patch) == "git apply --3way --binary"
    expected = list(lines)
    expected[7] = "line 8 changed by adapter\n"
    assert (fresh / "long.txt").read_text() == "".join(expected)


def test_exotic_file_names_round_trip(gt: Any, repo: Any, tmp_path: Path) -> None:
    tree = worktree(repo, tmp_path, "adapter")
    names = ['tab\there "quoted".txt', "back\\slash.txt", "日本語/ファイル.md", " leading space"]
    gt.write_files(tree, {name: f"{name}\n" for name in names})
    diff = capture_diff(tree, repo.base, BIG)
    assert sorted(f.path for f in diff.summary.files) == sorted(names)
    assert all(f.insertions == 1 and f.status == "added" for f in diff.summary.files)
    fresh = worktree(repo, tmp_path, "gate")
    assert apply_patch(fresh, diff.patch) is not None
    assert gt.tree_snapshot(fresh) == gt.tree_snapshot(tree)


def test_file_list_is_read_by_position_not_by_name(gt: Any, repo: Any, tmp_path: Path) -> None:
    """The file list comes from one ``--raw --numstat`` process: names that look like a raw
    record (a leading colon) or a numstat record (digits and tabs) are still just names."""
    tree = worktree(repo, tmp_path, "adapter")
    gt.write_files(tree, {":100644 M.txt": "x\n", "1\t2\tthree": "y\nz\n", "modify.txt": None})
    (tree / "rename_src.txt").rename(tree / ":renamed")
    diff = capture_diff(tree, repo.base, BIG)
    got = {f.path: (f.status, f.old_path, f.insertions, f.deletions) for f in diff.summary.files}
    assert got == {
        ":100644 M.txt": ("added", None, 1, 0),
        "1\t2\tthree": ("added", None, 2, 0),
        "modify.txt": ("deleted", None, 0, 3),
        ":renamed": ("renamed", "rename_src.txt", 0, 0),
    }
    assert diff.summary.files_changed == 4


# --------------------------------------------------------------------------- mirrors


def test_ensure_mirror_from_path(gt: Any, repo: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mirror = ensure_mirror(cache, str(repo.path), repo.base)
    assert mirror == mirror_path(cache, str(repo.path))
    assert has_commit(mirror, repo.base)
    assert gt.run_git(mirror, "rev-parse", "--is-bare-repository").strip() == b"true"
    # Reused, not cloned again: a marker inside survives the second call.
    (mirror / "marker").write_text("x")
    assert ensure_mirror(cache, str(repo.path), repo.base) == mirror
    assert (mirror / "marker").exists()
    # A commit made later in the source is fetched on demand.
    newer = repo.commit({"new.txt": "n\n"})
    assert not has_commit(mirror, newer)
    assert ensure_mirror(cache, str(repo.path), newer) == mirror
    assert has_commit(mirror, newer)

    tree = add_worktree(mirror, tmp_path / "wt" / "from-mirror", newer)
    assert (tree / "new.txt").read_text() == "n\n"
    assert (tree / "bin.dat").read_bytes() == BINARY_OLD
    remove_worktree(tree)
    assert not tree.exists()


def test_ensure_mirror_from_bundle(repo: Any, tmp_path: Path) -> None:
    second = repo.commit({"b.txt": "b\n"})
    bundle = tmp_path / "src.bundle"
    repo.git("bundle", "create", "--quiet", str(bundle), "--all")
    cache = tmp_path / "cache"
    mirror = ensure_mirror(cache, str(bundle), repo.base)
    assert mirror.name.startswith("src-")
    assert has_commit(mirror, repo.base) and has_commit(mirror, second)
    tree = add_worktree(mirror, tmp_path / "wt" / "bundle", second)
    assert (tree / "b.txt").read_text() == "b\n"


def test_missing_commit_is_refused_not_retried(repo: Any, tmp_path: Path) -> None:
    missing = "f" * 40
    with pytest.raises(MissingCommitError) as exc:
        ensure_mirror(tmp_path / "cache", str(repo.path), missing)
    assert missing in str(exc.value)


def test_missing_repository_is_infrastructure_error(tmp_path: Path) -> None:
    with pytest.raises(InfrastructureError) as exc:
        ensure_mirror(tmp_path / "cache", str(tmp_path / "nope"), "a" * 40)
    assert "clone" in str(exc.value)
    assert not list((tmp_path / "cache").glob("*.git"))


def test_mirror_paths_differ_per_source(tmp_path: Path) -> None:
    a = mirror_path(tmp_path, "/x/repo")
    b = mirror_path(tmp_path, "/y/repo")
    assert a != b and a.name.startswith("repo-") and b.name.startswith("repo-")
    assert mirror_path(tmp_path, "https://h/o/proj.git").name.startswith("proj-")


def test_add_worktree_replaces_an_old_one(gt: Any, repo: Any, tmp_path: Path) -> None:
    path = tmp_path / "wt" / "again"
    tree = add_worktree(repo.path, path, repo.base)
    (tree / "stray.txt").write_text("left over")
    tree = add_worktree(repo.path, path, repo.base)
    assert not (tree / "stray.txt").exists()
    assert gt.tree_snapshot(tree) == {
        k: v.encode() if isinstance(v, str) else v for k, v in BASE_FILES.items()
    }


def test_symlinks_type_changes_and_mode_changes(gt: Any, git_repo: Any, tmp_path: Path) -> None:
    repo = git_repo({"f": "hi\n", "g": "x\n"})
    tree = worktree(repo, tmp_path, "adapter")
    (tree / "f").unlink()
    (tree / "f").symlink_to("g")
    (tree / "newlink").symlink_to("g")
    (tree / "g").chmod(0o755)
    diff = capture_diff(tree, repo.base, BIG)
    files = by_path(diff)
    assert files["f"].status == "type_changed"
    assert files["newlink"].status == "added"
    assert files["g"].status == "modified"
    assert (files["g"].insertions, files["g"].deletions) == (0, 0)
    assert not files["g"].binary

    fresh = worktree(repo, tmp_path, "gate")
    assert apply_patch(fresh, diff.patch) is not None
    assert os.readlink(fresh / "f") == "g"
    assert os.readlink(fresh / "newlink") == "g"
    assert os.access(fresh / "g", os.X_OK)


def test_what_git_cannot_stage_does_not_lose_the_rest_of_the_diff(
    gt: Any, repo: Any, tmp_path: Path
) -> None:
    # An adapter leaves an empty nested repository (git cannot stage it: no commit) next to
    # its real work: the work is captured, and the capture does not fail.
    tree = worktree(repo, tmp_path, "adapter")
    (tree / "nested").mkdir()
    gt.run_git(tree / "nested", "init", "--quiet")
    (tree / "nested" / "f.txt").write_text("inside\n")
    gt.write_files(tree, {"modify.txt": "changed\n", "brand new.txt": "new\n"})
    diff = capture_diff(tree, repo.base, BIG)
    assert set(by_path(diff)) == {"modify.txt", "brand new.txt"}

"""Tamper evidence for the gate: tracked files that checks change, test files a patch deletes.

A check is supposed to read the patched tree, not rewrite it: a check that edits tracked files
(a formatter in write mode, a test that "fixes" its fixture, a script that resets the patch)
makes the gate judge something other than the diff. After the patch is applied the index
holds exactly the patched tree; we write it as a tree object once and, after each check, ask
git which tracked paths differ from it in the work tree or in the tree's own index (a check
that stages or unstages). Untracked files (caches, reports, build output) are not tracked and
never reported. git runs through the executor's private repository
(:func:`~core.engine.workspace.tree_git`) with its own config: the tree's own index is read
from a private copy (a regular file, never through a symlink), and nothing a check planted in
the tree's ``.git`` (config, hooks, a ``.git`` file pointing elsewhere) is ever used.

One git process per check where we can (each costs 2-4 ms, and the gate of a trivial task
is a handful of them): the tree's own index is compared with git only when its bytes differ
from the index we handed over (a byte-identical index stages exactly the snapshot, so the
comparison could only come back empty), and a checkout nothing was applied to needs no
``write-tree``: its snapshot is the commit it was checked out at.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from core.engine.workspace import private_git_dir, tree_git
from core.errors import InfrastructureError

#: The tree's own index is copied only up to this size (a real one is ~100 bytes per file).
MAX_INDEX_BYTES = 256 * 1024 * 1024

#: File names that hold tests in the common ecosystems (Python, Go, JS/TS, Java, Ruby, Rust).
TEST_FILE = re.compile(
    r"(^|/)(tests?|__tests__|spec)/"
    r"|(^|/)test_[^/]*\.py$|_test\.(py|go)$|\.(test|spec)\.[jt]sx?$"
    r"|(^|/)[^/]*Tests?\.(java|kt)$|_spec\.rb$"
)


class TreeGuard:
    """Remembers the patched tree; :meth:`changed` names tracked paths that differ since."""

    def __init__(self, tree: Path, snapshot: str | None = None) -> None:
        """``snapshot``: the commit the tree was checked out at, when nothing was applied to
        it (its index is still that commit's tree); None: the index is written as a tree.
        Only before any untrusted process has run in ``tree``."""
        self.tree = tree
        # read before `write-tree`, which rewrites the private index's cache of trees
        own = _tree_index(tree)
        private = _read_regular(private_git_dir(tree) / "index")
        #: the tree's own index as handed over, if it holds exactly what the snapshot holds
        self._handed_over = own if own is not None and own == private else None
        self.snapshot = snapshot or tree_git(tree, "write-tree").decode().strip()
        self._reported: set[str] = set()

    def changed(self) -> list[str]:
        """Tracked paths changed since the snapshot and not returned by an earlier call."""
        paths = set(self._names("diff", "--name-only", "-z", "--no-renames", self.snapshot))
        own = _tree_index(self.tree)
        if own is not None and own != self._handed_over:
            index = private_git_dir(self.tree) / "tree-index"
            index.write_bytes(own)
            try:
                paths |= set(
                    self._names(
                        "diff",
                        "--cached",
                        "--name-only",
                        "-z",
                        "--no-renames",
                        self.snapshot,
                        index_file=index,
                    )
                )
            except InfrastructureError:
                pass  # not an index git can read: the work tree comparison still stands
            finally:
                index.unlink(missing_ok=True)
        new = sorted(paths - self._reported)
        self._reported |= paths
        return new

    def _names(self, *args: str, index_file: Path | None = None) -> list[str]:
        raw = tree_git(self.tree, *args, index_file=index_file)
        return [p for p in raw.decode("utf-8", errors="surrogateescape").split("\0") if p]


def _tree_index(tree: Path) -> bytes | None:
    """``<tree>/.git/index`` if that is a plain file in a plain directory (else None)."""
    try:
        # neither `.git` nor `index` may be a symlink: a check could point them anywhere
        gitdir = os.open(tree / ".git", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fd = os.open("index", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=gitdir)
        finally:
            os.close(gitdir)
    except OSError:
        return None
    return _read_fd(fd)


def _read_regular(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    return _read_fd(fd)


def _read_fd(fd: int) -> bytes | None:
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
            return None
        return src.read(MAX_INDEX_BYTES)


def deleted_test_files(tree: Path) -> list[str]:
    """Test files the applied patch (now in the index) deletes or renames away."""
    raw = tree_git(tree, "diff", "--cached", "--name-status", "-z", "--find-renames", "HEAD")
    fields = raw.decode("utf-8", errors="surrogateescape").split("\0")
    gone: list[str] = []
    i = 0
    while i < len(fields) - 1:
        code = fields[i][:1]
        if code in ("R", "C"):
            if (
                code == "R"
                and TEST_FILE.search(fields[i + 1])
                and not TEST_FILE.search(fields[i + 2])
            ):
                gone.append(fields[i + 1])
            i += 3
            continue
        if code == "D" and TEST_FILE.search(fields[i + 1]):
            gone.append(fields[i + 1])
        i += 2
    return sorted(gone)

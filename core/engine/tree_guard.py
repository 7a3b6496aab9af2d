"""Tamper evidence for the gate: tracked files that checks change, test files a patch deletes.

A check is supposed to read the patched tree, not rewrite it: a check that edits tracked files
(a formatter in write mode, a test that "fixes" its fixture, a script that resets the patch)
makes the gate judge something other than the diff. After the patch is applied the index
holds exactly the patched tree; we write it as a tree object once and, after each check, ask
git which tracked paths differ from it in the work tree or the index. Untracked files (caches,
reports, build output) are not tracked and never reported.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.engine.workspace import git

#: File names that hold tests in the common ecosystems (Python, Go, JS/TS, Java, Ruby, Rust).
TEST_FILE = re.compile(
    r"(^|/)(tests?|__tests__|spec)/"
    r"|(^|/)test_[^/]*\.py$|_test\.(py|go)$|\.(test|spec)\.[jt]sx?$"
    r"|(^|/)[^/]*Tests?\.(java|kt)$|_spec\.rb$"
)


class TreeGuard:
    """Remembers the patched tree; :meth:`changed` names tracked paths that differ since."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.snapshot = git("write-tree", cwd=tree).decode().strip()
        self._reported: set[str] = set()

    def changed(self) -> list[str]:
        """Tracked paths changed since the snapshot and not returned by an earlier call."""
        paths = set(self._names("diff", "--name-only", "-z", "--no-renames", self.snapshot))
        paths |= set(
            self._names("diff", "--cached", "--name-only", "-z", "--no-renames", self.snapshot)
        )
        new = sorted(paths - self._reported)
        self._reported |= paths
        return new

    def _names(self, *args: str) -> list[str]:
        raw = git(*args, cwd=self.tree)
        return [p for p in raw.decode("utf-8", errors="surrogateescape").split("\0") if p]


def deleted_test_files(tree: Path) -> list[str]:
    """Test files the applied patch (now in the index) deletes or renames away."""
    raw = git("diff", "--cached", "--name-status", "-z", "--find-renames", "HEAD", cwd=tree)
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

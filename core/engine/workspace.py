"""Git checkouts for attempts: a bare mirror per source repository, one throwaway worktree per
attempt at the pinned base commit, and binary-safe diff capture against that commit.

We call the ``git`` binary rather than a library (pygit2/dulwich) on purpose: the adapter and
the gate use the same git, worktrees are cheap, and ``git diff --binary`` / ``git apply`` are the
reference implementations of the patch format that the ledger stores.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from core.errors import InfrastructureError
from core.models import DiffSummary, FileChange, FileStatus

#: Our own git calls never read the user's or system config and never prompt.
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "orchestrator",
    "GIT_AUTHOR_EMAIL": "orchestrator@localhost",
    "GIT_COMMITTER_NAME": "orchestrator",
    "GIT_COMMITTER_EMAIL": "orchestrator@localhost",
    "LC_ALL": "C",
}


def git(*args: str, cwd: Path | None = None, input: bytes | None = None) -> bytes:
    """Run git, return stdout; raise :class:`InfrastructureError` with git's stderr."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV}
    proc = subprocess.run(
        ["git", "-c", "core.quotepath=off", *args],
        cwd=cwd,
        input=input,
        env=env,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise InfrastructureError(f"git {' '.join(args[:2])} failed: {err}")
    return proc.stdout


def mirror_path(cache_dir: Path, repo_url: str) -> Path:
    digest = hashlib.sha256(repo_url.encode()).hexdigest()[:16]
    name = Path(repo_url.rstrip("/")).name.removesuffix(".git").removesuffix(".bundle")
    return cache_dir / f"{name or 'repo'}-{digest}.git"


def ensure_mirror(cache_dir: Path, repo_url: str, commit: str) -> Path:
    """A bare clone of ``repo_url`` that contains ``commit`` (fetched once, reused after)."""
    mirror = mirror_path(cache_dir, repo_url)
    if not mirror.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = mirror.with_name(mirror.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        git("clone", "--bare", "--quiet", repo_url, str(tmp))
        os.replace(tmp, mirror)
    if not has_commit(mirror, commit):
        git("fetch", "--quiet", repo_url, "+refs/heads/*:refs/heads/*", cwd=mirror)
        if not has_commit(mirror, commit):
            raise InfrastructureError(f"commit {commit} not found in {repo_url}")
    return mirror


def has_commit(repo: Path, commit: str) -> bool:
    try:
        git("cat-file", "-e", f"{commit}^{{commit}}", cwd=repo)
    except InfrastructureError:
        return False
    return True


def add_worktree(mirror: Path, path: Path, commit: str) -> Path:
    """A fresh detached worktree of ``commit`` at ``path`` (an old one there is replaced)."""
    if path.exists():
        remove_worktree(mirror, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    git("worktree", "add", "--detach", "--quiet", str(path), commit, cwd=mirror)
    return path


def remove_worktree(mirror: Path, path: Path) -> None:
    try:
        git("worktree", "remove", "--force", str(path), cwd=mirror)
    except InfrastructureError:
        shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune", cwd=mirror)


@dataclass(frozen=True)
class CapturedDiff:
    """The full diff bytes (for the gate) and its summary (for results and the ledger)."""

    patch: bytes
    summary: DiffSummary

    def stored_patch(self, max_bytes: int) -> bytes:
        """The copy kept in the ledger/DB: at most ``max_bytes``, with a visible marker."""
        if len(self.patch) <= max_bytes:
            return self.patch
        dropped = len(self.patch) - max_bytes
        marker = f"\n# orchestrator: diff truncated, {dropped} bytes dropped\n"
        return self.patch[:max_bytes] + marker.encode()


_STATUS: dict[str, FileStatus] = {
    "A": "added",
    "M": "modified",
    "D": "deleted",
    "R": "renamed",
    "C": "copied",
    "T": "type_changed",
}


def capture_diff(tree: Path, base_commit: str, max_bytes: int) -> CapturedDiff:
    """Diff of everything in ``tree`` (tracked, new, deleted, renamed, binary) vs the base.

    Untracked files are staged first (``.gitignore`` is honoured), so commits the adapter made
    itself and uncommitted edits are both captured relative to the pinned base commit.
    """
    git("add", "--all", cwd=tree)
    common = ("diff", "--cached", "--find-renames", "--no-ext-diff", "--no-textconv")
    patch = git(*common, "--binary", "--full-index", base_commit, cwd=tree)
    files = _file_changes(
        git(*common, "--name-status", "-z", base_commit, cwd=tree),
        git(*common, "--numstat", "-z", base_commit, cwd=tree),
    )
    summary = DiffSummary(
        sha256=hashlib.sha256(patch).hexdigest(),
        bytes=len(patch),
        files_changed=len(files),
        insertions=sum(f.insertions for f in files),
        deletions=sum(f.deletions for f in files),
        binary_files=sum(1 for f in files if f.binary),
        truncated=len(patch) > max_bytes,
        empty=not patch,
        files=files,
    )
    return CapturedDiff(patch=patch, summary=summary)


def _file_changes(name_status: bytes, numstat: bytes) -> list[FileChange]:
    fields = name_status.decode("utf-8", errors="surrogateescape").split("\0")
    changes: list[tuple[str, str | None, FileStatus]] = []
    i = 0
    while i < len(fields) - 1:
        code = fields[i][:1]
        if code in ("R", "C"):
            changes.append((fields[i + 2], fields[i + 1], _STATUS[code]))
            i += 3
        else:
            changes.append((fields[i + 1], None, _STATUS.get(code, "modified")))
            i += 2
    stats = _numstat(numstat)
    out = []
    for path, old, status in changes:
        ins, dels = stats.get(path, (None, None))
        out.append(
            FileChange(
                path=path,
                old_path=old,
                status=status,
                binary=ins is None,
                insertions=ins or 0,
                deletions=dels or 0,
            )
        )
    return out


def _numstat(raw: bytes) -> dict[str, tuple[int | None, int | None]]:
    """Parse ``--numstat -z``: binary files show ``-`` counts; renames carry two paths."""
    fields = raw.decode("utf-8", errors="surrogateescape").split("\0")
    stats: dict[str, tuple[int | None, int | None]] = {}
    i = 0
    while i < len(fields) - 1:
        ins, dels, path = fields[i].split("\t", 2)
        if path == "":  # rename: "ins\tdels\t" then old path, new path
            path = fields[i + 2]
            i += 3
        else:
            i += 1
        stats[path] = (None, None) if ins == "-" else (int(ins), int(dels))
    return stats


#: The ladder, strictest first: exact context into the index, then a three-way merge with
#: the blobs the diff names (``--full-index`` diffs carry them), then, only when asked for,
#: one line of context and whitespace differences ignored.
APPLY_LADDER: tuple[tuple[str, ...], ...] = (
    ("apply", "--index", "--binary"),
    ("apply", "--3way", "--binary"),
)
FUZZY_APPLY = ("apply", "--index", "--binary", "-C1", "--ignore-whitespace")


def apply_patch(tree: Path, patch: bytes, *, fuzzy: bool = False) -> str | None:
    """Apply ``patch`` to a fresh checkout; return the method that worked, None if none did.

    Every rung leaves the result in the index too (``--3way`` implies ``--index``), which
    the gate's tamper check relies on. ``fuzzy`` adds the last rung: off by default, because
    a diff that needs fuzz may land somewhere other than where its author meant.
    """
    if not patch:
        return "empty"
    ladder = (*APPLY_LADDER, FUZZY_APPLY) if fuzzy else APPLY_LADDER
    for method in ladder:
        try:
            git(*method, "-", cwd=tree, input=patch)
        except InfrastructureError:
            git("reset", "--hard", "--quiet", cwd=tree)
            continue
        return "git " + " ".join(method)
    return None

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
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import InfrastructureError, MissingCommitError
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
            raise MissingCommitError(
                f"commit {commit} is not in repository {repo_url} (all branches fetched)"
            )
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


#: Files listed in a diff summary (``files_changed`` keeps the full count).
MAX_DIFF_FILES = 200
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class CapturedDiff:
    """The full diff (spooled to a file, for the gate and the evidence store) and its
    summary (for results and the ledger). ``path`` is None when the diff exceeded the hard
    limit: then nothing was kept and ``summary.truncated`` is set."""

    path: Path | None
    summary: DiffSummary

    @property
    def patch(self) -> bytes:
        """The diff's bytes, read from the spool file (b"" when none was kept)."""
        return self.path.read_bytes() if self.path is not None else b""


_STATUS: dict[str, FileStatus] = {
    "A": "added",
    "M": "modified",
    "D": "deleted",
    "R": "renamed",
    "C": "copied",
    "T": "type_changed",
}


def capture_diff(
    tree: Path, base_commit: str, max_bytes: int, spool: Path | None = None
) -> CapturedDiff:
    """Diff of everything in ``tree`` (tracked, new, deleted, renamed, binary) vs the base.

    Untracked files are staged first (``.gitignore`` is honoured), so commits the adapter made
    itself and uncommitted edits are both captured relative to the pinned base commit. The
    diff streams into ``spool`` (default: ``diff.patch`` beside the tree) with its sha256
    computed on the way; past ``max_bytes`` git is stopped and the spool removed, so an
    adapter cannot make us hold (or store) more than the hard limit.
    """
    git("add", "--all", cwd=tree)
    common = ("diff", "--cached", "--find-renames", "--no-ext-diff", "--no-textconv")
    spool = spool or tree.parent / "diff.patch"
    sha256, size, complete = _spool(
        [*common, "--binary", "--full-index", base_commit], tree, spool, max_bytes
    )
    files = _file_changes(
        git(*common, "--name-status", "-z", base_commit, cwd=tree),
        git(*common, "--numstat", "-z", base_commit, cwd=tree),
    )
    summary = DiffSummary(
        sha256=sha256 if complete else "",
        bytes=size,
        files_changed=len(files),
        insertions=sum(f.insertions for f in files),
        deletions=sum(f.deletions for f in files),
        binary_files=sum(1 for f in files if f.binary),
        truncated=not complete,
        empty=size == 0,
        files=files[:MAX_DIFF_FILES],
    )
    return CapturedDiff(path=spool if complete else None, summary=summary)


def _spool(args: list[str], cwd: Path, target: Path, limit: int) -> tuple[str, int, bool]:
    """Run ``git <args>`` into ``target``: (sha256, bytes seen, whether all of it fit)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV}
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            ["git", "-c", "core.quotepath=off", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        assert proc.stdout is not None
        with proc.stdout:
            while chunk := proc.stdout.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    proc.kill()
                    break
                digest.update(chunk)
                out.write(chunk)
        code = proc.wait()
        if size > limit:
            out.close()
            target.unlink(missing_ok=True)
            return "", size, False
        if code != 0:
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
            raise InfrastructureError(f"git diff failed: {message}")
    return digest.hexdigest(), size, True


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


def apply_patch(tree: Path, patch: bytes | Path, *, fuzzy: bool = False) -> str | None:
    """Apply ``patch`` (bytes, or a file: a large diff is never read into memory) to a fresh
    checkout; return the method that worked, None if none did.

    Every rung leaves the result in the index too (``--3way`` implies ``--index``), which
    the gate's tamper check relies on. ``fuzzy`` adds the last rung: off by default, because
    a diff that needs fuzz may land somewhere other than where its author meant.
    """
    return try_apply_patch(tree, patch, fuzzy=fuzzy)[0]


def try_apply_patch(
    tree: Path, patch: bytes | Path, *, fuzzy: bool = False
) -> tuple[str | None, str]:
    """:func:`apply_patch`, also returning why it did not apply: git's message for the
    strictest rung (the one that names the first hunk or line that is wrong)."""
    if isinstance(patch, Path):
        if patch.stat().st_size == 0:
            return "empty", ""
        source, data = str(patch.resolve()), None
    elif not patch:
        return "empty", ""
    else:
        source, data = "-", patch
    ladder = (*APPLY_LADDER, FUZZY_APPLY) if fuzzy else APPLY_LADDER
    first_error = ""
    for method in ladder:
        try:
            git(*method, source, cwd=tree, input=data)
        except InfrastructureError as exc:
            first_error = first_error or str(exc)
            git("reset", "--hard", "--quiet", cwd=tree)
            continue
        return "git " + " ".join(method), ""
    return None, first_error

"""Git checkouts for attempts: a bare mirror per source repository, a fresh checkout per
attempt at the pinned base commit, and binary-safe diff capture against that commit.

We call the ``git`` binary rather than a library (pygit2/dulwich) on purpose: the adapter and
the gate use the same git, and ``git diff --binary`` / ``git apply`` are the reference
implementations of the patch format that the ledger stores.

A checkout at ``<path>`` is two repositories over one work tree, both borrowing the mirror's
objects read-only (``objects/info/alternates``; git never writes into an alternate):

* ``<path>/.git``: the adapter's own repository (HEAD and index at the base commit). Tools
  that need git (aider, Claude Code, Codex, tests that call git) use it; whatever the
  adapter writes there (config, hooks, objects, refs) stays there.
* ``<path>.git``, beside the tree: the executor's private repository. Every git command the
  executor or the runner runs on a tree names it explicitly (``--git-dir``/``--work-tree``),
  so nothing an adapter or a gate check planted in the tree's ``.git`` (``core.fsmonitor``,
  ``core.hooksPath``, filter, diff and merge drivers, ``include.path``, ``core.worktree``,
  a ``.git`` file pointing elsewhere) is ever read by the executor. The sandbox
  (:mod:`core.engine.sandbox`) hides it, with the mirror, from adapters and checks; where
  nothing hides it (a Kubernetes pod, ``--no-sandbox``) its config is put back and its
  hooks and info dirs removed before every use.

Every git command also runs hardened (:data:`GIT_ENV`, :data:`HARDENING`): no system or
global config, no hooks, no fsmonitor, no credential helpers or askpass programs, ssh as
``ssh``, replace refs ignored, only the file, git, http(s) and ssh transports (never ``ext::``
or ``fd::``), and ``--`` before every URL and path argument. Adapters never write to the
shared mirror: they see its object store read-only (sandbox) and their commits land in the
tree's own repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import InfrastructureError, MissingCommitError
from core.models import DiffSummary, FileChange, FileStatus

#: Transports git may use (``GIT_ALLOW_PROTOCOL`` overrides every ``protocol.*`` setting).
ALLOWED_PROTOCOLS = "file:git:http:https:ssh"

#: Our own git calls never read the user's or system config, never prompt, never run an
#: askpass program, and never replace objects through ``refs/replace``.
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_ATTR_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "",
    "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS,
    "GIT_NO_REPLACE_OBJECTS": "1",
    "GIT_PAGER": "cat",
    "GIT_EDITOR": ":",
    "GIT_AUTHOR_NAME": "orchestrator",
    "GIT_AUTHOR_EMAIL": "orchestrator@localhost",
    "GIT_COMMITTER_NAME": "orchestrator",
    "GIT_COMMITTER_EMAIL": "orchestrator@localhost",
    "LC_ALL": "C",
}

#: ``-c`` settings on every call: command-line config wins over any repository's config.
HARDENING = (
    "core.quotepath=off",
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.sshCommand=ssh",
    "core.pager=cat",
    "credential.helper=",
    # trees handed to the sandbox's user (executor as root) are not owned by the executor
    "safe.directory=*",
)


def git_argv(git_dir: Path | None = None, work_tree: Path | None = None) -> list[str]:
    """``git`` with the hardening settings, and the repository and tree named explicitly."""
    argv = ["git"]
    for setting in HARDENING:
        argv += ["-c", setting]
    if git_dir is not None:
        argv.append(f"--git-dir={git_dir}")
    if work_tree is not None:
        argv.append(f"--work-tree={work_tree}")
    return argv


def git(
    *args: str,
    cwd: Path | None = None,
    input: bytes | None = None,
    git_dir: Path | None = None,
    work_tree: Path | None = None,
    index_file: Path | None = None,
) -> bytes:
    """Run hardened git, return stdout; raise :class:`InfrastructureError` with git's stderr.

    ``git_dir``/``work_tree``: the repository and tree, named explicitly (no discovery);
    ``index_file``: another index than the repository's own.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV}
    if index_file is not None:
        env["GIT_INDEX_FILE"] = str(index_file)
    argv = git_argv(git_dir, work_tree)
    proc = subprocess.run(
        [*argv, *args],
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


#: The whole config of a private repository (rewritten before every use, see :func:`_pin`)
#: and of the tree's own repository.
PRIVATE_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"
PUBLIC_CONFIG = (
    "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
    "\tlogallrefupdates = true\n"
)


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
        git("clone", "--bare", "--quiet", "--", repo_url, str(tmp))
        os.replace(tmp, mirror)
    if not has_commit(mirror, commit):
        git("fetch", "--quiet", "--", repo_url, "+refs/heads/*:refs/heads/*", git_dir=mirror)
        if not has_commit(mirror, commit):
            raise MissingCommitError(
                f"commit {commit} is not in repository {repo_url} (all branches fetched)"
            )
    return mirror


def has_commit(repo: Path, commit: str) -> bool:
    try:
        git("cat-file", "-e", f"{commit}^{{commit}}", git_dir=repo)
    except InfrastructureError:
        return False
    return True


def private_git_dir(tree: Path) -> Path:
    """The executor's repository for ``tree``: beside it, never inside it."""
    return tree.with_name(tree.name + ".git")


def add_worktree(mirror: Path, path: Path, commit: str) -> Path:
    """A fresh checkout of ``commit`` at ``path`` (an old one there is replaced).

    Not a ``git worktree`` of the mirror (whose administrative files live in the mirror, where
    an adapter would write): two repositories borrowing the mirror's objects, see the module
    docstring.
    """
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise InfrastructureError(f"not a full commit id: {commit!r}")
    private = private_git_dir(path)
    if path.exists() or private.exists():
        remove_worktree(path)
    path.mkdir(parents=True)
    objects = object_dir(mirror)
    _new_repository(private, commit, objects, PRIVATE_CONFIG)
    git("read-tree", "--reset", "-u", "HEAD", cwd=path, git_dir=private, work_tree=path)
    public = path / ".git"
    _new_repository(public, commit, objects, PUBLIC_CONFIG)
    shutil.copyfile(private / "index", public / "index")
    return path


def _new_repository(gitdir: Path, commit: str, objects: Path, config: str) -> None:
    """An empty repository with a detached HEAD at ``commit`` and the mirror's objects.

    Written directly, in the layout of gitrepository-layout(5) (``HEAD``, ``config``,
    ``objects/`` with ``info/alternates``, ``refs/``), rather than by ``git init`` and ``git
    update-ref``: a checkout is made twice per attempt and each git process costs 2-3 ms.
    ``read-tree`` right after fails on a commit the objects do not hold.
    """
    # what git needs to see a repository (HEAD, objects/, refs/) and nothing more: every
    # directory costs a mkdir and an rmdir per checkout
    for sub in ("objects/info", "refs"):
        (gitdir / sub).mkdir(parents=True, exist_ok=True)
    (gitdir / "HEAD").write_text(f"{commit}\n", encoding="ascii")
    (gitdir / "config").write_text(config, encoding="ascii")
    (gitdir / "objects" / "info" / "alternates").write_text(f"{objects}\n", encoding="utf-8")


def checkout_commit(tree: Path) -> str:
    """The commit a checkout made by :func:`add_worktree` was made at (its private HEAD).

    Read from the private repository, which no untrusted process could have written before
    the first one runs in the tree; checked to be a full commit id all the same.
    """
    head = (private_git_dir(tree) / "HEAD").read_text(encoding="ascii").strip()
    if not re.fullmatch(r"[0-9a-f]{40}", head):
        raise InfrastructureError(f"{tree}: the private HEAD is not a commit id: {head!r}")
    return head


def object_dir(repo: Path) -> Path:
    """The object store of ``repo`` (a bare mirror, or any repository or worktree)."""
    if (repo / "objects").is_dir() and (repo / "HEAD").is_file():
        return (repo / "objects").resolve()
    common = git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=repo)
    return Path(common.decode().strip()).resolve() / "objects"


def remove_worktree(path: Path) -> None:
    """Remove a checkout made by :func:`add_worktree`: the tree and the private repository."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(private_git_dir(path), ignore_errors=True)




def _pin(private: Path) -> None:
    """Put the private repository's config back as we made it; drop any hooks or info dir.

    On the embedded backend the sandbox never shows the private repository to the adapter;
    in a Kubernetes pod the adapter shares the runner's user and could write it. Replaced,
    never written through (a planted symlink is removed, not followed).
    """
    config = private / "config"
    # a regular file holding exactly our config is what rewriting it would make: left as it
    # is (before every git command; the sandbox hides it from adapters anyway)
    if _regular_file_bytes(config, len(_PRIVATE_CONFIG) + 1) != _PRIVATE_CONFIG:
        config.unlink(missing_ok=True)
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(PRIVATE_CONFIG)
    for name in ("hooks", "info", "config.worktree", "commondir"):
        path = private / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
        else:
            path.unlink()


_PRIVATE_CONFIG = PRIVATE_CONFIG.encode()


def _regular_file_bytes(path: Path, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of ``path`` if it is a regular file (never through a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read(limit)


def shared_object_dirs(tree: Path) -> tuple[Path, ...]:
    """The object stores ``tree``'s repositories borrow from (to show them read-only)."""
    alternates = private_git_dir(tree) / "objects" / "info" / "alternates"
    try:
        lines = alternates.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return ()
    return tuple(Path(line) for line in lines if line.strip())


def tree_git(
    tree: Path, *args: str, input: bytes | None = None, index_file: Path | None = None
) -> bytes:
    """git on ``tree`` through the executor's private repository (never the tree's ``.git``)."""
    private = private_git_dir(tree)
    if not (private / "HEAD").is_file():
        raise InfrastructureError(f"{tree}: not a checkout made by the executor (no {private})")
    _pin(private)
    return git(*args, cwd=tree, git_dir=private, work_tree=tree, input=input, index_file=index_file)


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


def checkout_index(tree: Path) -> str | None:
    """A digest of ``tree``'s private index as :func:`add_worktree` left it (None: unreadable),
    for :func:`capture_diff` to see that nothing was staged since. Taken before any
    untrusted process runs in the tree."""
    try:
        fd = os.open(private_git_dir(tree) / "index", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def capture_diff(
    tree: Path,
    base_commit: str,
    max_bytes: int,
    spool: Path | None = None,
    *,
    checkout: str | None = None,
) -> CapturedDiff:
    """Diff of everything in ``tree`` (tracked, new, deleted, renamed, binary) vs the base.

    Untracked files are staged first (``.gitignore`` is honoured), so commits the adapter made
    itself and uncommitted edits are both captured relative to the pinned base commit,
    staged in the executor's private index: the tree's own ``.git`` is neither read nor
    captured. The diff streams into ``spool`` (default: ``diff.patch`` beside the tree) with
    its sha256 computed on the way; past ``max_bytes`` git is stopped and the spool removed,
    so an adapter cannot make us hold (or store) more than the hard limit.

    ``checkout``: :func:`checkout_index` of the tree, taken right after the checkout of
    ``base_commit``. When the private index is still that one (it holds the base commit's
    tree) and staging changed no entry (``git add --verbose`` names every path it adds or
    removes, and prints nothing else on stdout), the diff is empty: it is written without
    a second git process (2-4 ms for every attempt that changed nothing).
    """
    at_base = checkout is not None and checkout_index(tree) == checkout
    try:
        staged: bytes | None = tree_git(tree, "add", "--all", "--verbose")
    except InfrastructureError:
        staged = None
        # something git cannot stage (a nested repository without a commit, an unreadable
        # file): stage everything else rather than lose the attempt's whole diff
        with contextlib.suppress(InfrastructureError):
            tree_git(tree, "add", "--all", "--ignore-errors")
    common = ("diff", "--cached", "--find-renames", "--no-ext-diff", "--no-textconv")
    spool = spool or tree.parent / "diff.patch"
    if at_base and staged == b"":
        spool.parent.mkdir(parents=True, exist_ok=True)
        spool.write_bytes(b"")
        sha256, size, complete = hashlib.sha256().hexdigest(), 0, True
    else:
        sha256, size, complete = _spool(
            [*common, "--binary", "--full-index", base_commit], tree, spool, max_bytes
        )
    # every changed path (a mode change, an empty new file) has lines in the patch, so an
    # empty patch means no file changed: no second git process for the file list
    files = (
        _file_changes(tree_git(tree, *common, "--raw", "--numstat", "-z", base_commit))
        if size
        else []
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


def _spool(args: list[str], tree: Path, target: Path, limit: int) -> tuple[str, int, bool]:
    """Run ``git <args>`` on ``tree`` (through its private repository, like
    :func:`tree_git`) into ``target``: (sha256, bytes seen, whether all of it fit)."""
    private = private_git_dir(tree)
    _pin(private)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV}
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [*git_argv(private, tree), "-c", "core.quotepath=off", *args],
            cwd=tree,
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


def _file_changes(raw_numstat: bytes) -> list[FileChange]:
    """Parse ``--raw --numstat -z`` (one git process): first one raw record per changed
    path (``:<modes> <blobs> <status>`` then the path, or the old and new path of a rename
    or copy), then as many numstat records. A raw record's header always starts with ``:``
    and a numstat record never does, and paths are read by position, never sniffed."""
    fields = raw_numstat.decode("utf-8", errors="surrogateescape").split("\0")
    changes: list[tuple[str, str | None, FileStatus]] = []
    i = 0
    while i < len(fields) - 1 and fields[i].startswith(":"):
        code = fields[i].rsplit(" ", 1)[-1][:1]
        if code in ("R", "C"):
            changes.append((fields[i + 2], fields[i + 1], _STATUS[code]))
            i += 3
        else:
            changes.append((fields[i + 1], None, _STATUS.get(code, "modified")))
            i += 2
    stats = _numstat("\0".join(fields[i:]))
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


def _numstat(raw: str) -> dict[str, tuple[int | None, int | None]]:
    """Parse ``--numstat -z``: binary files show ``-`` counts; renames carry two paths."""
    fields = raw.split("\0")
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

    Every rung leaves the result in the (private) index too (``--3way`` implies
    ``--index``), which the gate's tamper check relies on; the tree's own repository gets a
    copy of that index, so a check that runs ``git diff --cached`` sees the patch staged.
    Only for a tree no untrusted process has run in yet. ``fuzzy`` adds the last rung: off
    by default, because a diff that needs fuzz may land somewhere other than where its
    author meant.
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
            tree_git(tree, *method, source, input=data)
        except InfrastructureError as exc:
            first_error = first_error or str(exc)
            tree_git(tree, "reset", "--hard", "--quiet")
            continue
        public = tree / ".git"
        if public.is_dir() and not public.is_symlink():
            shutil.copyfile(private_git_dir(tree) / "index", public / "index")
        return "git " + " ".join(method), ""
    return None, first_error

"""The repository that holds a run's integration branch, and the git plumbing it needs.

A bare clone of the tasks' repository under the work dir (``integration/<run>.git``), so a
read-only input (a bundle, a path we must not write to) never changes; with ``--push`` the
branch is pushed from here to the source URL. Everything happens without a work tree:

* a task's change becomes a commit on its own base (:meth:`IntegrationRepo.change_commit`:
  the ledger's patch applied to a temporary index, ``git apply --cached``);
* that commit is applied three-way onto the branch's head (:meth:`IntegrationRepo.apply`:
  ``git merge-tree --write-tree``, git's own merge machinery with rename detection, then
  ``git commit-tree`` with the head as the only parent): a cherry-pick whose merge base is the
  task's base commit, which the integration rules make an ancestor of the head.

Commits get fixed identities and dates (the task attempt's end), so rebuilding the same
change on the same head gives the same commit id: a replay after a crash reproduces the
branch instead of forking it. We call the ``git`` binary, as :mod:`core.engine.workspace`
does, for the same reasons (the reference implementation of the patch format we store).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from core.engine.workspace import GIT_ENV
from core.errors import InfrastructureError

#: Longest excerpt of conflict regions quoted back to an adapter.
MAX_CONFLICT_EXCERPT = 1500


@dataclass(frozen=True)
class MergeConflict:
    """A change that does not apply onto a head: which files, and what git said."""

    files: tuple[str, ...]
    messages: str
    excerpt: str = ""


@dataclass(frozen=True)
class _Result:
    code: int
    out: bytes
    err: str = field(default="")


class IntegrationRepo:
    def __init__(self, path: Path) -> None:
        self.path = path

    # ------------------------------------------------------------------ plumbing

    def _git(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        ok: Sequence[int] = (0,),
    ) -> _Result:
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV, **(env or {})}
        proc = subprocess.run(
            ["git", "-c", "core.quotepath=off", *args],
            cwd=self.path,
            input=input,
            env=full_env,
            capture_output=True,
            check=False,
        )
        err = proc.stderr.decode(errors="replace").strip()
        if proc.returncode not in ok:
            raise InfrastructureError(f"git {' '.join(args[:2])} failed in {self.path}: {err}")
        return _Result(proc.returncode, proc.stdout, err)

    def _text(self, *args: str) -> str:
        return self._git(*args).out.decode().strip()

    # ------------------------------------------------------------------ setup

    @classmethod
    def open(cls, path: Path, source: str) -> IntegrationRepo:
        """The repository at ``path``, cloned (bare) from ``source`` the first time."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            proc = subprocess.run(
                ["git", "clone", "--bare", "--quiet", source, str(tmp)],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV},
                capture_output=True,
                check=False,
            )
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                err = proc.stderr.decode(errors="replace").strip()
                raise InfrastructureError(f"cannot clone {source} for integration: {err}")
            os.replace(tmp, path)
        return cls(path)

    def fetch(self, source: str) -> None:
        """Bring in the source's newer commits (its branches under ``refs/source/``)."""
        self._git("fetch", "--quiet", source, "+refs/heads/*:refs/source/*")

    # ------------------------------------------------------------------ questions

    def has_commit(self, commit: str) -> bool:
        return self._git("cat-file", "-e", f"{commit}^{{commit}}", ok=(0, 1, 128)).code == 0

    def is_ancestor(self, ancestor: str, commit: str) -> bool:
        return self._git("merge-base", "--is-ancestor", ancestor, commit, ok=(0, 1)).code == 0

    def independent(self, commits: Sequence[str]) -> list[str]:
        """Those of ``commits`` that no other one of them descends from (the newest tips)."""
        return self._text("merge-base", "--independent", *commits).split()

    def branch_head(self, branch: str) -> str | None:
        found = self._git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", ok=(0, 1))
        return found.out.decode().strip() or None

    def diff(self, base: str, head: str) -> bytes:
        """What turns ``base`` into ``head``, in the ledger's patch format."""
        return self._git(
            "diff", "--find-renames", "--binary", "--full-index", "--no-ext-diff",
            "--no-textconv", base, head,
        ).out  # fmt: skip

    def subjects(self, since: str, head: str, paths: Sequence[str]) -> list[str]:
        """One line per commit in ``since..head`` that touched ``paths``."""
        if not paths:
            return []
        out = self._text("log", "--format=%h %s", f"{since}..{head}", "--", *paths)
        return out.splitlines()

    # ------------------------------------------------------------------ writing

    def change_commit(self, base: str, patch: bytes, message: str, when: datetime) -> str:
        """The change as a commit on its own base (the patch applies exactly there)."""
        with tempfile.TemporaryDirectory(prefix="integration-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self._git("read-tree", base, env=env)
            if patch:
                self._git("apply", "--cached", "--binary", "-", input=patch, env=env)
            tree = self._git("write-tree", env=env).out.decode().strip()
        return self.commit(tree, base, message, when)

    def commit(self, tree: str, parent: str, message: str, when: datetime) -> str:
        stamp = f"{int(when.timestamp())} +0000"
        env = {"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        out = self._git(
            "commit-tree", tree, "-p", parent, "-F", "-", input=message.encode(), env=env
        )
        return out.out.decode().strip()

    def apply(self, head: str, change: str, message: str, when: datetime) -> str | MergeConflict:
        """``change`` (a commit on an ancestor of ``head``) applied three-way onto ``head``:
        the new commit, or the conflict."""
        result = self._git("merge-tree", "--write-tree", "--name-only", head, change, ok=(0, 1))
        lines = result.out.decode(errors="replace").split("\n")
        tree = lines[0].strip()
        if result.code == 0:
            return self.commit(tree, head, message, when)
        files: list[str] = []
        rest = lines[1:]
        while rest and rest[0]:
            files.append(rest.pop(0))
        messages = "\n".join(line for line in rest if line.strip())
        unique = tuple(dict.fromkeys(files))
        return MergeConflict(unique, messages, self._excerpt(tree, unique))

    def _excerpt(self, tree: str, files: Sequence[str]) -> str:
        """The conflict regions (between the markers) of the merged tree, bounded."""
        parts: list[str] = []
        for path in files:
            shown = self._git("show", f"{tree}:{path}", ok=(0, 128))
            if shown.code != 0:
                continue
            text = shown.out.decode(errors="replace").splitlines()
            inside, region = False, []
            for line in text:
                if line.startswith("<<<<<<<"):
                    inside, region = True, [f"--- {path}", "<<<<<<< the integration branch"]
                    continue
                if inside and line.startswith(">>>>>>>"):
                    parts.append("\n".join([*region, ">>>>>>> this change"]))
                    inside = False
                    continue
                if inside:
                    region.append(line)
        excerpt = "\n".join(parts)
        if len(excerpt) > MAX_CONFLICT_EXCERPT:
            excerpt = excerpt[: MAX_CONFLICT_EXCERPT - 4] + "\n..."
        return excerpt

    def set_branch(self, branch: str, commit: str) -> None:
        self._git("update-ref", f"refs/heads/{branch}", commit)

    def push(self, url: str, branch: str, commit: str) -> None:
        """Publish ``commit`` as ``branch`` at ``url`` (fast-forward only: never rewrites)."""
        self._git("push", "--quiet", url, f"{commit}:refs/heads/{branch}")

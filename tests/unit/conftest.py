"""Shared fixtures for the engine unit tests: real git repositories made with the real ``git``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import pytest

#: Tests never read the user's or the system's git configuration.
TEST_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "LC_ALL": "C",
}

FileContent = str | bytes | None


def run_git(cwd: Path, *args: str, input: bytes | None = None) -> bytes:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **TEST_GIT_ENV}
    proc = subprocess.run(
        ["git", "-c", "core.quotepath=off", *args],
        cwd=cwd,
        env=env,
        input=input,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def write_files(root: Path, files: Mapping[str, FileContent]) -> None:
    """Write ``files`` under ``root``; ``None`` deletes the file."""
    for rel, content in files.items():
        path = root / rel
        if content is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_bytes(content.encode("utf-8"))
        else:
            path.write_bytes(content)


@dataclass
class GitRepo:
    path: Path
    base: str  # the first commit

    def git(self, *args: str, input: bytes | None = None) -> bytes:
        return run_git(self.path, *args, input=input)

    def commit(self, files: Mapping[str, FileContent], message: str = "change") -> str:
        write_files(self.path, files)
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").decode().strip()


GitRepoFactory = Callable[..., GitRepo]


@pytest.fixture
def git_repo(tmp_path: Path) -> GitRepoFactory:
    """Factory: ``git_repo({"a.txt": "x\\n"})`` -> a repository with one commit of those files."""
    names = count()

    def make(files: Mapping[str, FileContent] | None = None, name: str | None = None) -> GitRepo:
        path = tmp_path / (name or f"repo{next(names)}")
        path.mkdir(parents=True)
        run_git(path, "init", "--quiet", "--initial-branch=main")
        write_files(path, files if files is not None else {"README.md": "hello\n"})
        run_git(path, "add", "--all")
        run_git(path, "commit", "--quiet", "--allow-empty", "-m", "base")
        return GitRepo(path=path, base=run_git(path, "rev-parse", "HEAD").decode().strip())

    return make


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (outside ``.git``) with its exact bytes."""
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".git" or not path.is_file():
            continue
        out[rel.as_posix()] = path.read_bytes()
    return out


@pytest.fixture
def worktree_checkout(tmp_path: Path) -> Callable[[Path, str], Callable[[], object]]:
    """``worktree_checkout(repo, commit)`` -> a ``checkout`` callable for ``run_gate``.

    Each call makes a fresh, real ``git worktree`` of ``commit`` and removes it afterwards.
    """
    from core.engine.workspace import add_worktree, remove_worktree

    numbers = count()

    def factory(repo: Path, commit: str) -> Callable[[], object]:
        @contextmanager
        def checkout() -> Iterator[Path]:
            path = tmp_path / "checkouts" / f"wt{next(numbers)}"
            tree = add_worktree(repo, path, commit)
            try:
                yield tree
            finally:
                remove_worktree(tree)

        return checkout

    return factory


class RecordingSink:
    """A LineSink that keeps every (stream, line) it receives, in order."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def line(self, stream: str, text: str) -> None:
        self.lines.append((stream, text))

    def texts(self, stream: str | None = None) -> list[str]:
        return [t for s, t in self.lines if stream is None or s == stream]


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def make_sink() -> type[RecordingSink]:
    """The RecordingSink class, for tests that need more than one sink."""
    return RecordingSink


class GitTools:
    """Helpers exposed as a fixture (``tests/unit`` is not a package, so no imports)."""

    run_git = staticmethod(run_git)
    write_files = staticmethod(write_files)
    tree_snapshot = staticmethod(tree_snapshot)


@pytest.fixture
def gt() -> type[GitTools]:
    return GitTools


@pytest.fixture(scope="session")
def sandbox_tools() -> Any:
    """bubblewrap, checked to work here: a test dependency (`make test-fast` installs it)."""
    from core.engine.sandbox import find_tools, probe

    tools = find_tools()
    assert not isinstance(tools, str), f"{tools}: run `hack/sandbox/install` (apt bubblewrap)"
    problem = probe(tools)
    assert problem is None, problem
    return tools


@pytest.fixture
def make_sandbox(sandbox_tools: Any) -> Callable[..., Any]:
    """``make_sandbox(workdir)`` -> the embedded backend's real sandbox for that work dir."""
    from core.engine.sandbox import Bubblewrap

    def make(workdir: Path | None = None, **kw: Any) -> Any:
        return Bubblewrap(sandbox_tools, workdir=workdir, **kw)

    return make


class GitCalls:
    """The git processes started while the fixture is active, through a logging ``git`` on
    ``PATH`` that runs the real one (the executor finds git on ``PATH``)."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def commands(self) -> list[str]:
        """Each process's git command (``diff``, ``read-tree``, ...), options before it skipped."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            args, i = line.split("\0")[:-1], 0
            while i < len(args) and args[i].startswith("-"):
                i += 2 if args[i] == "-c" else 1
            out.append(args[i] if i < len(args) else "")
        return out

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


@pytest.fixture
def git_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GitCalls:
    import shutil

    real = shutil.which("git")
    assert real is not None
    shim_dir = tmp_path / "git-shim"
    shim_dir.mkdir()
    log = tmp_path / "git-calls.log"
    shim = shim_dir / "git"
    shim.write_text(
        f"#!/bin/sh\nprintf '%s\\0' \"$@\" >> '{log}'; echo >> '{log}'\nexec {real} \"$@\"\n"
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}:{os.environ['PATH']}")
    return GitCalls(log)

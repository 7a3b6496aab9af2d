"""The embedded sandbox: each adapter process and gate check in namespaces of its own.

Why: on the embedded backend an adapter (an AI CLI doing what a model tells it) and the test
gate's checks (code from the patch under test) run on the executor's machine. Unconfined,
they can write anywhere the executor can, read and rewrite the work dir's database, ledger
and logs, and change the shared git mirrors that later attempts start from.

What confines them: bubblewrap (``bwrap``, Debian package ``bubblewrap``, the sandbox tool
Flatpak is built on), used as a maintained tool rather than hand-written namespace code.
Every sandboxed process gets:

* a mount namespace of its own: the host's file system read-only (``/`` bound read-only,
  recursively), fresh ``/dev`` and ``/proc``, private ``/tmp``, ``/dev/shm`` and ``/run``;
  in the work dir only entries other than the executor's state are shown, read-only
  (hidden: ``.state``, ``.ledger``, ``logs``, ``manual``, ``.work`` with every mirror and
  every other attempt's tree, the SQLite database wherever it is); the paths the process may
  write (its tree and its HOME or scratch dir) are bound back read-write, and what it must
  read there (the prompt file, the mirror's object store that its tree borrows objects from)
  read-only;
* PID, IPC and UTS namespaces of its own: it sees and can signal only its own processes (not
  the executor's environment in ``/proc/<pid>/environ``); when it ends, the kernel ends
  whatever it left behind, even processes that left its process group;
* a network namespace with only a loopback interface when the adapter says
  ``sandbox: {network: false}`` (``gate_network`` for its gate checks);
* no capabilities and ``no_new_privs``. When the executor runs as root the process runs as
  ``nobody`` (uid/gid 65534) and its writable paths are handed to that user: untrusted code
  never runs as root. (Root without capabilities still owns every root-owned file, may write
  ``/proc/sys``, and is trusted by UNIX sockets that check for uid 0.) As another user the
  process keeps that user's uid inside a user namespace that cannot create further ones.

Not protected: whatever the executor's user can read outside the hidden paths stays
readable (a non-root user's ``~/.ssh``, for instance); with the network on, the host's
network namespace is shared (any address, services on loopback, abstract UNIX sockets); no
seccomp filter beyond bubblewrap's own, so the kernel's attack surface is the usual one; no
CPU, memory or disk limits.

Why not Landlock (available here, ABI 7): it restricts access rights inside the current
mount namespace but cannot give a private ``/tmp``, cannot hide one directory without
enumerating every sibling on the path to it, confines the network only for TCP, and does not
separate PIDs; its Python bindings are thin wrappers around the syscalls. bubblewrap does all
of that from a Debian package, as root without user namespaces and as a user with them.

Signals: the executor ends an attempt with ``killpg`` (SIGTERM, grace, SIGKILL), and the
group includes bubblewrap's own monitor process, which would die at SIGTERM at once and cut
the adapter's grace period short. So bubblewrap starts with SIGTERM ignored
(``env --ignore-signal=TERM``, inherited across exec) and the command gets the default back
right before it starts (``env --default-signal=TERM``). bubblewrap reports a command killed
by signal N as exit status 128+N; :meth:`Bubblewrap.status` maps that back to the signal.
There is no ``--new-session``: the group kill depends on the command staying in our process
group, and the command has no controlling terminal to inject input into (its session is new).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.errors import OrchestratorError, UnrecoverableError
from core.models import IsolationLevel

#: The uid/gid sandboxed processes run as when the executor is root.
NOBODY = 65534
#: Entries of the work dir that a sandboxed process never sees: the executor's state, logs,
#: ledger, the human's patches and ``.work`` (mirrors, every attempt's tree and private git
#: dir). The database is hidden by path (it may live elsewhere).
HIDDEN_WORKDIR_ENTRIES = frozenset({".state", ".ledger", "logs", "manual", ".work"})
#: Directories that are a fresh, empty tmpfs in the sandbox.
_PRIVATE = ("/tmp", "/run", "/dev/shm")
#: Environment variable naming the bwrap binary (default: ``bwrap`` on PATH).
BWRAP_ENV = "ORCHESTRATOR_BWRAP"
NO_SANDBOX_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`), or pass --no-sandbox "
    "to run adapters and gate checks unconfined, with every right of the executor's user"
)


class SandboxUnavailable(UnrecoverableError):
    """No working sandbox on this machine; ``execute`` refuses unless told ``--no-sandbox``."""


class LaunchError(OrchestratorError):
    """A sandboxed command could not be prepared (its program or a bound path is missing)."""


@dataclass(frozen=True)
class Confinement:
    """What one sandboxed process may touch besides the read-only rest of the system."""

    #: Bound read-write (and, when the executor is root, handed to the sandbox's user).
    writable: tuple[Path, ...]
    #: Bound read-only where hiding would otherwise cover them (the prompt, object stores).
    readable: tuple[Path, ...] = ()
    network: bool = True


class Sandbox(Protocol):
    """Turns a command into one that runs confined; see :class:`Bubblewrap`."""

    def isolation(self, network: bool) -> IsolationLevel: ...

    def command(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        confinement: Confinement,
        status_fd: int | None = None,
    ) -> list[str]: ...

    def status(self, returncode: int) -> tuple[int | None, int | None]:
        """(exit code, signal) of the command from the launched process's return code."""
        ...

    def never_started(self, returncode: int, status: bytes) -> bool:
        """Whether the sandbox failed before the command ran, given what it wrote to
        ``status_fd``: such a launch may simply be tried again."""
        ...


def _plain_status(returncode: int) -> tuple[int | None, int | None]:
    return (returncode, None) if returncode >= 0 else (None, -returncode)


class Unconfined:
    """``--no-sandbox``: commands run as they are, with every right of the executor."""

    def isolation(self, network: bool) -> IsolationLevel:
        return IsolationLevel.NONE

    def command(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        confinement: Confinement,
        status_fd: int | None = None,
    ) -> list[str]:
        return list(argv)

    def status(self, returncode: int) -> tuple[int | None, int | None]:
        return _plain_status(returncode)

    def never_started(self, returncode: int, status: bytes) -> bool:
        return False


@dataclass(frozen=True)
class Tools:
    """The binaries the sandbox is built from, and what this bubblewrap supports."""

    bwrap: str
    env: str
    setpriv: str | None
    #: ``--disable-userns`` (bubblewrap 0.8+): no user namespaces inside the sandbox.
    disable_userns: bool = False


@dataclass
class Bubblewrap:
    """The sandbox on bubblewrap; see the module docstring for what it hides and allows.

    ``workdir``: the executor's work dir, whose state is hidden; ``hidden``: more paths to
    hide wherever they are (the SQLite database and its journal files). ``run_as``: the
    uid/gid the command runs as when bubblewrap runs as root (None: keep the caller's uid,
    in a user namespace). ``exposed``: what stays reachable for ``run_as`` (see
    :meth:`_needed`): by default the executor's own Python installation and import path.
    """

    tools: Tools
    workdir: Path | None = None
    hidden: tuple[Path, ...] = ()
    run_as: int | None = field(default_factory=lambda: NOBODY if os.geteuid() == 0 else None)
    exposed: tuple[Path, ...] = field(default_factory=lambda: executor_installation())
    _handed_over: set[tuple[str, int, int]] = field(default_factory=set, repr=False)
    _needed_for: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def isolation(self, network: bool) -> IsolationLevel:
        return IsolationLevel.SANDBOX if network else IsolationLevel.SANDBOX_NO_NETWORK

    def status(self, returncode: int) -> tuple[int | None, int | None]:
        if 128 < returncode <= 128 + signal.NSIG - 1:
            return None, returncode - 128
        return _plain_status(returncode)

    def never_started(self, returncode: int, status: bytes) -> bool:
        # bubblewrap reports {"exit-code": N} on its status fd once the command has run; a
        # failed setup exits 1 without it. The mount tree it copies is live: a mount that
        # vanishes meanwhile (a pod's network namespace under /run/netns on a node) fails the
        # setup ("Can't bind mount ... No such file or directory") for no fault of the command.
        return returncode == 1 and b'"exit-code"' not in status

    def command(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        confinement: Confinement,
        status_fd: int | None = None,
    ) -> list[str]:
        """The bubblewrap command line for ``argv``; prepares the writable paths.

        ``status_fd``: where bubblewrap writes its JSON status (see :meth:`never_started`).
        Raises :class:`LaunchError` when the program is not found (on the PATH of ``env``)
        or a path to bind does not exist.
        """
        program = _resolve_program(argv[0], env.get("PATH", os.defpath))
        for path in (*confinement.writable, *confinement.readable, cwd):
            if not os.path.lexists(path):
                raise LaunchError(f"sandbox: {path}: no such file or directory")
        if self.run_as is not None:
            for path in confinement.writable:
                self._hand_over(Path(path))
        t = self.tools
        out = [t.env, "--ignore-signal=TERM", t.bwrap]
        out += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        out += ["--hostname", "sandbox"]
        if status_fd is not None:
            out += ["--json-status-fd", str(status_fd)]
        if not confinement.network:
            out.append("--unshare-net")
        if self.run_as is None:
            out += ["--unshare-user", "--cap-drop", "ALL"]
            if t.disable_userns:
                out.append("--disable-userns")
        m = _Mounts()
        m.bind("/", "/", readonly=True)
        m.add("--dev", "/dev")
        m.add("--proc", "/proc")
        m.tmpfs("/dev/shm", perms="1777")
        m.tmpfs("/tmp", perms="1777")
        m.tmpfs("/run")
        resolver = os.path.realpath("/etc/resolv.conf")
        if resolver.startswith("/run/") and os.path.exists(resolver):
            # systemd-resolved's stub file: keep name resolution working
            m.bind(resolver, resolver, readonly=True)
        covers = self._closed_on_the_way(program, cwd, confinement) if self.run_as else []
        for closed in covers:
            m.tmpfs(closed)
        # what the process needs and would not see: below a tmpfs of the sandbox's own
        reach = [p for p in self._needed(program) if _under(p, (*_PRIVATE, *covers))]
        self._hide(m)
        for needed in reach:
            m.bind(needed, needed, readonly=True)
        for path in confinement.readable:
            real = os.path.realpath(path)
            m.bind(real, real, readonly=True)
        for path in confinement.writable:
            real = os.path.realpath(path)
            m.bind(real, real, readonly=False)
        self._hide_paths(m, [*reach, *confinement.readable, *confinement.writable])
        out += [*m.args, "--chdir", os.path.realpath(cwd), "--"]
        if self.run_as is not None:
            assert t.setpriv is not None
            ident = str(self.run_as)
            out += [t.setpriv, f"--reuid={ident}", f"--regid={ident}", "--clear-groups"]
            out += ["--inh-caps=-all", "--bounding-set=-all", "--"]
        # `env` takes a first argument containing "=" for an assignment: the program is an
        # absolute path here, so only a directory name with "=" in it could trip it.
        return [*out, t.env, "--default-signal=TERM", "--", program, *argv[1:]]

    def _needed(self, program: str) -> list[str]:
        """What the process must reach besides the bound paths (outermost first).

        The program's installation (the directory above its ``bin/``, else its own
        directory, else the program alone) and :attr:`exposed` (the executor's Python, so
        ``{python}`` works); never anything in, or above, the work dir or a hidden path. They
        are bound read-only where the sandbox would not show them: below its private
        ``/tmp`` or ``/run``, or (for ``run_as``) below a directory closed to others.
        Remembered per program (an installation does not move during a run).
        """
        if program not in self._needed_for:
            self._needed_for[program] = self._find_needed(program)
        return self._needed_for[program]

    def _find_needed(self, program: str) -> list[str]:
        private = [*self._workdir(), *(os.path.realpath(p) for p in self.hidden)]

        def showable(path: str) -> bool:
            # neither in the work dir (its own rules decide there) nor above it or a hidden
            # path (binding it would show them again)
            return not _under(path, private) and not any(_under(p, (path,)) for p in private)

        real = os.path.realpath(program)
        install = os.path.dirname(real)
        if os.path.basename(install) == "bin":
            install = os.path.dirname(install)
        candidates = [c for c in (install, os.path.dirname(real), real) if showable(c)]
        paths = {p for p in (*candidates[:1], *map(os.path.realpath, self.exposed)) if showable(p)}
        paths = {p for p in paths if os.path.exists(p)}
        return sorted(p for p in paths if not _under(p, tuple(paths - {p})))

    def _closed_on_the_way(self, program: str, cwd: Path, confinement: Confinement) -> list[str]:
        """Directories closed to others (``/root``, ``drwx------``) above what ``run_as``
        must reach: each is covered with an empty tmpfs in the sandbox (its other contents
        stay invisible) and the needed paths below it are bound back read-only."""
        bound = (*confinement.writable, *confinement.readable, cwd)
        covers: set[str] = set()
        for path in (*self._needed(program), *(os.path.realpath(p) for p in bound)):
            closed = _closed_ancestor(path)
            if closed is None or _under(closed, (*_PRIVATE, *self._workdir())):
                continue  # reachable, or under one of the sandbox's own tmpfs already
            covers.add(closed)
        return sorted(c for c in covers if not _under(c, tuple(covers - {c})))

    def _workdir(self) -> list[str]:
        return [os.path.realpath(self.workdir)] if self.workdir is not None else []

    def _hide(self, m: _Mounts) -> None:
        """Cover the work dir with an empty tmpfs and show its other entries read-only."""
        hidden = {os.path.realpath(p) for p in self.hidden}
        workdir = self._workdir()
        for root in workdir:
            m.tmpfs(root)
            with os.scandir(root) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    path = os.path.join(root, entry.name)
                    if entry.name in HIDDEN_WORKDIR_ENTRIES or path in hidden:
                        continue
                    if entry.is_symlink():
                        # recreated, never followed on the host: what it points to is resolved
                        # inside the sandbox, where hidden stays hidden
                        m.add("--symlink", os.readlink(path), path)
                    else:
                        m.bind(path, path, readonly=True)

    def _hide_paths(self, m: _Mounts, bound: Sequence[str | Path]) -> None:
        """Cover :attr:`hidden` paths the sandbox would show: outside its private dirs and the
        work dir, or below anything bound in (last, so no bind can show them again)."""
        workdir = self._workdir()
        shown = [os.path.realpath(p) for p in bound]
        for path in sorted({os.path.realpath(p) for p in self.hidden}):
            if not os.path.lexists(path):
                continue
            covered = _under(path, (*_PRIVATE, *workdir))
            if covered and not _under(path, shown):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                m.tmpfs(path)
            else:
                m.bind(os.devnull, path, readonly=True)

    def _hand_over(self, path: Path) -> None:
        """Give ``path`` (recursively) to the sandbox's user, once per directory.

        Runs before any sandboxed process could touch the path (the first launch that binds
        it), so the walk cannot be raced; symlinks are changed, never followed.
        """
        assert self.run_as is not None
        st = os.lstat(path)
        key = (os.path.realpath(path), st.st_dev, st.st_ino)
        if key in self._handed_over:
            return
        ident = self.run_as
        os.lchown(path, ident, ident)
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.lchown(os.path.join(root, name), ident, ident)
        self._handed_over.add(key)


class _Mounts:
    """bubblewrap's mount operations, in order, with every missing parent made 0755.

    bubblewrap creates the parents of a mount point with mode 0700 (owned by root): the
    sandbox's user (``nobody`` when the executor is root) could not pass them.
    """

    def __init__(self) -> None:
        self.args: list[str] = []
        self._dirs: set[str] = {"/"}

    def add(self, option: str, *operands: str) -> None:
        if operands:
            self._parents(operands[-1])
        self.args += [option, *operands]

    def tmpfs(self, dest: str, *, perms: str | None = None) -> None:
        self._parents(dest)
        self._dirs = {d for d in self._dirs if not _under(d, (dest,))} | {dest}
        self.args += [*(["--perms", perms] if perms else []), "--tmpfs", dest]

    def bind(self, source: str, dest: str, *, readonly: bool) -> None:
        self.add("--ro-bind" if readonly else "--bind", source, dest)

    def _parents(self, dest: str) -> None:
        parts = Path(dest).parts
        for depth in range(2, len(parts)):
            parent = os.path.join(*parts[:depth])
            if parent not in self._dirs:
                self._dirs.add(parent)
                self.args += ["--perms", "0755", "--dir", parent]


def executor_installation() -> tuple[Path, ...]:
    """The executor's interpreter, its installation and import path (read-only binds)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {p for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p)}
    return tuple(Path(p) for p in sorted(paths))


def _closed_ancestor(path: str) -> str | None:
    """The outermost directory above ``path`` that others may not traverse, if any."""
    parts = Path(path).parts
    for depth in range(1, len(parts)):
        ancestor = os.path.join(*parts[:depth]) if depth > 1 else parts[0]
        try:
            mode = os.stat(ancestor).st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return ancestor
    return None


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _resolve_program(program: str, search_path: str) -> str:
    """An absolute path for ``program`` (as exec would find it), or :class:`LaunchError`."""
    if os.sep in program:
        path = os.path.abspath(program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    else:
        found = shutil.which(program, path=search_path)
        if found is not None:
            return os.path.abspath(found)
    raise LaunchError(f"{program}: No such file or directory")


# --------------------------------------------------------------------------- choosing one


def find_tools(environ: Mapping[str, str] = os.environ) -> Tools | str:
    """The sandbox's binaries, or why they are missing."""
    search_path = environ.get("PATH", os.defpath)
    bwrap = environ.get(BWRAP_ENV) or shutil.which("bwrap", path=search_path)
    if not bwrap:
        return "bubblewrap (bwrap) was not found on PATH"
    if not (os.path.isfile(bwrap) and os.access(bwrap, os.X_OK)):
        return f"{BWRAP_ENV}={bwrap} is not an executable file"
    env = shutil.which("env", path=search_path) or "/usr/bin/env"
    setpriv = shutil.which("setpriv", path=search_path)
    try:
        helptext = subprocess.run(
            [bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{bwrap} --help failed: {exc}"
    return Tools(bwrap, env, setpriv, disable_userns="--disable-userns" in helptext)


def probe(tools: Tools, *, runner: ProbeRunner | None = None) -> str | None:
    """Start one real sandboxed ``true``, as every attempt would; None, or why it failed."""
    sandbox = Bubblewrap(tools)
    if sandbox.run_as is not None and tools.setpriv is None:
        return "setpriv (util-linux) was not found on PATH; it drops root inside the sandbox"
    with tempfile.TemporaryDirectory(prefix="orchestrator-sandbox-probe-") as scratch:
        path = Path(scratch)
        try:
            argv = sandbox.command(
                ["true"],
                cwd=path,
                env={"PATH": os.environ.get("PATH", os.defpath)},
                confinement=Confinement((path,), network=False),
            )
        except LaunchError as exc:
            return str(exc)
        return (runner or _run_probe)(argv)


class ProbeRunner(Protocol):
    def __call__(self, argv: Sequence[str]) -> str | None: ...


def _run_probe(argv: Sequence[str]) -> str | None:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[2]}: {exc}"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit status {proc.returncode}"
    return f"a test sandbox did not start: {detail}"


def select_sandbox(
    enabled: bool,
    *,
    workdir: Path,
    hidden: Iterable[Path] = (),
    environ: Mapping[str, str] = os.environ,
    runner: ProbeRunner | None = None,
) -> Sandbox:
    """The embedded backend's sandbox: bubblewrap if it works here; :class:`Unconfined` only
    when ``enabled`` is False (``--no-sandbox``); else :class:`SandboxUnavailable`."""
    if not enabled:
        return Unconfined()
    tools = find_tools(environ)
    if isinstance(tools, str):
        problem: str | None = tools
    else:
        problem = probe(tools, runner=runner)
    if problem is not None or isinstance(tools, str):
        raise SandboxUnavailable(
            f"no sandbox for adapters and gate checks: {problem}\n  fix: {NO_SANDBOX_HINT}"
        )
    return Bubblewrap(tools, workdir=workdir, hidden=tuple(hidden))

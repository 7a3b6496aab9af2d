"""Run one command as its own process group, under a deadline, streaming its output.

Why not ``subprocess.run(timeout=...)``: it kills only the direct child (grandchildren keep
running and keep the pipes open), and it buffers output until the end. Here the child starts
a new session, so the whole group is signalled (SIGTERM, a grace period, then SIGKILL); output
is read with ``selectors`` and handed over line by line as it arrives; process exit is
observed through a pidfd, so the loop sleeps in ``select`` instead of polling.

With a ``sandbox`` (:mod:`core.engine.sandbox`) the command is started inside it; the group
kill works unchanged through it (bubblewrap stays in the group and passes SIGTERM's grace
period on to the command; with its PID namespace nothing the command started outlives it).
A sandbox that fails to set up before the command runs (bubblewrap copies a live mount tree:
on a Kubernetes node, mounts come and go) is launched again, up to
:data:`SANDBOX_SETUP_TRIES` times, then reported as a start error (infrastructure).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from core.engine.sandbox import Confinement, LaunchError, Sandbox

MAX_LINE_BYTES = 64 * 1024
#: After the leader exits, how long to keep reading output that is still in flight.
DRAIN_SECONDS = 2.0
TAIL_LINES = 40
#: Launches of a sandboxed command whose sandbox fails to set up before the command runs.
SANDBOX_SETUP_TRIES = 3


class LineSink(Protocol):
    """Receives output as it arrives; ``stream`` is ``stdout`` or ``stderr``."""

    def line(self, stream: str, text: str) -> None: ...


@dataclass(frozen=True)
class ProcessResult:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    cancelled: bool
    start_error: str | None
    duration_seconds: float
    tail: str

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.cancelled or self.start_error)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_process_group(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    sink: LineSink,
    stdin_file: Path | None = None,
    grace_seconds: float = 5.0,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sandbox: Sandbox | None = None,
    confinement: Confinement | None = None,
) -> ProcessResult:
    """Run ``argv`` (never through a shell) and return how it ended.

    ``on_start`` receives the process-group id as soon as it exists (for crash recovery).
    Setting ``stop`` ends the group like a timeout does, but reports ``cancelled``.
    ``sandbox``: run it confined to ``confinement`` (default: only ``cwd`` writable).
    """
    started = clock()
    run = _Run(cwd, env, stdin_file, started + timeout, sink, grace_seconds, stop, on_start, clock)
    if sandbox is None:
        return _follow(run, list(argv), started, _status)[0]
    tries = SANDBOX_SETUP_TRIES
    for launch in range(1, tries + 1):
        with tempfile.TemporaryFile() as status:
            try:
                command = sandbox.command(
                    argv,
                    cwd=cwd,
                    env=env,
                    confinement=confinement or Confinement((cwd,)),
                    status_fd=status.fileno(),
                )
            except (LaunchError, OSError) as exc:
                return ProcessResult(None, None, False, False, str(exc), 0.0, "")
            result, code = _follow(run, command, started, sandbox.status, (status.fileno(),))
            status.seek(0)
            if result.timed_out or result.cancelled or result.start_error:
                return result
            if not sandbox.never_started(code, status.read()):
                return result
        sink.line(
            "stderr", f"orchestrator: the sandbox failed to set up (launch {launch} of {tries})"
        )
    return replace(
        result, exit_code=None, start_error=f"the sandbox failed to set up {tries} times"
    )


@dataclass(frozen=True)
class _Run:
    """One command's launch settings (the same for each launch of it)."""

    cwd: Path
    env: Mapping[str, str]
    stdin_file: Path | None
    deadline: float
    sink: LineSink
    grace_seconds: float
    stop: threading.Event | None
    on_start: Callable[[int], None] | None
    clock: Callable[[], float]


def _follow(
    run: _Run,
    argv: list[str],
    started: float,
    decode: Callable[[int], tuple[int | None, int | None]],
    pass_fds: tuple[int, ...] = (),
) -> tuple[ProcessResult, int]:
    """Start ``argv`` and follow it to its end: the result and the raw return code (-1 when
    it could not start)."""
    cwd, env, sink, stop, on_start, clock = (
        run.cwd,
        run.env,
        run.sink,
        run.stop,
        run.on_start,
        run.clock,
    )
    stdin_file, grace_seconds = run.stdin_file, run.grace_seconds
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        with open(stdin_file, "rb") if stdin_file else open(os.devnull, "rb") as stdin:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=dict(env),
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                pass_fds=pass_fds,
            )
    except OSError as exc:
        problem = f"{argv[0]}: {exc.strerror or exc}"
        return ProcessResult(None, None, False, False, problem, 0.0, ""), -1
    pgid = proc.pid
    if on_start:
        on_start(pgid)
    assert proc.stdout is not None and proc.stderr is not None

    sel = selectors.DefaultSelector()
    buffers: dict[int, bytearray] = {}
    names: dict[int, str] = {}
    for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream.fileno(), selectors.EVENT_READ, "pipe")
        buffers[stream.fileno()] = bytearray()
        names[stream.fileno()] = name
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ, "exit")

    def emit(fd: int, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        tail.append(text)
        sink.line(names[fd], text)

    deadline = run.deadline
    kill_at: float | None = None
    drain_until: float | None = None
    timed_out = cancelled = False
    open_pipes = 2
    while open_pipes or proc.poll() is None:
        now = clock()
        if kill_at is None and (now >= deadline or (stop is not None and stop.is_set())):
            timed_out, cancelled = now >= deadline, not now >= deadline
            _killpg(pgid, signal.SIGTERM)
            kill_at = now + grace_seconds
        if kill_at is not None and now >= kill_at:
            _killpg(pgid, signal.SIGKILL)
            kill_at = float("inf")
        if proc.poll() is not None:
            # The leader is gone; anything left in its group is an orphan: end it, then drain.
            _killpg(pgid, signal.SIGKILL)
            if drain_until is None:
                drain_until = now + DRAIN_SECONDS
            elif now >= drain_until:
                # A process that left the group (setsid) still holds the pipe: stop reading.
                sink.line("stderr", "orchestrator: output pipe held open after exit; closed")
                break
        timer = deadline if kill_at is None else kill_at
        if drain_until is not None:
            timer = min(timer, drain_until)
        wait = min(timer - now, 0.2 if (pidfd is None or stop is not None) else 60.0)
        for key, _ in sel.select(timeout=max(wait, 0.0)):
            if key.data == "exit":
                sel.unregister(key.fd)
                continue
            fd = int(key.fd)
            chunk = os.read(fd, 65536)
            buf = buffers[fd]
            if not chunk:
                sel.unregister(fd)
                open_pipes -= 1
                if buf:
                    emit(fd, bytes(buf))
                    buf.clear()
                continue
            buf += chunk
            # Split a line only once it is known to be longer than the cap (a line of exactly
            # MAX_LINE_BYTES whose newline arrives in the next read is one line), and never
            # inside a UTF-8 character.
            while (nl := buf.find(b"\n")) >= 0 or len(buf) > MAX_LINE_BYTES:
                if 0 <= nl <= MAX_LINE_BYTES:
                    emit(fd, bytes(buf[:nl]))
                    del buf[: nl + 1]
                else:
                    cut = _char_boundary(buf, MAX_LINE_BYTES)
                    emit(fd, bytes(buf[:cut]))
                    del buf[:cut]
    sel.close()
    if pidfd is not None:
        os.close(pidfd)
    proc.stdout.close()
    proc.stderr.close()
    code = proc.wait()
    exit_code, sig = decode(code)
    result = ProcessResult(
        exit_code=exit_code,
        signal=sig,
        timed_out=timed_out,
        cancelled=cancelled,
        start_error=None,
        duration_seconds=clock() - started,
        tail="\n".join(tail),
    )
    return result, code


def _status(code: int) -> tuple[int | None, int | None]:
    return (code, None) if code >= 0 else (None, -code)


def _char_boundary(buf: bytearray, limit: int) -> int:
    """``limit``, moved back (at most 3 bytes) so that ``buf[cut]`` starts a UTF-8 character."""
    cut = limit
    while cut > limit - 3 and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_group(pgid: int, grace_seconds: float = 2.0) -> None:
    """SIGTERM a group left by a crashed executor, then SIGKILL what remains."""
    _killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace_seconds
    while process_group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.05)
    _killpg(pgid, signal.SIGKILL)

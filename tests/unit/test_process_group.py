"""core.engine.process_group: streaming, timeouts, whole-group kills, cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from core.engine.process_group import (
    MAX_LINE_BYTES,
    TAIL_LINES,
    process_group_alive,
    run_process_group,
    terminate_group,
)

PY = sys.executable
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def py(code: str) -> list[str]:
    return [PY, "-u", "-c", textwrap.dedent(code)]


def pid_dead(pid: int, within: float = 3.0) -> bool:
    """True once ``pid`` no longer exists or is only a zombie (dead, not yet reaped)."""
    end = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


def run(argv: list[str], sink: Any, tmp_path: Path, **kw: Any):
    kw.setdefault("timeout", 20.0)
    kw.setdefault("env", ENV)
    return run_process_group(argv, cwd=tmp_path, sink=sink, **kw)


# --------------------------------------------------------------------------- output


def test_output_is_streamed_while_the_process_runs(sink: Any, tmp_path: Path) -> None:
    go = tmp_path / "go"
    child = py(
        f"""
        import os, time
        print("first", flush=True)
        deadline = time.monotonic() + 15
        while not os.path.exists({str(go)!r}):
            if time.monotonic() > deadline:
                print("never released"); raise SystemExit(9)
            time.sleep(0.01)
        print("second")
        """
    )
    seen_while_running: list[bool] = []
    pgid: list[int] = []

    class Releasing:
        def line(self, stream: str, text: str) -> None:
            sink.line(stream, text)
            if text == "first":
                # The child cannot finish before this file exists: it is alive right now.
                seen_while_running.append(not pid_dead(pgid[0], within=0))
                go.write_text("x")

    result = run(child, Releasing(), tmp_path, on_start=pgid.append)
    assert result.exit_code == 0 and result.succeeded, result
    assert not result.timed_out
    assert seen_while_running == [True]
    assert sink.texts("stdout") == ["first", "second"]


def test_stdout_and_stderr_are_distinguished(sink: Any, tmp_path: Path) -> None:
    argv = ["/bin/sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"]
    result = run(argv, sink, tmp_path)
    assert result.exit_code == 0
    assert sink.texts("stdout") == ["out1", "out2"]
    assert sink.texts("stderr") == ["err1", "err2"]
    assert {s for s, _ in sink.lines} == {"stdout", "stderr"}


def test_last_line_without_newline_is_emitted(sink: Any, tmp_path: Path) -> None:
    result = run(["/bin/sh", "-c", "printf 'a\\nb'"], sink, tmp_path)
    assert result.exit_code == 0
    assert sink.texts("stdout") == ["a", "b"]


def test_empty_lines_and_utf8_preserved(sink: Any, tmp_path: Path) -> None:
    result = run(["/bin/sh", "-c", "printf 'x\\n\\nпривет €\\n'"], sink, tmp_path)
    assert result.exit_code == 0
    assert sink.texts("stdout") == ["x", "", "привет €"]


def test_long_line_without_newline_is_split(sink: Any, tmp_path: Path) -> None:
    n = 2 * MAX_LINE_BYTES + 100
    child = py(f"import sys; sys.stdout.write('x' * {n}); sys.stdout.flush()")
    result = run(child, sink, tmp_path)
    assert result.exit_code == 0
    lengths = [len(t) for t in sink.texts("stdout")]
    assert lengths == [MAX_LINE_BYTES, MAX_LINE_BYTES, 100]


def test_line_of_exactly_max_bytes_is_one_line(sink: Any, tmp_path: Path) -> None:
    child = py(f"print('y' * {MAX_LINE_BYTES}); print('next')")
    result = run(child, sink, tmp_path)
    assert result.exit_code == 0
    assert [len(t) for t in sink.texts("stdout")] == [MAX_LINE_BYTES, 4]


def test_split_long_line_does_not_break_multibyte_characters(sink: Any, tmp_path: Path) -> None:
    text = "€" * (MAX_LINE_BYTES // 2)  # 3 bytes each: the byte cap falls inside a character
    child = py(f"import sys; sys.stdout.write({text!r}); sys.stdout.flush()")
    result = run(child, sink, tmp_path)
    assert result.exit_code == 0
    parts = sink.texts("stdout")
    assert len(parts) >= 2
    assert all(len(p.encode()) <= MAX_LINE_BYTES for p in parts)
    assert "\ufffd" not in "".join(parts)
    assert "".join(parts) == text


def test_tail_keeps_the_last_lines(sink: Any, tmp_path: Path) -> None:
    result = run(py("for i in range(100): print(i)"), sink, tmp_path)
    assert result.tail.splitlines() == [str(i) for i in range(100 - TAIL_LINES, 100)]
    assert len(sink.lines) == 100


def test_stdin_file_and_devnull(sink: Any, tmp_path: Path, make_sink: Any) -> None:
    data = tmp_path / "in.txt"
    data.write_text("line one\nline two\n")
    assert run(["cat"], sink, tmp_path, stdin_file=data).exit_code == 0
    assert sink.texts() == ["line one", "line two"]
    empty = make_sink()
    result = run(["cat"], empty, tmp_path, timeout=5)
    assert result.exit_code == 0 and not result.timed_out
    assert empty.lines == []


def test_environment_is_exactly_the_given_one(sink: Any, tmp_path: Path) -> None:
    os.environ["PG_TEST_FAKE_SECRET"] = "hunter2"
    try:
        result = run(["/usr/bin/env"], sink, tmp_path, env={"PATH": "/usr/bin:/bin", "ONLY": "me"})
    finally:
        del os.environ["PG_TEST_FAKE_SECRET"]
    assert result.exit_code == 0
    assert sorted(sink.texts()) == ["ONLY=me", "PATH=/usr/bin:/bin"]


def test_runs_in_cwd_as_its_own_session(sink: Any, tmp_path: Path) -> None:
    started: list[int] = []
    child = py("import os; print(os.getcwd()); print(os.getpid(), os.getpgid(0), os.getsid(0))")
    result = run(child, sink, tmp_path, on_start=started.append)
    assert result.exit_code == 0
    cwd, ids = sink.texts()
    assert cwd == str(tmp_path)
    pid, pgid, sid = map(int, ids.split())
    assert started == [pid]
    assert pid == pgid == sid
    assert pgid != os.getpgid(0)


def test_exit_codes(sink: Any, tmp_path: Path) -> None:
    bad = run(["/bin/sh", "-c", "exit 3"], sink, tmp_path)
    assert bad.exit_code == 3 and bad.signal is None
    assert not bad.succeeded and not bad.timed_out and not bad.cancelled
    good = run(["true"], sink, tmp_path)
    assert good.succeeded and good.exit_code == 0


def test_killed_by_signal_reports_the_signal(sink: Any, tmp_path: Path) -> None:
    result = run(["/bin/sh", "-c", "kill -9 $$"], sink, tmp_path)
    assert result.exit_code is None
    assert result.signal == signal.SIGKILL
    assert not result.succeeded and not result.timed_out


def test_missing_binary_is_a_start_error(sink: Any, tmp_path: Path) -> None:
    result = run(["definitely-not-a-binary-xyz"], sink, tmp_path)
    assert result.start_error is not None
    assert "definitely-not-a-binary-xyz" in result.start_error
    assert result.exit_code is None and not result.succeeded
    assert sink.lines == []


def test_missing_cwd_is_a_start_error(sink: Any, tmp_path: Path) -> None:
    result = run_process_group(["true"], cwd=tmp_path / "nope", env=ENV, timeout=5, sink=sink)
    assert result.start_error is not None and not result.succeeded


def test_missing_stdin_file_is_a_start_error(sink: Any, tmp_path: Path) -> None:
    result = run(["cat"], sink, tmp_path, stdin_file=tmp_path / "absent")
    assert result.start_error is not None and not result.succeeded


# --------------------------------------------------------------------------- timeouts and kills


def test_timeout_sends_sigterm_to_the_group(sink: Any, tmp_path: Path) -> None:
    # sh starts in milliseconds, so its TERM trap is in place long before the deadline.
    child = [
        "/bin/sh",
        "-c",
        "trap 'echo got SIGTERM; exit 7' TERM; echo ready; sleep 60 & wait",
    ]
    t0 = time.monotonic()
    result = run(child, sink, tmp_path, timeout=1.0, grace_seconds=10)
    took = time.monotonic() - t0
    assert result.timed_out and not result.cancelled
    assert result.exit_code == 7  # its own TERM handler ran: it got SIGTERM, not SIGKILL
    assert sink.texts() == ["ready", "got SIGTERM"]
    assert 1.0 <= took < 5.0
    assert result.duration_seconds >= 1.0
    assert not result.succeeded


def test_sigterm_ignored_gets_sigkill_after_grace(sink: Any, tmp_path: Path) -> None:
    argv = ["/bin/sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
    t0 = time.monotonic()
    result = run(argv, sink, tmp_path, timeout=0.8, grace_seconds=0.7)
    took = time.monotonic() - t0
    assert sink.texts() == ["ready"]
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert result.exit_code is None
    assert 1.5 <= took < 5.0


def test_timeout_kills_grandchildren(sink: Any, tmp_path: Path) -> None:
    argv = ["/bin/sh", "-c", "sleep 60 & echo $!; sleep 60 & echo $!; wait"]
    t0 = time.monotonic()
    result = run(argv, sink, tmp_path, timeout=0.8, grace_seconds=1)
    assert time.monotonic() - t0 < 5
    assert result.timed_out
    pids = [int(p) for p in sink.texts()]
    assert len(pids) == 2
    for pid in pids:
        assert pid_dead(pid), f"grandchild {pid} still running"


def test_grandchild_ignoring_sigterm_is_killed(sink: Any, tmp_path: Path) -> None:
    argv = [
        "/bin/sh",
        "-c",
        "(trap '' TERM; exec sleep 60) & echo $!; wait",
    ]
    result = run(argv, sink, tmp_path, timeout=0.8, grace_seconds=0.5)
    assert result.timed_out
    (pid,) = [int(p) for p in sink.texts()]
    assert pid_dead(pid)


def test_leader_exits_while_grandchild_holds_the_pipe(sink: Any, tmp_path: Path) -> None:
    argv = ["/bin/sh", "-c", "sleep 60 & echo $!; echo leader done"]
    t0 = time.monotonic()
    result = run(argv, sink, tmp_path, timeout=30)
    took = time.monotonic() - t0
    assert took < 5, f"waited {took:.1f}s for an orphan holding the pipe"
    assert result.exit_code == 0 and not result.timed_out and result.succeeded
    pid = int(sink.texts()[0])
    assert sink.texts()[1] == "leader done"
    assert pid_dead(pid), "orphaned grandchild left running"


def test_leader_exits_while_grandchild_still_writes(sink: Any, tmp_path: Path) -> None:
    # Output already written by the grandchild before the group is ended is not lost.
    argv = ["/bin/sh", "-c", "(echo from grandchild; sleep 60) & sleep 0.3; echo leader"]
    result = run(argv, sink, tmp_path, timeout=30)
    assert result.exit_code == 0
    assert "from grandchild" in sink.texts() and "leader" in sink.texts()


def test_stop_event_cancels(sink: Any, tmp_path: Path) -> None:
    stop = threading.Event()

    class Stopper:
        def line(self, stream: str, text: str) -> None:
            sink.line(stream, text)
            if text == "ready":
                stop.set()

    argv = ["/bin/sh", "-c", "sleep 60 & echo ready; wait"]
    t0 = time.monotonic()
    result = run(argv, Stopper(), tmp_path, timeout=30, stop=stop, grace_seconds=1)
    assert time.monotonic() - t0 < 5
    assert result.cancelled and not result.timed_out
    assert result.signal == signal.SIGTERM
    assert not result.succeeded


def test_stop_set_from_another_thread(sink: Any, tmp_path: Path) -> None:
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    try:
        result = run(["sleep", "60"], sink, tmp_path, timeout=30, stop=stop, grace_seconds=1)
    finally:
        timer.cancel()
    assert result.cancelled and not result.timed_out
    assert 0.4 <= result.duration_seconds < 5


# --------------------------------------------------------------------------- crash recovery helpers


def test_terminate_group_and_alive(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert process_group_alive(proc.pid)
        terminate_group(proc.pid, grace_seconds=0.3)
        assert proc.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert not process_group_alive(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_terminate_group_kills_members_that_ignore_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f"trap '' TERM; sleep 60 & echo $! > {pidfile}; wait"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 5
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        grandchild = int(pidfile.read_text())
        t0 = time.monotonic()
        terminate_group(proc.pid, grace_seconds=0.5)
        assert time.monotonic() - t0 >= 0.5  # waited the grace period: TERM was ignored
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert pid_dead(grandchild)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_process_group_alive_false_for_unknown_group() -> None:
    # Find a pid that is not in use as a process group.
    pgid = 4_000_000
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        pgid -= 1
    assert not process_group_alive(pgid)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_does_not_block(stream: str, tmp_path: Path, make_sink: Any) -> None:
    # 8 MiB, more than any pipe buffer: only works if both pipes are drained concurrently.
    target = "sys.stdout" if stream == "stdout" else "sys.stderr"
    child = py(
        f"""
        import sys
        for i in range(80_000):
            {target}.write("z" * 99 + "\\n")
        print("end", file=sys.stdout if {target!r} == "sys.stderr" else sys.stderr)
        """
    )
    counted = make_sink()
    result = run(child, counted, tmp_path, timeout=20)
    assert result.exit_code == 0 and not result.timed_out
    assert len(counted.texts(stream)) == 80_000

"""The append lock (core/engine/log_lock.py): shared holds coexist, an exclusive one waits for
them, it is re-entrant per thread and path, it is released when its holder is done or dies,
and a file system that refuses locks does not stop the writes.

Probed with ``flock(LOCK_NB)`` on a file description of the test's own: as another writer or
another replica (its own process) would see the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.engine.log_lock import AppendLock


def _free(path: Path, mode: int) -> bool:
    """Whether another holder could take ``mode`` now."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_shared_holds_coexist_and_keep_a_repair_out(tmp_path: Path) -> None:
    lock = AppendLock(tmp_path / "logs" / ".append.lock")  # its directory made on first use
    with lock.shared():
        assert _free(lock.path, fcntl.LOCK_SH)
        assert not _free(lock.path, fcntl.LOCK_EX)
        with lock.shared():  # re-entrant: a recorder write that raises an escalation
            assert not _free(lock.path, fcntl.LOCK_EX)
        assert not _free(lock.path, fcntl.LOCK_EX)  # the inner exit kept the outer hold
    assert _free(lock.path, fcntl.LOCK_EX)


def test_an_exclusive_hold_keeps_writers_out_and_covers_its_own(tmp_path: Path) -> None:
    lock = AppendLock(tmp_path / ".append.lock")
    with lock.exclusive():
        assert not _free(lock.path, fcntl.LOCK_SH)
        with lock.shared():  # the repair's own writes do not wait for it
            pass
        assert not _free(lock.path, fcntl.LOCK_SH)
    assert _free(lock.path, fcntl.LOCK_SH)


def test_a_shared_hold_cannot_become_exclusive(tmp_path: Path) -> None:
    lock = AppendLock(tmp_path / ".append.lock")
    with lock.shared():
        with pytest.raises(RuntimeError, match="cannot become exclusive"):
            with lock.exclusive():
                pass
        assert not _free(lock.path, fcntl.LOCK_EX)
    assert _free(lock.path, fcntl.LOCK_EX)


def test_a_writer_that_dies_releases_its_hold(tmp_path: Path) -> None:
    path = tmp_path / ".append.lock"
    code = (
        "import sys, time; from pathlib import Path; from core.engine.log_lock import AppendLock\n"
        f"lock = AppendLock(Path({str(path)!r}))\n"
        "with lock.shared():\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        assert not _free(path, fcntl.LOCK_EX)  # a replica's repair waits for it
        child.kill()  # SIGKILL between its commit and its line
        child.wait(10)
        assert _free(path, fcntl.LOCK_EX)
    finally:
        child.kill()
        child.wait(10)


def test_every_lock_of_one_path_shares_the_threads_hold(tmp_path: Path) -> None:
    """A recorder's lock and its escalations' (two objects, one file): a shared hold inside an
    exclusive one is the same hold, not a second flock that would wait for the first."""
    path = tmp_path / ".append.lock"
    repair, escalations = AppendLock(path), AppendLock(path)
    done = threading.Event()

    def nested() -> None:
        with repair.exclusive(), escalations.shared():
            done.set()

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(10)
    assert done.is_set()
    assert _free(path, fcntl.LOCK_EX)


def test_a_file_system_without_locks_costs_the_guarantee_not_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = AppendLock(tmp_path / ".append.lock")
    refusals: list[int] = []

    def no_locks(fd: int, mode: int) -> None:
        refusals.append(mode)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with lock.shared():
        ran.append("write")
    with lock.exclusive():
        ran.append("repair")
    assert ran == ["write", "repair"] and refusals == [fcntl.LOCK_SH, fcntl.LOCK_EX]

    def broken(fd: int, mode: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with lock.shared():
            raise AssertionError("ran without its lock")

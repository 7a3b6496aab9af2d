"""The lock between a database commit and its line in the logs derived from the database.

``logs/executor.jsonl`` and ``logs/escalations.jsonl`` follow the database: a writer commits
its rows, then appends their lines. A repair (append every row a file lacks: a crash came
between a commit and its line) must not see a row whose writer is still between the two,
or the line lands twice, once from the repair and once from its writer. That happens when a
repair runs beside live writers: the operator's replica that starts leading, or gains a
shard, while another replica (sharing the work dir) or a thread of its own that lost its
cancellation race is mid-write; an integration worker's repair beside the task writers.

So writers hold this lock *shared* from the commit to the append, and a repair holds it
*exclusive*. A writer that dies loses its lock with its process: the next repair sees what
it committed and never wrote.

Why ``fcntl.flock`` and not a library: filelock, the usual choice, has no shared mode;
flock(2) is in the standard library, and works between processes on one node and (emulated
with byte-range locks by Linux) on NFS, the chart's ReadWriteMany work dir. Re-entrant per
thread: a recorder write that raises an escalation takes it once.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The lock file, next to the logs it guards.
APPEND_LOCK = Path("logs") / ".append.lock"


class AppendLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = threading.local()  # depth and mode of this thread's hold

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold from a commit of rows to the append of their lines."""
        with self._hold(fcntl.LOCK_SH):
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold while comparing the database with the files and appending what they lack."""
        with self._hold(fcntl.LOCK_EX):
            yield

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        depth: int = getattr(self._held, "depth", 0)
        if depth:
            if mode == fcntl.LOCK_EX and self._held.mode != fcntl.LOCK_EX:
                raise RuntimeError(f"{self.path}: a shared hold cannot become exclusive")
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        fd = self._open()
        try:
            fcntl.flock(fd, mode)
            self._held.depth, self._held.mode = 1, mode
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)  # releases the flock

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, flags, 0o600)

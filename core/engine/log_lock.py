"""The lock between a database commit and its line in the logs derived from the database.

``logs/executor.jsonl`` and ``logs/escalations.jsonl`` follow the database: a writer commits
its rows, then appends their lines. A repair (append every row a file lacks: a crash came
between a commit and its line) must not take a row whose writer is still between the two for
a lost one, or the line lands twice, once from the repair and once from its writer. That
happens when a repair runs beside live writers: the operator's replica that starts leading,
or gains a shard, while another replica (sharing the work dir) is mid-write; an integration
worker's repair beside the task writers.

So writers hold this lock *shared* from the commit to the append, and the last, short step of
a repair holds it *exclusive* (:meth:`core.engine.events.EventLog.repair`). A writer that dies
loses its lock with its process. Linux grants shared holds while an exclusive one waits: a
repair may wait for a burst of writes to pause, the writers never wait for a waiting repair.

Why ``fcntl.flock`` and not a library: filelock, the usual choice, has no shared mode;
flock(2) is in the standard library and works between processes on one node and, emulated
with byte-range locks by Linux, on NFS (the chart's ReadWriteMany work dir; not on a mount
with ``local_lock=flock``). A file system that refuses locks (``ENOLCK``) costs the guarantee
against a doubled line, not the write: the writer goes on unlocked, with a warning. Re-entrant
per thread and path, across every :class:`AppendLock` of that path in the process.
:func:`torn` tells a writer that a crash cut the last line (it starts a new one).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("orchestrator.logs")

#: The lock file, next to the logs it guards.
APPEND_LOCK = Path("logs") / ".append.lock"

_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})
_held = threading.local()  # this thread's holds: {path: (depth, mode)}


class AppendLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._key = os.path.abspath(path)
        self._warned = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold from a commit of rows to the append of their lines."""
        with self._hold(fcntl.LOCK_SH):
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold while making sure no committed row lacks its line, and appending those."""
        with self._hold(fcntl.LOCK_EX):
            yield

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        holds: dict[str, tuple[int, int]] = _held.__dict__.setdefault("holds", {})
        depth, held = holds.get(self._key, (0, 0))
        if depth:
            if mode == fcntl.LOCK_EX and held != fcntl.LOCK_EX:
                raise RuntimeError(f"{self.path}: a shared hold cannot become exclusive")
            holds[self._key] = (depth + 1, held)
            try:
                yield
            finally:
                holds[self._key] = (depth, held)
            return
        fd = self._open()
        try:
            self._flock(fd, mode)
            holds[self._key] = (1, mode)
            try:
                yield
            finally:
                del holds[self._key]
        finally:
            os.close(fd)  # releases the flock

    def _flock(self, fd: int, mode: int) -> None:
        try:
            fcntl.flock(fd, mode)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: the file system refuses locks (%s): a repair of the logs beside "
                    "a live writer may append its line twice",
                    self.path,
                    exc.strerror,
                )

    def _open(self) -> int:
        # read-only is enough for flock: anyone who may read the logs may take the lock
        flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, flags, 0o644)


def torn(path: Path) -> bool:
    """Whether a crash cut the last line of a log (it does not end with a newline)."""
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, os.SEEK_END) == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False

"""Removal of finished attempts' directories off the attempt's path.

Removing an attempt dir (two checkouts: trees and their repositories, the adapter's HOME)
is a few hundred unlink and rmdir calls: several milliseconds per attempt, more when the
disk's journal is busy, which was more than the rest of a trivial attempt's bookkeeping
(issue 17). So a directory to remove is renamed into the trash dir at once (one
``rename``: its path is free for the next checkout immediately, and nothing reads what is
under it again) and one worker thread deletes it while the next attempt runs.

Nothing that is recorded lives there: the diff is in the evidence store and the result in
the database and the ledger before an attempt is released. A crash therefore loses nothing
but the deletion; whatever a dead process left in the trash is deleted by the next janitor
of the same work dir, with its first discard. The worker is not a daemon thread and ends
when the trash is empty, so a process that exits normally first finishes the deletions
(:meth:`Janitor.drain` waits for them explicitly).

Hand-written rather than a thread pool: a pool's worker lives until shutdown and would make
every short-lived caller wait for or stop it; this one exists only while there is work.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections import deque
from pathlib import Path


class Janitor:
    """Deletes directories in the background; see the module docstring."""

    def __init__(self, trash: Path) -> None:
        self.trash = trash
        self._pending: deque[Path] = deque()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._swept = False

    def discard(self, path: Path) -> None:
        """Remove ``path`` (a directory, or nothing): gone from its place on return, its
        contents deleted soon after. Where it cannot be moved (another file system), it is
        deleted here and now."""
        target = self.trash / uuid.uuid4().hex
        try:
            self.trash.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        except FileNotFoundError:
            if os.path.lexists(path):  # the trash dir could not be made
                shutil.rmtree(path, ignore_errors=True)
            return
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            return
        with self._lock:
            if not self._swept:
                # left by a process that died before its worker was done
                self._swept = True
                self._pending.extend(p for p in self.trash.iterdir() if p != target)
            self._pending.append(target)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="janitor")
                self._worker.start()

    def drain(self) -> None:
        """Wait until everything discarded so far is deleted."""
        while True:
            with self._lock:
                worker = self._worker
            if worker is None:
                return
            worker.join()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                path = self._pending.popleft()
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

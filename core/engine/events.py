"""``logs/executor.jsonl``: the run's events as JSON lines, derived from ``execution_log``.

The database is written first (state change and event in one transaction); the JSONL file
follows. A crash between the two leaves the file one event short, so on start (the operator:
on leading) the file is repaired from the database: every event key the file lacks is
appended, none is duplicated, also beside live writers (:mod:`core.engine.log_lock`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TextIO

from core.db.store import Event
from core.engine.log_lock import AppendLock, torn

#: Missing lines appended per exclusive hold of a repair (a fresh file gets the whole log).
REPAIR_BATCH = 5000


class EventLog:
    def __init__(self, path: Path, *, dedupe: bool = True) -> None:
        """``dedupe=False``: append what is given (the caller got it from a keyed DB insert)
        and keep no key set in memory; :meth:`repair` compares with the file either way."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dedupe = dedupe
        self._keys: set[str] | None = None

    def keys(self) -> set[str]:
        if self._keys is None:
            self._keys = self._scan(0, set())[0]
        return self._keys

    def write(self, events: Iterable[Event]) -> int:
        return self._append(events, self.keys() if self._dedupe else None)

    def repair(self, events: Callable[[], Iterable[Event]], lock: AppendLock) -> int:
        """Append the events of ``events()`` (the database's, in order) that the file lacks;
        returns how many.

        The file and the database are compared without the lock (the long part); what seems
        missing is then checked under the exclusive lock against the lines appended since
        the file was read -- a writer that was between its commit and its line -- and
        appended if still missing: with no writer mid-write, a committed event whose line is
        not there has lost it for good."""
        known, end = self._scan(0, set())
        arrived: set[str] = set()  # lines other writers appended since the first read
        written = 0
        for batch in _batches((e for e in events() if e.key not in known), REPAIR_BATCH):
            with lock.exclusive():
                end = self._scan(end, arrived)[1]
                written += self._append((e for e in batch if e.key not in arrived), None)
                end = self.path.stat().st_size if self.path.exists() else 0
        self._keys = None  # read again when next needed
        return written

    def _append(self, events: Iterable[Event], seen: set[str] | None) -> int:
        """Append ``events`` but those in ``seen`` (None: all), adding them to it."""
        written = 0
        fh = None
        try:
            for event in events:
                if seen is not None:
                    if event.key in seen:
                        continue
                    seen.add(event.key)
                if fh is None:
                    fh = self._open()
                fh.write(json.dumps(event.as_json(), ensure_ascii=False, default=str) + "\n")
                written += 1
        finally:
            if fh is not None:
                fh.close()  # flushes
        return written

    def _open(self) -> TextIO:
        cut = torn(self.path)
        fh = open(self.path, "a", encoding="utf-8")
        if cut:
            fh.write("\n")  # a crash cut the last line: start a clean one
        return fh

    def _scan(self, offset: int, keys: set[str]) -> tuple[set[str], int]:
        """Add the event keys of the lines from ``offset`` to ``keys``; returns them and the
        end of the last whole line (a line still being written is read again from there).
        A line a crash cut (even inside a UTF-8 character) is skipped."""
        end = offset
        if not self.path.exists():
            return keys, end
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                end += len(raw)
                try:
                    keys.add(json.loads(raw)["event_key"])
                except (ValueError, KeyError, TypeError):  # JSON and UTF-8 errors alike
                    continue
        return keys, end


def _batches(events: Iterable[Event], size: int) -> Iterator[list[Event]]:
    """``itertools.batched`` of Python 3.12."""
    it = iter(events)
    while batch := list(islice(it, size)):
        yield batch

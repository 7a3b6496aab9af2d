"""``logs/executor.jsonl``: the run's events as JSON lines, derived from ``execution_log``.

The database is written first (state change and event in one transaction); the JSONL file
follows. A crash between the two leaves the file one event short, so on start (the operator:
on leading) the file is repaired from the database: every event key the file lacks is
appended, none is duplicated, also beside live writers (:mod:`core.engine.log_lock`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from core.db.store import Event


class EventLog:
    def __init__(self, path: Path, *, dedupe: bool = True) -> None:
        """``dedupe=False``: append what is given (the caller got it from a keyed DB insert)
        and keep no key set in memory; :meth:`repair` still compares with the file."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dedupe = dedupe
        self._keys: set[str] | None = None

    def keys(self) -> set[str]:
        if self._keys is None:
            self._keys = self._read_keys()
        return self._keys

    def write(self, events: Iterable[Event]) -> int:
        return self._append(events, self.keys() if self._dedupe else None)

    def repair(self, events: Iterable[Event]) -> int:
        """Append the database's events that the file lacks; returns how many. Hold the
        append lock exclusive around it (:mod:`core.engine.log_lock`)."""
        return self._append(events, self.keys() if self._dedupe else self._read_keys())

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
        torn = (
            self.path.exists()
            and self.path.stat().st_size > 0
            and not _ends_with_newline(self.path)
        )
        fh = open(self.path, "a", encoding="utf-8")
        if torn:
            fh.write("\n")  # a crash cut the last line: start a clean one
        return fh

    def _read_keys(self) -> set[str]:
        keys: set[str] = set()
        if self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                for raw in fh:
                    try:
                        keys.add(json.loads(raw)["event_key"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue
        return keys


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"

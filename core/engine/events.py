"""``logs/executor.jsonl``: the run's events as JSON lines, derived from ``execution_log``.

The database is written first (state change and event in one transaction); the JSONL file
follows. A crash between the two leaves the file one event short, so on start the file is
repaired from the database: every event key the file lacks is appended, none is duplicated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from core.db.store import Event


class EventLog:
    def __init__(self, path: Path, *, dedupe: bool = True) -> None:
        """``dedupe=False``: append what is given (the caller got it from a keyed DB insert)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dedupe = dedupe
        self._keys: set[str] | None = None

    def keys(self) -> set[str]:
        if self._keys is None:
            self._keys = set()
            if self.path.exists():
                with open(self.path, encoding="utf-8") as fh:
                    for raw in fh:
                        try:
                            self._keys.add(json.loads(raw)["event_key"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            continue
        return self._keys

    def write(self, events: Iterable[Event]) -> int:
        events = list(events)
        if not events:
            return 0
        keys = self.keys() if self._dedupe else set()
        written = 0
        torn = (
            self.path.exists()
            and self.path.stat().st_size > 0
            and not _ends_with_newline(self.path)
        )
        with open(self.path, "a", encoding="utf-8") as fh:
            if torn:
                fh.write("\n")  # a crash cut the last line: start a clean one
            for event in events:
                if event.key in keys:
                    continue
                fh.write(json.dumps(event.as_json(), ensure_ascii=False, default=str) + "\n")
                if self._dedupe:
                    keys.add(event.key)
                written += 1
            fh.flush()
        return written

    def repair(self, events: Iterable[Event]) -> int:
        """Append the database's events that the file lacks; returns how many."""
        return self.write(events)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"

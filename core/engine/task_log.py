"""``logs/execution/<task>.jsonl``: a task's output, one JSON record per line, as it arrives.

Each record names the attempt and the stream (``stdout``/``stderr`` of the adapter,
``gate:<check>`` for test-gate checks, ``orchestrator`` for our own notes). Every record is
flushed when written, so ``orchestrator logs -f`` and a crash both see everything so far. A
size cap per attempt bounds the file; the first record past the cap is replaced by an explicit
truncation marker and the number of dropped bytes is recorded when the attempt ends.
An optional ``mirror`` stream receives every record too, as it is written (the runner in an
adapter pod mirrors the log to its stdout, which the operator reads).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any


def utcnow() -> datetime:
    return datetime.now(UTC)


class TaskLog:
    """Append-only JSONL writer for one attempt of one task, with a byte cap."""

    def __init__(
        self,
        path: Path,
        *,
        task_id: str,
        attempt: int,
        max_bytes: int,
        now: Callable[[], datetime] = utcnow,
        mirror: IO[str] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self._task_id = task_id
        self._attempt = attempt
        self._max = max_bytes
        self._now = now
        self._mirror = mirror
        self.written = 0
        self.dropped = 0

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def line(self, stream: str, text: str) -> None:
        size = len(text.encode("utf-8", errors="replace"))
        if self.dropped or self.written + size > self._max:
            # once cut, stay cut: the log is always a prefix of the output
            if not self.dropped:
                self._write(stream="orchestrator", event="output_truncated", limit=self._max)
            self.dropped += size
            return
        self.written += size
        self._write(stream=stream, line=text)

    def note(self, event: str, **fields: Any) -> None:
        self._write(stream="orchestrator", event=event, **fields)

    def close(self) -> None:
        if self.dropped:
            self._write(stream="orchestrator", event="output_dropped", bytes=self.dropped)
        self._file.close()

    def __enter__(self) -> TaskLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _write(self, **fields: Any) -> None:
        record = {
            "ts": self._now().isoformat(timespec="milliseconds"),
            "task_id": self._task_id,
            "attempt": self._attempt,
            **fields,
        }
        text = json.dumps(record, ensure_ascii=False) + "\n"
        self._file.write(text)
        self._file.flush()
        if self._mirror is not None:
            self._mirror.write(text)
            self._mirror.flush()


class PrefixedSink:
    """Routes a gate check's output into the task log under ``gate:<check>``."""

    def __init__(self, log: TaskLog, prefix: str) -> None:
        self._log = log
        self._prefix = prefix

    def line(self, stream: str, text: str) -> None:
        self._log.line(f"{self._prefix}:{stream}", text)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a task log; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                continue


def find_task_log(workdir: Path, task: str) -> Path | None:
    """The log file of ``task``: ``<task>.jsonl`` (embedded), or on Kubernetes
    ``<namespace>.<task>.<uid>.jsonl`` for ``<namespace>/<task>`` or a bare task id (the
    newest when a name was applied several times)."""
    logs = workdir / "logs" / "execution"
    if "/" not in task and (logs / f"{task}.jsonl").exists():
        return logs / f"{task}.jsonl"
    namespace, _, name = task.rpartition("/")
    pattern = f"{namespace or '*'}.{name}.*.jsonl"
    found = sorted(logs.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None

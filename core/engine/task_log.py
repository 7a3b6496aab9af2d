"""``logs/execution/<task>.jsonl``: a task's output, one JSON record per line, as it arrives.

Each record names the attempt and the stream (``stdout``/``stderr`` of the adapter,
``gate:<check>:<stream>`` for test-gate checks, ``orchestrator`` for our own notes). Records
are flushed when written, so ``orchestrator logs -f`` and a crash see everything so far.

Caps count every byte written, framing included (timestamp, ids, JSON quoting, newline): an
adapter printing empty lines costs ~90 bytes a line, not zero. Per attempt, the adapter's
output and our notes together stay within ``max_bytes``; each gate check run (a *section*)
gets its own ``section_bytes``. Within a section the first half of the budget is written as
it arrives (the head); after that, records are held back in a ring buffer of the other half
(the tail) and written when the section ends, behind one explicit ``output_truncated``
marker that says how many records and bytes were dropped between the two. Nothing about
the cap depends on how the output is split into lines.

Every line passes a :class:`~core.engine.redaction.StreamRedactor` (one per stream, so the
body of a printed private key is masked too) and every note a
:class:`~core.engine.redaction.Redactor` before it is encoded: the file, and the ``mirror``
stream (the runner in an adapter pod mirrors the log to its stdout, which the operator
reads), never see a masked secret.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from core.engine.redaction import SHAPES_ONLY, Redactor, StreamRedactor

#: Room kept in every section for its truncation marker.
MARKER_RESERVE = 512
#: Notes: at most this share of an attempt's cap (and at most NOTES_MAX bytes); the rest is
#: the adapter's output.
NOTES_SHARE = 4
NOTES_MAX = 64 * 1024
#: Longest string (characters) and list (items) kept in one note's fields.
NOTE_FIELD_CHARS = 2048
NOTE_LIST_ITEMS = 50


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Section:
    """One capped stretch of output: a head written at once, a tail held back."""

    def __init__(self, log: TaskLog, name: str, budget: int) -> None:
        self.log, self.name, self.budget = log, name, budget
        usable = max(budget - MARKER_RESERVE, 0)
        self.head_budget = usable // 2
        self.tail_budget = usable - self.head_budget
        self.head = 0
        self.holding = False
        self.tail: deque[bytes] = deque()
        self.tail_bytes = 0
        self.dropped_records = 0
        self.dropped_bytes = 0
        self.streams: dict[str, StreamRedactor] = {}
        self.closed = False

    def line(self, stream: str, text: str) -> None:
        if self.closed:  # late output of a step that has ended: counted, not written
            self.log.dropped += len(text.encode("utf-8", errors="replace")) + 1
            return
        redact = self.streams.get(stream)
        if redact is None:
            redact = self.streams[stream] = self.log.redactor.stream()
        record = self.log.encode(stream=stream, line=redact(text))
        size = len(record)
        if not self.holding and self.head + size <= self.head_budget:
            self.head += size
            self.log.emit(record)
            return
        self.holding = True
        if size > self.tail_budget:
            self._drop(size)
            return
        while self.tail_bytes + size > self.tail_budget:
            self._drop(len(old := self.tail.popleft()))
            self.tail_bytes -= len(old)
        self.tail.append(record)
        self.tail_bytes += size

    def _drop(self, size: int) -> None:
        self.dropped_records += 1
        self.dropped_bytes += size

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.dropped_records:
            self.log.emit(
                self.log.encode(
                    stream="orchestrator",
                    event="output_truncated",
                    section=self.name,
                    limit=self.budget,
                    dropped_records=self.dropped_records,
                    dropped_bytes=self.dropped_bytes,
                    head_bytes=self.head,
                    tail_bytes=self.tail_bytes,
                )
            )
            self.log.dropped += self.dropped_bytes
        for record in self.tail:
            self.log.emit(record)
        self.tail.clear()


class TaskLog:
    """Append-only JSONL writer for one attempt of one task, with byte caps and masking."""

    def __init__(
        self,
        path: Path,
        *,
        task_id: str,
        attempt: int,
        max_bytes: int,
        now: Callable[[], datetime] = utcnow,
        mirror: IO[str] | None = None,
        redactor: Redactor = SHAPES_ONLY,
        section_bytes: int | None = None,
        mirror_notes_only: bool = False,
    ) -> None:
        """``mirror_notes_only``: mirror only our own notes (few and small), not the output:
        a runner whose full log goes to the evidence store keeps its pod log small."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[bytes] = open(path, "ab")
        self._task_id = task_id
        self._attempt = attempt
        self._now = now
        self._mirror = mirror
        self._mirror_notes_only = mirror_notes_only
        self.redactor = redactor
        self.max_bytes = max_bytes
        self.notes_budget = min(max_bytes // NOTES_SHARE, NOTES_MAX)
        self.section_bytes = section_bytes or max_bytes
        #: Bytes written to the file by this attempt (every record, framing included).
        self.written = 0
        #: Bytes of records not written (output cut by a cap, notes over their share).
        self.dropped = 0
        self._notes = 0
        self._section = _Section(self, "adapter", max(max_bytes - self.notes_budget, 0))

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def line(self, stream: str, text: str) -> None:
        """A line of the adapter's output (or of the open section)."""
        self._section.line(stream, text)

    def section(self, prefix: str) -> PrefixedSink:
        """End the open section and start one for ``prefix`` with its own cap; lines given
        to the returned sink are recorded under ``<prefix>:<stream>``."""
        return PrefixedSink(self, prefix, self.open_section(prefix))

    def open_section(self, name: str) -> _Section:
        self._section.close()
        self._section = _Section(self, name, self.section_bytes)
        return self._section

    def end_section(self) -> None:
        """Write the open section's held-back tail (e.g. when the adapter has exited)."""
        self._section.close()

    def note(self, event: str, **fields: Any) -> None:
        """Our own record; within the attempt's share for notes, fields clipped and masked."""
        record = self.encode(
            stream="orchestrator", event=event, **_clip(self.redactor.value(fields))
        )
        if self._notes + len(record) > self.notes_budget:
            self.dropped += len(record)
            return
        self._notes += len(record)
        self.emit(record, note=True)

    def close(self) -> None:
        if self._file.closed:
            return
        self._section.close()
        self._file.close()

    def __enter__(self) -> TaskLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def encode(self, **fields: Any) -> bytes:
        record = {
            "ts": self._now().isoformat(timespec="milliseconds"),
            "task_id": self._task_id,
            "attempt": self._attempt,
            **fields,
        }
        text = json.dumps(record, ensure_ascii=False) + "\n"
        # a lone surrogate (an undecodable file name) becomes a valid JSON \\u escape
        return text.encode("utf-8", errors="backslashreplace")

    def emit(self, record: bytes, *, note: bool = False) -> None:
        self._file.write(record)
        self._file.flush()
        self.written += len(record)
        if self._mirror is not None and (note or not self._mirror_notes_only):
            self._mirror.write(record.decode("utf-8", errors="replace"))
            self._mirror.flush()


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= NOTE_FIELD_CHARS else value[:NOTE_FIELD_CHARS] + "..."
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_clip(v) for v in value[:NOTE_LIST_ITEMS]]
        return items + (
            [f"... {len(value) - NOTE_LIST_ITEMS} more"] if len(value) > NOTE_LIST_ITEMS else []
        )
    return value


class PrefixedSink:
    """Routes a gate check's output into the task log under ``gate:<check>``, in a section
    of its own (its own cap)."""

    def __init__(self, log: TaskLog, prefix: str, section: _Section | None = None) -> None:
        self._prefix = prefix
        self._section: _Section = section if section is not None else log.open_section(prefix)

    def line(self, stream: str, text: str) -> None:
        self._section.line(f"{self._prefix}:{stream}", text)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a task log; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
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

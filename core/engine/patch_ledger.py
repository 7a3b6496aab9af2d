"""The patch ledger: ``.state/patch_ledger.jsonl``, one hash-chained entry per attempt.

Each entry carries the sha256 of the previous entry, so editing, reordering or removing a line
breaks the chain at a place :func:`verify` can name. Cutting lines off the *end* leaves a valid
chain, so verification also compares against an anchor kept elsewhere: the ``patch_history``
mirror in the database (every entry is mirrored there with its hash).

Appends are idempotent on (task identity, attempt, kind) and serialised between processes
with an exclusive ``flock`` on the ledger file; each line is fsynced before the database mirror
is written, so the file is always the leader and the mirror can be repaired from it.
The diff bytes are stored content-addressed under ``.ledger/patches/``.

Two kinds of entries share the one chain: ``attempt`` (one per finished attempt; the line has
no ``kind`` field, so entries written before kinds existed hash as they did) and
``integration`` (the integration worker's verdict on a completed attempt's change; it refers
to the same patch file). :func:`verify` checks both the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from core.engine.state_files import atomic_write_bytes
from core.engine.task_log import utcnow
from core.identity import TaskKey
from core.models import (
    AttemptResult,
    FailureClass,
    IntegrationRecord,
    LedgerEntry,
    TaskState,
)

GENESIS = "0" * 64
ATTEMPT = "attempt"
INTEGRATION = "integration"
#: (run, task, uid, attempt, kind): the identity of one entry (see :mod:`core.identity`).
Key = tuple[str, str, str, int, str]


def _key(entry: LedgerEntry) -> Key:
    return (entry.run_id, entry.task_id, entry.task_uid or "", entry.attempt, entry.kind)


def _lookup(key: TaskKey, attempt: int, kind: str = ATTEMPT) -> Key:
    return (key.run_id, key.task_id, key.uid, attempt, kind)


def entry_hash(fields: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of an entry without its own ``hash``."""
    body = {k: v for k, v in fields.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class PatchLedger:
    def __init__(self, path: Path, patches_dir: Path, now: Callable[[], datetime] = utcnow) -> None:
        self.path = path
        self.patches_dir = patches_dir
        self._now = now
        self._offset = 0
        self._index: dict[Key, LedgerEntry] = {}
        self._last: LedgerEntry | None = None

    def find(self, key: TaskKey, attempt: int) -> LedgerEntry | None:
        with self._locked() as fh:
            self._catch_up(fh)
        return self._index.get(_lookup(key, attempt))

    def find_integration(self, key: TaskKey, attempt: int) -> LedgerEntry | None:
        """The integration verdict on ``attempt``'s change, if there is one."""
        with self._locked() as fh:
            self._catch_up(fh)
        return self._index.get(_lookup(key, attempt, INTEGRATION))

    def entries(self) -> list[LedgerEntry]:
        with self._locked() as fh:
            self._catch_up(fh)
        return sorted(self._index.values(), key=lambda e: e.seq)

    def append(
        self,
        *,
        key: TaskKey,
        base_commit: str,
        result: AttemptResult,
        patch: bytes | None,
    ) -> LedgerEntry:
        """Record one finished attempt; a replay of the same attempt returns the first entry."""
        with self._locked() as fh:
            self._catch_up(fh)
            existing = self._index.get(_lookup(key, result.attempt))
            if existing is not None:
                return existing
            patch_ref = self._store_patch(patch) if patch else None
            diff = result.diff
            fields: dict[str, Any] = {
                "seq": (self._last.seq if self._last else 0) + 1,
                "run_id": key.run_id,
                "task_id": key.task_id,
            }
            if key.uid:  # absent on the embedded backend: older entries hash as they did
                fields |= {"task_uid": key.uid, "scope": key.scope}
            fields |= {
                "attempt": result.attempt,
                "adapter_id": result.adapter_id,
                "base_commit": base_commit,
                "state": result.state.value,
                "failure_class": result.failure_class.value if result.failure_class else None,
                "diff_sha256": diff.sha256 if diff and not diff.empty else None,
                "diff_bytes": diff.bytes if diff else 0,
                "files_changed": diff.files_changed if diff else 0,
                "insertions": diff.insertions if diff else 0,
                "deletions": diff.deletions if diff else 0,
                "truncated": diff.truncated if diff else False,
                "patch_ref": patch_ref,
                "result": result.model_dump(mode="json"),
                "recorded_at": self._now().isoformat(),
                "prev_hash": self._last.hash if self._last else GENESIS,
            }
            return self._write(fh, fields)

    def append_integration(
        self,
        *,
        key: TaskKey,
        attempt_entry: LedgerEntry,
        record: IntegrationRecord,
        state: TaskState,
        failure_class: FailureClass | None,
    ) -> LedgerEntry:
        """Record the integration verdict on the change of ``attempt_entry``.

        Idempotent per (task, attempt): a replay returns the first verdict, the ledger's word.
        The entry repeats the attempt's diff fields, patch reference and result, so it can be
        read (and verified) on its own; ``state``/``failure_class`` are the task's after the
        verdict (PENDING and ``merge_conflict`` when the task was sent back).
        """
        with self._locked() as fh:
            self._catch_up(fh)
            existing = self._index.get(_lookup(key, attempt_entry.attempt, INTEGRATION))
            if existing is not None:
                return existing
            fields: dict[str, Any] = {
                "seq": (self._last.seq if self._last else 0) + 1,
                "kind": INTEGRATION,
                "run_id": key.run_id,
                "task_id": key.task_id,
            }
            if key.uid:
                fields |= {"task_uid": key.uid, "scope": key.scope}
            source = attempt_entry
            fields |= {
                "attempt": source.attempt,
                "adapter_id": source.adapter_id,
                "base_commit": source.base_commit,
                "state": state.value,
                "failure_class": failure_class.value if failure_class else None,
                "diff_sha256": source.diff_sha256,
                "diff_bytes": source.diff_bytes,
                "files_changed": source.files_changed,
                "insertions": source.insertions,
                "deletions": source.deletions,
                "truncated": source.truncated,
                "patch_ref": source.patch_ref,
                "result": source.result.model_dump(mode="json"),
                "integration": record.model_dump(mode="json"),
                "recorded_at": self._now().isoformat(),
                "prev_hash": self._last.hash if self._last else GENESIS,
            }
            return self._write(fh, fields)

    def _write(self, fh: IO[bytes], fields: dict[str, Any]) -> LedgerEntry:
        """Hash, validate and append one entry (the lock is held), fsynced."""
        fields["hash"] = entry_hash(fields)
        entry = LedgerEntry.model_validate(fields)
        line = json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n"
        # A torn last line (a crash mid-write, never acknowledged) is cut off first, or
        # the new entry would be glued onto it and break every later read of the file.
        if fh.seek(0, os.SEEK_END) > self._offset:
            fh.truncate(self._offset)
        fh.seek(0, os.SEEK_END)
        fh.write(line.encode())
        fh.flush()
        os.fsync(fh.fileno())
        self._offset = fh.tell()
        self._remember(entry)
        return entry

    def read_patch(self, entry: LedgerEntry) -> bytes | None:
        if entry.patch_ref is None:
            return None
        return (self.patches_dir.parent / entry.patch_ref).read_bytes()

    def _store_patch(self, patch: bytes) -> str:
        digest = hashlib.sha256(patch).hexdigest()
        target = self.patches_dir / f"{digest}.diff"
        if not target.exists():
            atomic_write_bytes(target, patch)
        return f"{self.patches_dir.name}/{digest}.diff"

    def _remember(self, entry: LedgerEntry) -> None:
        self._index[_key(entry)] = entry
        self._last = entry

    def _catch_up(self, fh: IO[bytes]) -> None:
        fh.seek(self._offset)
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # torn write from a crash: ignored here, reported by verify()
            self._remember(LedgerEntry.model_validate_json(raw))
            self._offset += len(raw)

    @contextmanager
    def _locked(self) -> Iterator[IO[bytes]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    path: Path, patches_dir: Path | None = None, anchor: Iterable[tuple[int, str]] = ()
) -> VerifyReport:
    """Check the chain line by line; ``anchor`` is (seq, hash) pairs from the DB mirror."""
    problems: list[str] = []
    prev = GENESIS
    hashes: dict[int, str] = {}
    lines = path.read_bytes().split(b"\n") if path.exists() else [b""]
    if lines[-1]:
        problems.append(f"line {len(lines)}: incomplete last line (torn write or cut file)")
    for lineno, raw in enumerate(lines[:-1], start=1):
        try:
            fields = json.loads(raw)
            entry = LedgerEntry.model_validate(fields)
        except (json.JSONDecodeError, ValidationError) as exc:
            problems.append(f"line {lineno}: not a valid ledger entry ({_first_line(exc)})")
            break
        if entry.seq != lineno:
            problems.append(f"line {lineno}: seq {entry.seq}, expected {lineno} (reordered?)")
        if entry.prev_hash != prev:
            problems.append(
                f"line {lineno} (seq {entry.seq}): prev_hash does not match the line before "
                "(a line was removed, inserted or reordered)"
            )
        if entry_hash(fields) != entry.hash:
            problems.append(f"line {lineno} (seq {entry.seq}): content edited (hash mismatch)")
        if patches_dir is not None and entry.patch_ref:
            patch = patches_dir.parent / entry.patch_ref
            if not patch.exists():
                problems.append(f"line {lineno} (seq {entry.seq}): patch {entry.patch_ref} missing")
            elif hashlib.sha256(patch.read_bytes()).hexdigest() != patch.stem:
                problems.append(f"line {lineno} (seq {entry.seq}): patch {entry.patch_ref} edited")
        prev = entry.hash
        hashes[entry.seq] = entry.hash
    for seq, mirrored in anchor:
        if seq not in hashes:
            problems.append(
                f"seq {seq}: recorded in patch_history but missing from the ledger (truncated)"
            )
        elif hashes[seq] != mirrored:
            problems.append(f"seq {seq}: hash differs from patch_history (rewritten)")
    return VerifyReport(entries=len(hashes), problems=problems)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0]

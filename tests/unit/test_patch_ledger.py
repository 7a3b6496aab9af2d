"""core.engine.patch_ledger: hash chain, idempotent appends, and every tamper case located."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import multiprocessing
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.engine.evidence import LocalEvidenceStore
from core.engine.patch_ledger import GENESIS, PatchLedger, entry_hash, verify
from core.identity import TaskKey
from core.models import AttemptResult, DiffSummary, FailureClass, TaskState

COMMIT = "0123456789abcdef0123456789abcdef01234567"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def attempt(
    n: int = 1, state: TaskState = TaskState.COMPLETED, patch: bytes = b""
) -> AttemptResult:
    diff = None
    if patch:
        diff = DiffSummary(
            sha256=hashlib.sha256(patch).hexdigest(),
            bytes=len(patch),
            files_changed=1,
            insertions=2,
            deletions=1,
            empty=False,
        )
    return AttemptResult(
        attempt=n,
        adapter_id="fake",
        state=state,
        failure_class=None if state is TaskState.COMPLETED else FailureClass.GATE_FAILED,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1),
        duration_seconds=1.0,
        diff=diff,
    )


class Paths:
    def __init__(self, root: Path) -> None:
        self.ledger = root / ".state" / "patch_ledger.jsonl"
        self.patches = root / ".ledger" / "patches"
        self.store = LocalEvidenceStore(root / ".ledger")

    def open(self) -> PatchLedger:
        return PatchLedger(self.ledger, self.store)

    def lines(self) -> list[bytes]:
        return self.ledger.read_bytes().splitlines(keepends=True)

    def write_lines(self, lines: list[bytes]) -> None:
        self.ledger.write_bytes(b"".join(lines))


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


def fill(paths: Paths, n: int = 4) -> list:
    ledger = paths.open()
    entries = []
    for i in range(1, n + 1):
        patch = f"diff --git a/f{i} b/f{i}\n+line {i}\n".encode()
        entries.append(
            ledger.append(
                key=TaskKey("run", f"t{i}"), base_commit=COMMIT, result=attempt(), patch=patch
            )
        )
    return entries


def anchor_of(entries: list) -> list[tuple[int, str]]:
    return [(e.seq, e.hash) for e in entries]


# --------------------------------------------------------------------------- happy path


def test_append_and_verify_ok(paths: Paths) -> None:
    entries = fill(paths, 3)
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS
    assert entries[1].prev_hash == entries[0].hash
    assert entries[2].prev_hash == entries[1].hash
    report = verify(paths.ledger, paths.store, anchor=anchor_of(entries))
    assert report.ok, report.problems
    assert report.entries == 3
    assert len(paths.lines()) == 3


def test_each_line_hash_is_over_its_canonical_content(paths: Paths) -> None:
    fill(paths, 2)
    for raw in paths.lines():
        fields = json.loads(raw)
        assert entry_hash(fields) == fields["hash"]


def test_entry_records_diff_summary_and_patch(paths: Paths) -> None:
    ledger = paths.open()
    patch = b"diff --git a/x b/x\n+hi\n"
    entry = ledger.append(
        key=TaskKey("run", "t1"), base_commit=COMMIT, result=attempt(patch=patch), patch=patch
    )
    assert entry.diff_sha256 == hashlib.sha256(patch).hexdigest()
    assert entry.diff_bytes == len(patch)
    assert (entry.files_changed, entry.insertions, entry.deletions) == (1, 2, 1)
    # the full patch is in the evidence store, compressed, under its sha256
    assert entry.patch_ref == f"patches/{hashlib.sha256(patch).hexdigest()}.diff.gz"
    assert gzip.decompress(paths.store.path(entry.patch_ref).read_bytes()) == patch
    assert ledger.read_patch(entry) == patch
    assert entry.base_commit == COMMIT


def test_no_patch_means_no_patch_ref(paths: Paths) -> None:
    entry = paths.open().append(
        key=TaskKey("run", "t1"), base_commit=COMMIT, result=attempt(), patch=None
    )
    assert entry.patch_ref is None
    assert paths.open().read_patch(entry) is None
    assert verify(paths.ledger, paths.store).ok


def test_idempotent_append(paths: Paths) -> None:
    ledger = paths.open()
    first = ledger.append(
        key=TaskKey("run", "t1"), base_commit=COMMIT, result=attempt(1), patch=b"p1\n"
    )
    again = ledger.append(
        key=TaskKey("run", "t1"),
        base_commit=COMMIT,
        result=attempt(1, state=TaskState.FAILED),
        patch=b"other\n",
    )
    assert again == first
    assert len(paths.lines()) == 1
    # A fresh instance (a restarted process) also sees the entry and does not duplicate it.
    replay = paths.open().append(
        key=TaskKey("run", "t1"), base_commit=COMMIT, result=attempt(1), patch=b"p1\n"
    )
    assert replay == first
    assert len(paths.lines()) == 1
    # A new attempt of the same task is a new entry.
    second = ledger.append(
        key=TaskKey("run", "t1"), base_commit=COMMIT, result=attempt(2), patch=None
    )
    assert second.seq == 2
    assert len(paths.lines()) == 2
    assert paths.open().find(TaskKey("run", "t1"), 2) == second
    assert paths.open().find(TaskKey("run", "t1"), 3) is None


def test_same_patch_stored_once(paths: Paths) -> None:
    ledger = paths.open()
    for i in (1, 2):
        ledger.append(
            key=TaskKey("run", f"t{i}"), base_commit=COMMIT, result=attempt(), patch=b"same\n"
        )
    assert len(list(paths.patches.iterdir())) == 1


def test_missing_ledger_verifies_as_empty(paths: Paths) -> None:
    report = verify(paths.ledger, paths.store)
    assert report.ok and report.entries == 0


# --------------------------------------------------------------------------- tamper cases


def test_edited_field_in_middle_line_detected_and_located(paths: Paths) -> None:
    entries = fill(paths, 4)
    lines = paths.lines()
    fields = json.loads(lines[1])
    fields["state"] = "FAILED"
    lines[1] = (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    paths.write_lines(lines)

    report = verify(paths.ledger, paths.store)
    assert not report.ok
    assert report.problems == ["line 2 (seq 2): content edited (hash mismatch)"]
    with_anchor = verify(paths.ledger, paths.store, anchor=anchor_of(entries))
    assert "line 2 (seq 2): content edited (hash mismatch)" in with_anchor.problems


def test_edit_with_recomputed_hash_breaks_the_next_link(paths: Paths) -> None:
    entries = fill(paths, 3)
    lines = paths.lines()
    fields = json.loads(lines[1])
    fields["insertions"] = 999
    fields["hash"] = entry_hash(fields)  # a careful forger recomputes the line's own hash
    lines[1] = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
    paths.write_lines(lines)

    report = verify(paths.ledger, paths.store)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("line 3 (seq 3): prev_hash does not match")
    anchored = verify(paths.ledger, paths.store, anchor=anchor_of(entries))
    assert "seq 2: hash differs from patch_history (rewritten)" in anchored.problems


def test_swapped_lines_detected_and_located(paths: Paths) -> None:
    fill(paths, 4)
    lines = paths.lines()
    lines[1], lines[2] = lines[2], lines[1]
    paths.write_lines(lines)

    report = verify(paths.ledger, paths.store)
    assert not report.ok
    assert "line 2: seq 3, expected 2 (reordered?)" in report.problems
    assert "line 3: seq 2, expected 3 (reordered?)" in report.problems
    assert any(p.startswith("line 2 (seq 3): prev_hash does not match") for p in report.problems)
    assert not any(p.startswith("line 1") or p.startswith("line 4:") for p in report.problems)


def test_deleted_middle_line_detected_and_located(paths: Paths) -> None:
    fill(paths, 4)
    lines = paths.lines()
    del lines[1]
    paths.write_lines(lines)

    report = verify(paths.ledger, paths.store)
    assert not report.ok
    assert "line 2: seq 3, expected 2 (reordered?)" in report.problems
    assert any(p.startswith("line 2 (seq 3): prev_hash does not match") for p in report.problems)
    assert all("line 1" not in p for p in report.problems)


def test_cut_off_tail_needs_the_anchor(paths: Paths) -> None:
    entries = fill(paths, 5)
    paths.write_lines(paths.lines()[:3])

    # The remaining chain is internally valid: without the DB mirror nothing is wrong.
    alone = verify(paths.ledger, paths.store)
    assert alone.ok, alone.problems
    assert alone.entries == 3

    anchored = verify(paths.ledger, paths.store, anchor=anchor_of(entries))
    assert not anchored.ok
    assert anchored.problems == [
        "seq 4: recorded in patch_history but missing from the ledger (truncated)",
        "seq 5: recorded in patch_history but missing from the ledger (truncated)",
    ]


def test_anchor_matching_the_file_is_ok(paths: Paths) -> None:
    entries = fill(paths, 3)
    assert verify(paths.ledger, paths.store, anchor=anchor_of(entries)).ok


def test_torn_last_line_detected(paths: Paths) -> None:
    fill(paths, 3)
    raw = paths.ledger.read_bytes()
    full = paths.lines()
    paths.ledger.write_bytes(raw + full[0][:40])  # a crash in the middle of a write

    report = verify(paths.ledger, paths.store)
    assert report.problems == ["line 4: incomplete last line (torn write or cut file)"]
    assert report.entries == 3
    # Readers ignore the torn line.
    assert [e.seq for e in paths.open().entries()] == [1, 2, 3]


def test_cut_inside_last_line_detected(paths: Paths) -> None:
    fill(paths, 3)
    raw = paths.ledger.read_bytes()
    paths.ledger.write_bytes(raw[:-10])
    report = verify(paths.ledger, paths.store)
    assert "line 3: incomplete last line (torn write or cut file)" in report.problems
    assert report.entries == 2


def test_append_after_torn_line_keeps_a_valid_chain(paths: Paths) -> None:
    """A crash mid-write must not poison the next run's appends (resumability)."""
    fill(paths, 2)
    with open(paths.ledger, "ab") as fh:
        fh.write(b'{"seq":3,"run_id":"run","task')
    ledger = paths.open()
    entry = ledger.append(
        key=TaskKey("run", "t9"), base_commit=COMMIT, result=attempt(), patch=None
    )
    assert entry.seq == 3
    report = verify(paths.ledger, paths.store)
    assert report.ok, report.problems
    assert [e.task_id for e in paths.open().entries()] == ["t1", "t2", "t9"]


def test_garbage_middle_line_detected(paths: Paths) -> None:
    fill(paths, 3)
    lines = paths.lines()
    lines[1] = b"not json at all\n"
    paths.write_lines(lines)
    report = verify(paths.ledger, paths.store)
    assert any(p.startswith("line 2: not a valid ledger entry") for p in report.problems)


def test_edited_patch_file_detected(paths: Paths) -> None:
    entries = fill(paths, 3)
    target = paths.store.path(entries[1].patch_ref)
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes()) + b"+sneaky\n"))

    report = verify(paths.ledger, paths.store)
    assert report.problems == [
        f"line 2 (seq 2): patch {entries[1].patch_ref} edited (content does not match its sha256)"
    ]
    # Without the patches dir, only the chain is checked.
    assert verify(paths.ledger).ok


def test_missing_patch_file_detected(paths: Paths) -> None:
    entries = fill(paths, 3)
    paths.store.path(entries[2].patch_ref).unlink()
    report = verify(paths.ledger, paths.store)
    assert report.problems == [f"line 3 (seq 3): patch {entries[2].patch_ref} missing"]


# --------------------------------------------------------------------------- concurrency


def test_two_instances_interleaving_keep_a_valid_chain(paths: Paths) -> None:
    a, b = paths.open(), paths.open()
    made = []
    for i in range(6):
        ledger = a if i % 2 == 0 else b
        made.append(
            ledger.append(
                key=TaskKey("run", f"t{i}"),
                base_commit=COMMIT,
                result=attempt(),
                patch=f"p{i}\n".encode(),
            )
        )
    assert [e.seq for e in made] == list(range(1, 7))
    for prev, cur in itertools.pairwise(made):
        assert cur.prev_hash == prev.hash
    report = verify(paths.ledger, paths.store, anchor=anchor_of(made))
    assert report.ok, report.problems
    # Each instance sees the other's entries, and does not duplicate them on replay.
    assert a.find(TaskKey("run", "t1"), 1) == made[1]
    assert (
        b.append(key=TaskKey("run", "t0"), base_commit=COMMIT, result=attempt(), patch=b"p0\n")
        == made[0]
    )
    assert len(paths.lines()) == 6


def test_concurrent_threads_with_separate_instances(paths: Paths) -> None:
    per_thread = 15

    def worker(name: str) -> None:
        ledger = paths.open()
        for i in range(per_thread):
            ledger.append(
                key=TaskKey("run", f"{name}-{i}"),
                base_commit=COMMIT,
                result=attempt(),
                patch=None,
            )

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(paths.ledger, paths.store)
    assert report.ok, report.problems
    assert report.entries == 3 * per_thread


def _process_worker(ledger_path: str, patches: str, name: str, n: int) -> None:
    ledger = PatchLedger(Path(ledger_path), LocalEvidenceStore(Path(patches).parent))
    for i in range(n):
        ledger.append(
            key=TaskKey("run", f"{name}-{i}"),
            base_commit=COMMIT,
            result=attempt(),
            patch=f"{name} {i}\n".encode(),
        )


def test_concurrent_processes_keep_a_valid_chain(paths: Paths) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=_process_worker, args=(str(paths.ledger), str(paths.patches), f"p{k}", 10)
        )
        for k in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    report = verify(paths.ledger, paths.store)
    assert report.ok, report.problems
    assert report.entries == 20
    assert {e.task_id for e in paths.open().entries()} == {
        f"p{k}-{i}" for k in range(2) for i in range(10)
    }

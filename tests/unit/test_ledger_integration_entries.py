"""Ledger entries of kind ``integration``: one chain with the attempts, verified the same way."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.engine.patch_ledger import PatchLedger, verify
from core.identity import TaskKey
from core.models import (
    AttemptResult,
    DiffSummary,
    FailureClass,
    IntegrationOutcome,
    IntegrationRecord,
    LedgerEntry,
    TaskState,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HEAD = "f" * 40
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
PATCH = b"diff --git a/x b/x\n+hi\n"
KEY = TaskKey("run", "t1")


def result() -> AttemptResult:
    return AttemptResult(
        attempt=1,
        adapter_id="fake",
        state=TaskState.COMPLETED,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1),
        duration_seconds=1.0,
        diff=DiffSummary(
            sha256=hashlib.sha256(PATCH).hexdigest(),
            bytes=len(PATCH),
            files_changed=1,
            insertions=1,
            deletions=0,
            empty=False,
        ),
    )


def merged(commit: str = HEAD) -> IntegrationRecord:
    return IntegrationRecord(
        outcome=IntegrationOutcome.MERGED,
        branch="orchestrator/integration/run",
        repository="/w/integration/run.git",
        parent_commit=COMMIT,
        commit=commit,
        batch=1,
        gate_runs=1,
    )


def setup(tmp_path: Path) -> tuple[PatchLedger, LedgerEntry, LedgerEntry]:
    ledger = PatchLedger(tmp_path / ".state/patch_ledger.jsonl", tmp_path / ".ledger/patches")
    attempt = ledger.append(key=KEY, base_commit=COMMIT, result=result(), patch=PATCH)
    verdict = ledger.append_integration(
        key=KEY,
        attempt_entry=attempt,
        record=merged(),
        state=TaskState.COMPLETED,
        failure_class=None,
    )
    return ledger, attempt, verdict


def test_an_integration_entry_chains_onto_the_attempts_and_verifies(tmp_path: Path) -> None:
    ledger, attempt, verdict = setup(tmp_path)
    assert verdict.seq == 2 and verdict.prev_hash == attempt.hash
    assert verdict.kind == "integration" and attempt.kind == "attempt"
    assert verdict.patch_ref == attempt.patch_ref and verdict.result == attempt.result
    assert verdict.integration == merged()
    anchor = [(attempt.seq, attempt.hash), (verdict.seq, verdict.hash)]
    report = verify(ledger.path, ledger.patches_dir, anchor)
    assert report.ok and report.entries == 2, report.problems
    # an attempt line has no kind: entries written before kinds existed hash as they did
    first, second = (json.loads(x) for x in ledger.path.read_text().splitlines())
    assert "kind" not in first and second["kind"] == "integration"


def test_the_two_kinds_are_keyed_apart_and_appends_are_idempotent(tmp_path: Path) -> None:
    ledger, attempt, verdict = setup(tmp_path)
    fresh = PatchLedger(ledger.path, ledger.patches_dir)
    assert fresh.find(KEY, 1) == attempt
    assert fresh.find_integration(KEY, 1) == verdict
    # a replay returns the first verdict, the ledger's word: nothing is appended
    again = fresh.append_integration(
        key=KEY,
        attempt_entry=attempt,
        record=merged("e" * 40),
        state=TaskState.PENDING,
        failure_class=FailureClass.MERGE_CONFLICT,
    )
    assert again == verdict and len(ledger.path.read_text().splitlines()) == 2
    assert fresh.append(key=KEY, base_commit=COMMIT, result=result(), patch=PATCH) == attempt


def test_editing_or_cutting_an_integration_entry_is_found(tmp_path: Path) -> None:
    ledger, attempt, verdict = setup(tmp_path)
    anchor = [(attempt.seq, attempt.hash), (verdict.seq, verdict.hash)]
    lines = ledger.path.read_text().splitlines(keepends=True)
    edited = lines[1].replace(HEAD, "e" * 40)
    ledger.path.write_text(lines[0] + edited)
    report = verify(ledger.path, ledger.patches_dir, anchor)
    assert any("content edited" in p for p in report.problems)
    ledger.path.write_text(lines[0])  # the verdict cut off the tail: the anchor notices
    report = verify(ledger.path, ledger.patches_dir, anchor)
    assert any("seq 2" in p and "missing" in p for p in report.problems)

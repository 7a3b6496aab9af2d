"""The whole demo on the embedded backend, on SQLite and on a real PostgreSQL.

Everything is real: git repositories, processes, the database. The checks cross-validate the
outputs against each other: results file, ledger, logs, events and database rows.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.database import make_engine
from core.db.tables import ExecutionLog, PatchHistory, Task
from core.engine.evidence import local_store
from core.engine.patch_ledger import verify
from core.engine.task_log import read_records
from core.models import ExecutionResults, FailureClass, LedgerEntry, TaskState

EXPECTED = {
    "add-multiply": (TaskState.COMPLETED, None),
    "break-subtract": (TaskState.FAILED, FailureClass.GATE_FAILED),
    "tool-crash": (TaskState.FAILED, FailureClass.ADAPTER_ERROR),
    "slow-tool": (TaskState.TIMEOUT, FailureClass.ADAPTER_TIMEOUT),
    "no-change": (TaskState.FAILED, FailureClass.EMPTY_DIFF),
    "update-logo": (TaskState.COMPLETED, None),
    "split-module": (TaskState.COMPLETED, None),
    "human-docs": (TaskState.PENDING, None),
}


def ledger_entries(workdir: Path) -> list[LedgerEntry]:
    path = workdir / ".state/patch_ledger.jsonl"
    return [LedgerEntry.model_validate_json(line) for line in path.read_text().splitlines()]


def db_counts(db_url: str) -> dict[str, int]:
    engine = make_engine(db_url)
    with Session(engine) as s:
        counts = {
            "tasks": s.scalar(select(func.count()).select_from(Task)) or 0,
            "execution_log": s.scalar(select(func.count()).select_from(ExecutionLog)) or 0,
            "patch_history": s.scalar(select(func.count()).select_from(PatchHistory)) or 0,
        }
    engine.dispose()
    return counts


def snapshot(workdir: Path, db_url: str) -> dict[str, object]:
    """Everything that must not grow when a run is replayed."""
    return {
        **db_counts(db_url),
        "ledger": (workdir / ".state/patch_ledger.jsonl").read_text(),
        "events": (workdir / "logs/executor.jsonl").read_text(),
    }


def assert_consistent(workdir: Path, db_url: str, repo_root: Path) -> ExecutionResults:
    raw = json.loads((workdir / ".state/execution_results.json").read_text())
    schema = json.loads((repo_root / "schema/execution_results.schema.json").read_text())
    jsonschema.validate(raw, schema)
    results = ExecutionResults.model_validate(raw)

    entries = ledger_entries(workdir)
    engine = make_engine(db_url)
    with Session(engine) as s:
        history = s.scalars(select(PatchHistory).order_by(PatchHistory.seq)).all()
        rows = {r.task_id: r for r in s.scalars(select(Task))}
        events = s.scalars(select(ExecutionLog).order_by(ExecutionLog.id)).all()
    engine.dispose()

    # ledger <-> patch_history: same entries, same hashes, chain intact
    assert [(h.seq, h.entry_hash) for h in history] == [(e.seq, e.hash) for e in entries]
    report = verify(
        workdir / ".state/patch_ledger.jsonl",
        local_store(workdir),
        [(h.seq, h.entry_hash) for h in history],
    )
    assert report.ok, report.problems

    # results <-> tasks rows <-> ledger: one ledger entry per recorded attempt
    per_task = Counter(e.task_id for e in entries)
    for result in results.tasks:
        row = rows[result.task_id]
        assert row.status == result.state.value
        assert row.attempts == len(result.attempts) == per_task.get(result.task_id, 0)
        for attempt, entry in zip(
            result.attempts, [e for e in entries if e.task_id == result.task_id], strict=True
        ):
            assert entry.result == attempt
            if attempt.diff and not attempt.diff.empty:
                assert entry.diff_sha256 == attempt.diff.sha256

    # events: DB and JSONL agree, exactly one start per attempt and one end per terminal task
    jsonl = [
        json.loads(line) for line in (workdir / "logs/executor.jsonl").read_text().splitlines()
    ]
    assert [e["event_key"] for e in jsonl] == [e.event_key for e in events]
    kinds = Counter((e.task_id, e.event) for e in events)
    for result in results.tasks:
        assert kinds[(result.task_id, "TASK_STARTED")] == len(result.attempts)
        ends = kinds[(result.task_id, "TASK_COMPLETED")] + kinds[(result.task_id, "TASK_FAILED")]
        assert ends == (1 if result.state.terminal else 0)
    return results


def test_demo_outcomes_and_outputs_agree(make_executor, demo_dir, db_url, repo_root):
    executor = make_executor()
    results = executor.run()

    assert {t.task_id: (t.state, t.failure_class) for t in results.tasks} == EXPECTED
    assert results.finished is False  # the manual task waits for a human
    assert results.summary["COMPLETED"] == 3 and results.summary["total"] == 8
    # attempt dirs are deleted in the background (core.engine.janitor), but a finished run
    # has waited for them: nothing is left in the trash
    trash = demo_dir / ".work" / "trash"
    assert not trash.exists() or list(trash.iterdir()) == []
    by_id = {t.task_id: t for t in results.tasks}

    # gate: pre-existing failure not blamed; the failing check is named
    gate = by_id["add-multiply"].attempts[0].gate
    assert gate is not None and gate.passed and gate.applied
    statuses = {c.name: c.status.value for c in gate.checks}
    assert statuses == {
        "compile": "passed",
        "import": "passed",
        "unit-tests": "passed",
        "docs-no-todo": "pre_existing",
    }
    broken = by_id["break-subtract"].attempts[0].gate
    assert broken is not None and broken.failed_checks == ["unit-tests"]
    assert "AssertionError" in broken.checks[2].output_tail

    # timeout: partial output and partial diff are kept
    slow = by_id["slow-tool"].attempts[0]
    assert slow.timed_out and slow.diff is not None
    assert [f.path for f in slow.diff.files] == ["docs/draft.md"]
    lines = [r.get("line", "") for r in read_records(demo_dir / "logs/execution/slow-tool.jsonl")]
    assert any("thinking (1s)" in line for line in lines)
    assert not any("done" in line for line in lines)

    # binary change, rename with a space and non-ASCII name
    logo = by_id["update-logo"].attempts[0].diff
    assert logo is not None and logo.binary_files == 1 and logo.files[0].binary
    split = by_id["split-module"].attempts[0].diff
    assert split is not None
    renamed = [f for f in split.files if f.status == "renamed"]
    assert [(f.old_path, f.path) for f in renamed] == [
        ("docs/README.md", "docs/Über die Module.md")
    ]

    # the manual task wrote instructions and says how to continue
    human = by_id["human-docs"]
    assert human.attempts == [] and human.wait_reason and "manual submit" in human.wait_reason
    assert (demo_dir / "manual/demo/human-docs/INSTRUCTIONS.md").exists()

    # nothing left behind: worktrees are removed after each attempt
    assert not (demo_dir / ".work/demo").exists() or not any(
        (demo_dir / ".work/demo").rglob("tree")
    )

    assert_consistent(demo_dir, db_url, repo_root)

    exposition = generate_latest(executor.metrics.registry).decode()
    for name in (
        "tasks_executed_total",
        "task_success_rate",
        "task_duration_seconds",
        "acceptance_test_pass_rate",
        "executor_heartbeat",
    ):
        assert name in exposition
    assert 'tasks_executed_total{adapter="patch",state="COMPLETED"} 2.0' in exposition


def test_replaying_a_finished_run_changes_nothing(make_executor, demo_dir, db_url, repo_root):
    make_executor().run()
    before = snapshot(demo_dir, db_url)
    again = make_executor().run()
    assert snapshot(demo_dir, db_url) == before
    assert {t.task_id: t.state for t in again.tasks} == {k: v[0] for k, v in EXPECTED.items()}
    assert_consistent(demo_dir, db_url, repo_root)


def test_resume_after_stopping_part_way(make_executor, demo_dir, db_url, repo_root):
    first = make_executor(max_tasks=2).run()
    assert [t.state for t in first.tasks[:2]] == [TaskState.COMPLETED, TaskState.FAILED]
    assert all(t.state is TaskState.PENDING for t in first.tasks[2:])
    assert len(ledger_entries(demo_dir)) == 2

    second = make_executor().run()
    assert {t.task_id: (t.state, t.failure_class) for t in second.tasks} == EXPECTED
    assert len(ledger_entries(demo_dir)) == 7
    assert_consistent(demo_dir, db_url, repo_root)


def test_manual_patch_completes_the_run_once(make_executor, demo_dir, db_url, repo_root, tmp_path):
    make_executor().run()
    task = json.loads((demo_dir / ".state/task_queue.json").read_text())["tasks"][-1]
    patch = (
        "--- a/docs/README.md\n+++ b/docs/README.md\n@@ -1,3 +1,3 @@\n # calc\n \n"
        "-TODO: write the documentation.\n+calc offers add and sub.\n"
    )
    submitted = demo_dir / "manual/demo/human-docs/submitted.diff"
    submitted.write_text(patch)
    assert task["task_id"] == "human-docs"

    results = make_executor().run()
    assert results.finished
    human = {t.task_id: t for t in results.tasks}["human-docs"]
    assert human.state is TaskState.COMPLETED and human.attempts[0].adapter_id == "human"
    make_executor().run()  # a finished run stays finished, EXECUTION_FINISHED is not repeated
    events = [
        json.loads(x)["event"] for x in (demo_dir / "logs/executor.jsonl").read_text().splitlines()
    ]
    assert events.count("EXECUTION_FINISHED") == 1
    assert_consistent(demo_dir, db_url, repo_root)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_changed_spec_of_a_started_task_is_refused(make_executor, demo_dir, db_url):
    make_executor(max_tasks=1).run()
    queue_path = demo_dir / ".state/task_queue.json"
    queue = json.loads(queue_path.read_text())
    queue["tasks"][0]["prompt"] = "something else"
    queue_path.write_text(json.dumps(queue))
    with pytest.raises(Exception, match=r"changed in task_queue\.json after it started"):
        make_executor().run()
    assert db_counts(db_url)["patch_history"] == 1

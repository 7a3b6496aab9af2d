"""The invariant checker's rules (core/testing/invariants.py) on hand-built snapshots.

A consistent snapshot passes; each test then breaks one record the way a crash or a double
write would and asserts that the checker names the object and the rule, and counts it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from core.models import AttemptResult, DiffSummary, LedgerEntry, TaskState
from core.testing.invariants import Snapshot, check, orphans

BASE = "d143d8712a637d59f8cf0c2dc6a5dee0e71fa9cd"
T = datetime(2026, 1, 1, tzinfo=UTC)
NS = "chaos"
SHA = "ab" * 32


def _te(name: str, uid: str, state: str, attempts: list[tuple[str, bool]]) -> dict[str, Any]:
    """attempts: (attempt state, had a gate Job)"""
    return {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {"name": name, "namespace": NS, "uid": uid},
        "spec": {"runId": "chaos"},
        "status": {
            "state": state,
            "attempt": len(attempts),
            "attempts": [
                {
                    "attempt": n,
                    "adapter": "patch",
                    "state": s,
                    "jobName": f"{name}-{n}a",
                    **({"gateJobName": f"{name}-{n}g"} if gate else {}),
                }
                for n, (s, gate) in enumerate(attempts, start=1)
            ],
        },
    }


def _job(te: dict[str, Any], attempt: int, role: str, uid: str = "") -> dict[str, Any]:
    name = te["metadata"]["name"]
    return {
        "metadata": {
            "name": f"{name}-{attempt}{role[0]}",
            "namespace": NS,
            "uid": uid or f"job-{name}-{attempt}-{role}",
            "labels": {
                "app.kubernetes.io/managed-by": "orchestrator",
                "orchestrator.dev/attempt": str(attempt),
                "orchestrator.dev/role": role,
            },
            "ownerReferences": [{"kind": "TaskExecution", "uid": te["metadata"]["uid"]}],
        }
    }


def _event(te: dict[str, Any], reason: str, n: int) -> dict[str, Any]:
    meta = te["metadata"]
    return {
        "metadata": {"name": f"{meta['name']}.{reason}.{n}", "namespace": NS, "uid": f"ev{n}"},
        "involvedObject": {"kind": "TaskExecution", "name": meta["name"], "uid": meta["uid"]},
        "reason": reason,
        "count": 1,
    }


def _result(attempt: int, state: str, *, final: bool, diff: bool) -> AttemptResult:
    return AttemptResult(
        attempt=attempt,
        adapter_id="patch",
        state=TaskState(state),
        failure_class=None if state == "COMPLETED" else "gate_failed",  # type: ignore[arg-type]
        exit_code=0,
        started_at=T,
        finished_at=T,
        duration_seconds=1.0,
        diff=DiffSummary(
            sha256=SHA,
            bytes=10,
            files_changed=1,
            insertions=1,
            deletions=0,
            empty=False,
            patch_ref=f"patches/{SHA}.diff.gz",
        )
        if diff
        else None,
        final=final,
    )


def _entry(seq: int, uid: str, name: str, result: AttemptResult) -> LedgerEntry:
    return LedgerEntry(
        seq=seq,
        run_id="chaos",
        task_id=name,
        task_uid=uid,
        scope=NS,
        attempt=result.attempt,
        adapter_id="patch",
        base_commit=BASE,
        state=result.state,
        diff_sha256=SHA if result.diff else None,
        patch_ref=result.diff.patch_ref if result.diff else None,
        result=result,
        recorded_at=T,
        prev_hash="0" * 64,
        hash=f"{seq:064d}",
    )


def consistent() -> Snapshot:
    """Two tasks: one COMPLETED at the first attempt, one FAILED after a retry."""
    done = _te("done", "u1", "COMPLETED", [("COMPLETED", True)])
    failed = _te("failed", "u2", "FAILED", [("FAILED", False), ("FAILED", True)])
    r1 = _result(1, "COMPLETED", final=True, diff=True)
    r2a = _result(1, "FAILED", final=False, diff=False)
    r2b = _result(2, "FAILED", final=True, diff=True)
    ledger = [
        _entry(1, "u1", "done", r1),
        _entry(2, "u2", "failed", r2a),
        _entry(3, "u2", "failed", r2b),
    ]
    db_events = [
        {
            "event_key": "k1",
            "task_uid": "u1",
            "attempt": 1,
            "event": "TASK_STARTED",
            "state": "IN_PROGRESS",
        },
        {
            "event_key": "k2",
            "task_uid": "u1",
            "attempt": 1,
            "event": "TASK_COMPLETED",
            "state": "COMPLETED",
        },
        {
            "event_key": "k3",
            "task_uid": "u2",
            "attempt": 1,
            "event": "TASK_STARTED",
            "state": "IN_PROGRESS",
        },
        {
            "event_key": "k4",
            "task_uid": "u2",
            "attempt": 1,
            "event": "ATTEMPT_FAILED",
            "state": "PENDING",
        },
        {
            "event_key": "k5",
            "task_uid": "u2",
            "attempt": 2,
            "event": "TASK_STARTED",
            "state": "IN_PROGRESS",
        },
        {
            "event_key": "k6",
            "task_uid": "u2",
            "attempt": 2,
            "event": "TASK_FAILED",
            "state": "FAILED",
        },
    ]
    jobs = [
        _job(done, 1, "adapter"),
        _job(done, 1, "gate"),
        _job(failed, 1, "adapter"),
        _job(failed, 2, "adapter"),
        _job(failed, 2, "gate"),
    ]
    return Snapshot(
        task_executions=[done, failed],
        jobs_seen=jobs,
        jobs=jobs,
        events_seen=[
            _event(done, "TASK_STARTED", 1),
            _event(done, "TASK_COMPLETED", 2),
            _event(failed, "TASK_STARTED", 3),
            _event(failed, "TASK_STARTED", 4),
            _event(failed, "TASK_FAILED", 5),
        ],
        db_tasks=[
            {
                "uid": "u1",
                "scope": NS,
                "task_id": "done",
                "status": "COMPLETED",
                "attempts": 1,
                "result": {"attempts": [r1.model_dump(mode="json")]},
            },
            {
                "uid": "u2",
                "scope": NS,
                "task_id": "failed",
                "status": "FAILED",
                "attempts": 2,
                "result": {"attempts": [r2a.model_dump(mode="json"), r2b.model_dump(mode="json")]},
            },
        ],
        db_events=db_events,
        jsonl_events=[dict(e) for e in db_events],
        patch_history=[
            {"task_uid": e.task_uid, "attempt": e.attempt, "entry_hash": e.hash} for e in ledger
        ],
        ledger=ledger,
        task_logs={
            f"{NS}.done.u1": [{"event": "adapter_log_saved", "attempt": 1}],
            f"{NS}.failed.u2": [
                {"event": "adapter_log_saved", "attempt": 1},
                {"event": "adapter_log_saved", "attempt": 2},
            ],
        },
        evidence={f"patches/{SHA}.diff.gz": None},
    )


def test_a_consistent_snapshot_passes() -> None:
    report = check(consistent(), expected_uids=["u1", "u2"])
    assert report.violations == []
    assert (report.tasks, report.lost, report.duplicated, report.stuck) == (2, 0, 0, 0)
    assert report.ok


def _only(report: Any, fragment: str) -> None:
    assert any(fragment in v for v in report.violations), report.violations


def test_a_task_that_never_ended_is_stuck() -> None:
    snap = consistent()
    te = snap.task_executions[0]
    te["status"]["state"] = "IN_PROGRESS"
    report = check(snap)
    assert report.stuck == 1
    _only(report, "chaos/done (uid u1): not terminal: status.state IN_PROGRESS")


def test_a_missing_row_and_a_disagreeing_row_are_lost() -> None:
    snap = consistent()
    report = check(replace(snap, db_tasks=[snap.db_tasks[1]]))
    assert report.lost == 1
    _only(report, "chaos/done (uid u1): no row in the tasks table")
    rows = [dict(snap.db_tasks[0], status="FAILED"), snap.db_tasks[1]]
    report = check(replace(snap, db_tasks=rows))
    _only(report, "tasks row says FAILED, status.state says COMPLETED")


def test_end_event_twice_in_the_database_or_the_cluster_is_duplicated() -> None:
    snap = consistent()
    extra = {
        "event_key": "k2b",
        "task_uid": "u1",
        "attempt": 1,
        "event": "TASK_COMPLETED",
        "state": "COMPLETED",
    }
    report = check(
        replace(snap, db_events=[*snap.db_events, extra], jsonl_events=[*snap.jsonl_events, extra])
    )
    assert report.duplicated == 1
    _only(report, "chaos/done (uid u1): 2 end events in execution_log")
    te = snap.task_executions[0]
    report = check(replace(snap, events_seen=[*snap.events_seen, _event(te, "TASK_COMPLETED", 9)]))
    assert report.duplicated == 1
    _only(report, "end Events posted 2 times")


def test_a_missing_kubernetes_event_is_lost() -> None:
    snap = consistent()
    events = [e for e in snap.events_seen if e["reason"] != "TASK_FAILED"]
    report = check(replace(snap, events_seen=events))
    assert report.lost == 1
    _only(report, "chaos/failed (uid u2): no TASK_COMPLETED/TASK_FAILED Kubernetes Event")
    events = [e for e in snap.events_seen if e["metadata"]["uid"] != "ev4"]
    report = check(replace(snap, events_seen=events))
    _only(report, "1 TASK_STARTED Events for 2 attempt(s)")


def test_a_second_job_for_one_attempt_and_role_is_duplicated() -> None:
    snap = consistent()
    te = snap.task_executions[0]
    again = _job(te, 1, "adapter", uid="another-uid")
    report = check(replace(snap, jobs_seen=[*snap.jobs_seen, again]))
    assert report.duplicated == 1
    _only(report, "chaos/done (uid u1): 2 adapter Jobs for attempt 1")
    stray = _job(te, 2, "adapter")
    report = check(replace(snap, jobs_seen=[*snap.jobs_seen, stray]))
    _only(report, "of attempt 2 is not in status.attempts")


def test_ledger_entries_attempts_and_patch_history_must_agree() -> None:
    snap = consistent()
    report = check(
        replace(snap, ledger=list(snap.ledger[:2]), patch_history=list(snap.patch_history[:2]))
    )
    assert report.lost == 1
    _only(report, "chaos/failed (uid u2): ledger attempts [1], tasks row attempts [1, 2]")
    twice = snap.ledger[0].model_copy(update={"seq": 4, "hash": "f" * 64})
    report = check(replace(snap, ledger=[*snap.ledger, twice]))
    assert report.duplicated == 1
    _only(report, "2 ledger entries for attempt 1")
    report = check(replace(snap, patch_history=list(snap.patch_history[:2])))
    _only(report, "patch_history attempts [1], ledger attempts [1, 2]")


def test_evidence_log_and_patch_must_be_there() -> None:
    snap = consistent()
    logs = dict(snap.task_logs)
    logs[f"{NS}.done.u1"] = []
    report = check(replace(snap, task_logs=logs))
    _only(report, "attempt 1: the adapter reported, its log is not in")
    report = check(replace(snap, evidence={f"patches/{SHA}.diff.gz": "missing"}))
    _only(report, f"attempt 1: patch patches/{SHA}.diff.gz missing")


def test_event_log_duplicates_and_gaps() -> None:
    snap = consistent()
    report = check(replace(snap, jsonl_events=[*snap.jsonl_events, snap.jsonl_events[0]]))
    _only(report, "logs/executor.jsonl: event k1 2 times")
    report = check(replace(snap, jsonl_events=list(snap.jsonl_events[1:])))
    _only(report, "logs/executor.jsonl: lacks k1 (in execution_log)")


def test_a_task_execution_that_vanished_is_lost_and_ledger_problems_are_named() -> None:
    snap = consistent()
    report = check(snap, expected_uids=["u1", "u2", "u3"])
    assert report.lost == 1
    _only(report, "TaskExecution uid u3: created by the run, gone from the cluster")
    report = check(replace(snap, ledger_problems=["line 2 (seq 2): content edited"]))
    _only(report, "ledger verify: line 2 (seq 2): content edited")


@pytest.mark.parametrize("kind", ["jobs", "configmaps"])
def test_objects_whose_task_execution_is_gone_are_orphans(kind: str) -> None:
    snap = consistent()
    gone = _te("gone", "u9", "COMPLETED", [("COMPLETED", False)])
    obj = _job(gone, 1, "adapter")
    obj["metadata"]["name"] = "gone-cm"
    found = orphans(replace(snap, **{kind: [*getattr(snap, kind), obj]}))
    assert found == [
        f"{'Job' if kind == 'jobs' else 'ConfigMap'} chaos/gone-cm: orphan, its "
        "TaskExecution u9 is gone"
    ]


def test_a_runner_pod_whose_job_is_gone_is_an_orphan() -> None:
    snap = consistent()
    pod = {
        "metadata": {
            "name": "p",
            "namespace": NS,
            "labels": {"app.kubernetes.io/managed-by": "orchestrator"},
            "ownerReferences": [{"kind": "Job", "uid": "deleted-job"}],
        }
    }
    assert orphans(replace(snap, pods=[pod])) == ["Pod chaos/p: orphan, its Job is gone"]
    assert orphans(snap) == []


def _crashy(snap: Snapshot, failures: int, *, in_flight: int = 0, **row: Any) -> Snapshot:
    """``snap`` where task u2's two failed attempts were a crashing adapter's (counted) and
    its breaker row says ``failures``."""
    ledger = [
        e.model_copy(update={"adapter_id": "crashy", "failure_class": "adapter_error"})
        if e.task_uid == "u2"
        else e
        for e in snap.ledger
    ]
    adapters = [
        {"scope": NS, "id": "patch", "breaker_state": "CLOSED", "breaker_failures": 0},
        {
            "scope": NS,
            "id": "crashy",
            "breaker_state": "CLOSED",
            "breaker_failures": failures,
            "breaker_half_open_in_flight": in_flight,
            "breaker_tripped_at": None,
            **row,
        },
    ]
    return replace(snap, ledger=ledger, db_adapters=adapters)


def test_a_breaker_that_counted_each_failure_once_passes() -> None:
    report = check(_crashy(consistent(), 2))
    assert report.violations == [] and report.ok


def test_a_failure_counted_twice_by_the_breaker_is_a_duplicate() -> None:
    report = check(_crashy(consistent(), 3))
    assert report.duplicated == 1
    _only(report, "adapter chaos/crashy breaker: 3 failures, 2 counted attempts recorded")


def test_a_failure_the_breaker_never_saw_is_lost_for_an_adapter_that_never_succeeded() -> None:
    report = check(_crashy(consistent(), 1))
    assert report.lost == 1
    _only(report, "adapter chaos/crashy breaker: 1 failures, 2 counted attempts recorded")
    # after a success the consecutive count restarts: fewer is no violation there
    snap = _crashy(consistent(), 0)
    success = snap.ledger[0].model_copy(update={"adapter_id": "crashy"})  # task u1's attempt
    assert check(replace(snap, ledger=[success, *snap.ledger[1:]])).violations == []


def test_a_breaker_that_tripped_is_not_held_to_the_count() -> None:
    report = check(_crashy(consistent(), 0, breaker_state="OPEN", breaker_tripped_at=T))
    assert report.violations == []


def test_a_trial_slot_held_after_every_task_ended_is_a_violation() -> None:
    report = check(_crashy(consistent(), 2, in_flight=1))
    assert report.lost == 1
    _only(report, "adapter chaos/crashy breaker: 1 trial slot(s) held with every task terminal")

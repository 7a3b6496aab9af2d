"""Crash-recovery planning, applying a plan, and POSIX process-group handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from core.engine.resilience.classification import Classification
from core.engine.resilience.recovery import (
    InterruptedAttempt,
    KillProcessGroup,
    PosixProcessGroups,
    RecordInterruptedAttempt,
    RecoveryPlan,
    RemoveWorktree,
    ResumeTask,
    apply_plan,
    plan_recovery,
)
from core.engine.resilience.retry import AdapterChain, decide_retry
from core.models import FailureClass, RetryPolicy, TaskState


@dataclass
class FakeMachine:
    """Processes and worktrees as sets; records what was done to them."""

    alive: set[int] = field(default_factory=set)
    worktrees: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    fail_kill: set[int] = field(default_factory=set)

    def process_group_alive(self, pgid: int) -> bool:
        return pgid in self.alive

    def worktree_exists(self, path: str) -> bool:
        return path in self.worktrees

    def kill_process_group(self, pgid: int) -> None:
        if pgid in self.fail_kill:
            raise PermissionError(f"cannot signal {pgid}")
        self.log.append(f"kill {pgid}")
        self.alive.discard(pgid)

    def remove_worktree(self, path: str) -> None:
        self.log.append(f"rm {path}")
        self.worktrees.discard(path)


def found(task: str = "t1", **kw: object) -> InterruptedAttempt:
    base: dict[str, object] = {
        "task_id": task,
        "state": TaskState.IN_PROGRESS,
        "attempt": 2,
        "adapter_id": "aider",
        "pid": 4242,
        "worktree": f"/work/wt/{task}-2",
    }
    base.update(kw)
    return InterruptedAttempt(**base)  # type: ignore[arg-type]


def test_full_cleanup_plan_in_order() -> None:
    machine = FakeMachine(alive={4242}, worktrees={"/work/wt/t1-2"})
    plan = plan_recovery([found()], machine)
    kinds = [type(a) for a in plan.actions]
    assert kinds == [KillProcessGroup, RemoveWorktree, RecordInterruptedAttempt, ResumeTask]
    record = plan.actions[2]
    assert isinstance(record, RecordInterruptedAttempt)
    c = record.outcome.classification
    assert c.failure_class is FailureClass.INFRASTRUCTURE
    assert not c.counts_against_adapter
    assert "attempt 2 interrupted" in c.message and "running" in c.message
    assert (record.outcome.attempt, record.outcome.adapter_id) == (2, "aider")
    assert machine.log == []  # planning has no side effects


def test_dead_process_and_missing_worktree_are_not_touched() -> None:
    plan = plan_recovery([found()], FakeMachine())
    assert [type(a) for a in plan.actions] == [RecordInterruptedAttempt, ResumeTask]


def test_existing_ledger_entry_is_not_duplicated() -> None:
    recorded = Classification.success()
    plan = plan_recovery([found(ledger_classification=recorded)], FakeMachine())
    (resume,) = plan.actions
    assert isinstance(resume, ResumeTask)
    assert resume.from_ledger and resume.outcome.classification == recorded


def test_pgid_preferred_and_dangerous_groups_never_killed() -> None:
    machine = FakeMachine(alive={0, 1, 77, 4242})
    plan = plan_recovery(
        [found("a", pgid=77), found("b", pid=1), found("c", pid=0), found("d", pid=None)],
        machine,
    )
    kills = [a for a in plan.actions if isinstance(a, KillProcessGroup)]
    assert kills == [KillProcessGroup("a", 77)]


def test_validating_tasks_are_recovered_and_others_skipped() -> None:
    plan = plan_recovery(
        [found("v", state=TaskState.VALIDATING), found("p", state=TaskState.PENDING)],
        FakeMachine(),
    )
    assert {a.task_id for a in plan.actions} == {"v"}
    assert plan.skipped == ("p: state PENDING needs no recovery",)
    record = plan.for_task("v")[0]
    assert isinstance(record, RecordInterruptedAttempt)
    assert "validating" in record.outcome.classification.message


def test_apply_runs_actions_and_recovery_is_idempotent() -> None:
    machine = FakeMachine(alive={4242}, worktrees={"/work/wt/t1-2"})
    ledger: dict[tuple[str, int], Classification] = {}
    resumed: list[ResumeTask] = []

    def record(action: RecordInterruptedAttempt) -> None:
        key = (action.task_id, action.outcome.attempt)
        assert key not in ledger, "duplicate ledger entry"
        ledger[key] = action.outcome.classification

    report = apply_plan(
        plan_recovery([found()], machine), machine, record=record, resume=resumed.append
    )
    assert report.ok and len(report.done) == 4
    assert machine.log == ["kill 4242", "rm /work/wt/t1-2"]
    assert len(resumed) == 1 and not resumed[0].from_ledger
    # the executor dies again before the task left IN_PROGRESS: run recovery once more
    again = plan_recovery([found(ledger_classification=ledger[("t1", 2)])], machine)
    report2 = apply_plan(again, machine, record=record, resume=resumed.append)
    assert report2.ok
    assert [type(a) for a in again.actions] == [ResumeTask]
    assert machine.log == ["kill 4242", "rm /work/wt/t1-2"]
    assert len(ledger) == 1


def test_failed_action_skips_rest_of_that_task_only() -> None:
    machine = FakeMachine(alive={10, 20}, fail_kill={10})
    resumed: list[str] = []
    plan = plan_recovery([found("a", pid=10), found("b", pid=20)], machine)
    report = apply_plan(
        plan, machine, record=lambda a: None, resume=lambda a: resumed.append(a.task_id)
    )
    assert not report.ok
    (failed_action, message) = report.errors[0]
    assert failed_action == KillProcessGroup("a", 10)
    assert "PermissionError" in message
    assert resumed == ["b"]  # never resume a task whose process may still run


def test_resumed_outcome_feeds_retry_policy() -> None:
    plan = plan_recovery([found(attempt=1)], FakeMachine())
    resume = plan.actions[-1]
    assert isinstance(resume, ResumeTask)
    policy = RetryPolicy(max_attempts=3, jitter_seconds=0)
    decision = decide_retry(
        policy, AdapterChain.of("aider", ["claude"]), [resume.outcome], remaining_seconds=600
    )
    assert decision.retry and decision.next_adapter_id == "aider" and decision.next_attempt == 2


def test_empty_plan() -> None:
    assert plan_recovery([], FakeMachine()) == RecoveryPlan(())


# --------------------------------------------------------------------------- real processes

_READY = "import signal, sys, time\n{setup}\nprint('ready', flush=True)\ntime.sleep(60)\n"


def _spawn(setup: str = "") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _READY.format(setup=setup)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


class Ticks:
    """A monotonic clock advancing one second per reading, so grace periods pass instantly."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_posix_group_alive_and_terminated() -> None:
    proc = _spawn()

    def reap(_: float) -> None:  # the "sleep" between polls reaps the zombie instead
        proc.poll()

    groups = PosixProcessGroups(grace_seconds=30, sleep=reap, clock=Ticks())
    try:
        assert groups.process_group_alive(proc.pid)
        groups.kill_process_group(proc.pid)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert not groups.process_group_alive(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_posix_escalates_to_sigkill_after_grace() -> None:
    proc = _spawn("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    naps: list[float] = []
    groups = PosixProcessGroups(grace_seconds=3, sleep=naps.append, clock=Ticks())
    try:
        groups.kill_process_group(proc.pid)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert naps  # it polled (with the injected sleep) before escalating
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_posix_missing_group() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    groups = PosixProcessGroups(sleep=lambda s: None)
    assert not groups.process_group_alive(proc.pid)
    groups.kill_process_group(proc.pid)  # no error for a group that is gone


@pytest.mark.parametrize("pgid", [0, 1, -5])
def test_interrupted_attempt_never_yields_unsafe_group(pgid: int) -> None:
    assert found(pgid=pgid, pid=None).process_group is None

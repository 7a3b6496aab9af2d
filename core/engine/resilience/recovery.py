"""Crash recovery: what to do with tasks a previous executor left IN_PROGRESS or VALIDATING.

Why a plan: recovery runs once at start-up, touches processes, files, the DB and the ledger,
and must be safe to run twice (the executor may die again mid-recovery). Splitting it into a
pure :func:`plan_recovery` (facts in, actions out) and a small :func:`apply_plan` that runs
each action through injected callables makes every branch unit-testable and the whole thing
idempotent: killing a dead group, removing a missing worktree and recording an attempt whose
ledger entry exists are all skipped by the planner.

Per interrupted task, in order:

1. kill the attempt's process group if it is still alive (adapter or gate);
2. remove its worktree if it still exists;
3. if the ledger has no entry for the attempt, record it as ``infrastructure`` ("interrupted");
   if it has one, the attempt finished and its recorded outcome stands (no second entry);
4. resume the task: feed that outcome into the normal retry decision (``decide_retry``), which
   puts the task back to PENDING or ends it under its policy.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from core.engine.resilience.classification import Classification
from core.engine.resilience.retry import AttemptOutcome
from core.models import FailureClass, TaskState

logger = logging.getLogger(__name__)

RECOVERABLE_STATES = frozenset({TaskState.IN_PROGRESS, TaskState.VALIDATING})


@dataclass(frozen=True, slots=True)
class InterruptedAttempt:
    """A task found IN_PROGRESS/VALIDATING at start-up, with what was recorded about it."""

    task_id: str
    state: TaskState
    attempt: int
    adapter_id: str
    pid: int | None = None
    #: The attempt's process group; the spawner starts a new session, so it defaults to pid.
    pgid: int | None = None
    worktree: str | None = None
    #: The outcome recorded in the ledger entry of this attempt; None: no entry exists.
    ledger_classification: Classification | None = None

    @property
    def process_group(self) -> int | None:
        group = self.pgid if self.pgid is not None else self.pid
        return group if group is not None and group > 1 else None


@dataclass(frozen=True, slots=True)
class KillProcessGroup:
    task_id: str
    pgid: int


@dataclass(frozen=True, slots=True)
class RemoveWorktree:
    task_id: str
    path: str


@dataclass(frozen=True, slots=True)
class RecordInterruptedAttempt:
    """Write the attempt's ledger entry, DB row and TASK_FAILED-style event (once)."""

    task_id: str
    outcome: AttemptOutcome


@dataclass(frozen=True, slots=True)
class ResumeTask:
    """Continue the task under its policy as if ``outcome`` had just been observed."""

    task_id: str
    from_state: TaskState
    outcome: AttemptOutcome
    from_ledger: bool


RecoveryAction = KillProcessGroup | RemoveWorktree | RecordInterruptedAttempt | ResumeTask


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    actions: tuple[RecoveryAction, ...]
    skipped: tuple[str, ...] = ()

    def for_task(self, task_id: str) -> tuple[RecoveryAction, ...]:
        return tuple(a for a in self.actions if a.task_id == task_id)


class RecoveryProbe(Protocol):
    """Read-only questions the planner asks about the machine."""

    def process_group_alive(self, pgid: int) -> bool: ...

    def worktree_exists(self, path: str) -> bool: ...


class RecoveryEnvironment(RecoveryProbe, Protocol):
    """The probe plus the two side effects recovery performs itself."""

    def kill_process_group(self, pgid: int) -> None: ...

    def remove_worktree(self, path: str) -> None: ...


def interrupted_classification(found: InterruptedAttempt) -> Classification:
    where = "validating" if found.state is TaskState.VALIDATING else "running"
    return Classification.failure(
        FailureClass.INFRASTRUCTURE,
        f"attempt {found.attempt} interrupted: the executor stopped while it was {where}",
    )


def plan_recovery(tasks: Sequence[InterruptedAttempt], probe: RecoveryProbe) -> RecoveryPlan:
    """The actions that reconcile ``tasks``; tasks in other states are skipped."""
    actions: list[RecoveryAction] = []
    skipped: list[str] = []
    for found in sorted(tasks, key=lambda t: t.task_id):
        if found.state not in RECOVERABLE_STATES:
            skipped.append(f"{found.task_id}: state {found.state} needs no recovery")
            continue
        group = found.process_group
        if group is not None and probe.process_group_alive(group):
            actions.append(KillProcessGroup(found.task_id, group))
        if found.worktree and probe.worktree_exists(found.worktree):
            actions.append(RemoveWorktree(found.task_id, found.worktree))
        recorded = found.ledger_classification
        classification = recorded if recorded is not None else interrupted_classification(found)
        outcome = AttemptOutcome(found.attempt, found.adapter_id, classification)
        if recorded is None:
            actions.append(RecordInterruptedAttempt(found.task_id, outcome))
        actions.append(ResumeTask(found.task_id, found.state, outcome, recorded is not None))
    return RecoveryPlan(tuple(actions), tuple(skipped))


@dataclass(slots=True)
class RecoveryReport:
    done: list[RecoveryAction] = field(default_factory=list)
    errors: list[tuple[RecoveryAction, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def apply_plan(
    plan: RecoveryPlan,
    env: RecoveryEnvironment,
    *,
    record: Callable[[RecordInterruptedAttempt], None],
    resume: Callable[[ResumeTask], None],
) -> RecoveryReport:
    """Run the plan. A failing action is reported and the rest of *its task* is skipped
    (never resume a task whose process may still be writing); other tasks go on."""
    report = RecoveryReport()
    failed_tasks: set[str] = set()
    for action in plan.actions:
        if action.task_id in failed_tasks:
            continue
        try:
            if isinstance(action, KillProcessGroup):
                env.kill_process_group(action.pgid)
            elif isinstance(action, RemoveWorktree):
                env.remove_worktree(action.path)
            elif isinstance(action, RecordInterruptedAttempt):
                record(action)
            else:
                resume(action)
        except Exception as exc:  # reported, never fatal for the other tasks
            logger.warning("recovery of %s: %r failed", action.task_id, action, exc_info=True)
            report.errors.append((action, f"{type(exc).__name__}: {exc}"))
            failed_tasks.add(action.task_id)
            continue
        report.done.append(action)
    return report


class PosixProcessGroups:
    """Process-group liveness and killing on POSIX (SIGTERM, grace, SIGKILL).

    ``sleep``/``clock`` are injected so tests never wait; identity checks against pid reuse
    (e.g. a marker in the process environment) belong to the spawner that knows its markers.
    """

    def __init__(
        self,
        grace_seconds: float = 5.0,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = 0.1,
    ) -> None:
        self.grace_seconds = grace_seconds
        self.sleep = sleep
        self.clock = clock
        self.poll_seconds = poll_seconds

    def process_group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, but not ours to signal
        return True

    def kill_process_group(self, pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = self.clock() + self.grace_seconds
        while self.clock() < deadline:
            if not self.process_group_alive(pgid):
                return
            self.sleep(self.poll_seconds)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return

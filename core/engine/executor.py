"""The executor: takes the routed tasks of a run and drives each to a terminal state.

For every task, in queue order: pick an adapter (the routed one, or a fallback when its
breaker is open), run an attempt on the backend within what is left of the task's budget,
classify the evidence, append the attempt to the patch ledger, record state + event in the
database in one transaction, and retry or finish as the policy says.

Resumable and retry-safe: state lives in the database and the ledger, never only in memory.
A restart first reconciles attempts that a previous process left IN_PROGRESS/VALIDATING, then
continues with what is not terminal. Every write is keyed, so replaying an attempt adds no
rows, ledger entries or events.

Entry points: :func:`run_executor_loop` (Python), ``python -m core.engine.executor`` and
``orchestrator execute``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.db.breaker_store import SqlBreakerStore
from core.db.database import check_schema, default_url, make_engine, redact
from core.db.store import Store, TaskRecord
from core.db.test_history import record_gate_tests
from core.engine.adapter_health import AdapterHealth
from core.engine.adapters import manual_instructions, manual_paths
from core.engine.backend import AttemptOutcome, AttemptRequest, ExecutionBackend
from core.engine.events import EventLog
from core.engine.inputs import RoutedTask, RunInputs, load_inputs
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import ConsoleProgress, ProgressReporter
from core.engine.patch_ledger import PatchLedger
from core.engine.process_group import process_group_alive, terminate_group
from core.engine.process_spawner import LocalBackend
from core.engine.resilience.breaker_store import CircuitBreakers
from core.engine.resilience.budget import TaskBudget
from core.engine.resilience.circuit_breaker import BreakerTransition, retry_after
from core.engine.resilience.classification import (
    Classification,
    FailureEvidence,
    classify,
    task_state,
)
from core.engine.resilience.retry import (
    AdapterChain,
    BackoffSchedule,
    RetryDecision,
    decide_retry,
    first_adapter,
    gate_feedback,
)
from core.engine.resilience.retry import AttemptOutcome as RetryHistoryItem
from core.engine.resilience.safe_mode import SafeModeConfig
from core.engine.state_files import EXECUTION_RESULTS, PATCH_LEDGER, STATE_DIR, write_model
from core.errors import OrchestratorError
from core.models import (
    AdapterKind,
    AttemptResult,
    EventName,
    ExecutionResults,
    FailureClass,
    RetryPolicy,
    TaskState,
)

DEFAULT_MAX_LOG_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_DIFF_BYTES = 5 * 1024 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ExecutorConfig:
    run_id: str
    workdir: Path
    database_url: str | None = None
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    max_diff_bytes: int = DEFAULT_MAX_DIFF_BYTES
    keep_worktrees: bool = False
    max_tasks: int | None = None
    wait_for_breakers: bool = True
    safe_mode_max_open_seconds: float | None = 900.0

    @property
    def upgrade_hint(self) -> str:
        where = (
            f"--database-url {redact(self.db_url)}"
            if self.database_url
            else (f"--workdir {self.workdir}")
        )
        return f"run `orchestrator db upgrade {where}`"

    @property
    def db_url(self) -> str:
        return (
            self.database_url
            or os.environ.get("ORCHESTRATOR_DATABASE_URL")
            or default_url(self.workdir)
        )


@dataclass
class Clocks:
    """Time and randomness, injected so retries and budgets are tested without sleeping.

    ``sleep=None`` waits on the executor's stop event, so a stop request ends a backoff.
    """

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = _utcnow
    sleep: Callable[[float], None] | None = None
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class _TaskPlan:
    chain: AdapterChain
    policy: RetryPolicy
    schedule: BackoffSchedule
    budget: TaskBudget
    history: list[RetryHistoryItem]


class _Hooks:
    def __init__(self, executor: Executor, task: RoutedTask) -> None:
        self._executor, self._task = executor, task

    def started(self, pgid: int | None, workspace: Path | None) -> None:
        self._executor.store.set_process(
            self._executor.run_id, self._task.task_id, pgid, str(workspace) if workspace else None
        )

    def validating(self, diff: Any) -> None:
        self._executor.store.set_validating(self._executor.run_id, self._task.task_id)


class Executor:
    def __init__(
        self,
        config: ExecutorConfig,
        inputs: RunInputs,
        *,
        store: Store,
        backend: ExecutionBackend,
        breakers: CircuitBreakers | None = None,
        metrics: Metrics | None = None,
        progress: ProgressReporter | None = None,
        clocks: Clocks | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.inputs = inputs
        self.run_id = config.run_id
        self.store = store
        self.backend = backend
        self.clocks = clocks or Clocks()
        self.metrics = metrics or Metrics()
        self.progress = progress or ConsoleProgress()
        self.stop = stop or threading.Event()
        workdir = config.workdir
        self.ledger = PatchLedger(
            workdir / STATE_DIR / PATCH_LEDGER, workdir / ".ledger" / "patches", self.clocks.wall
        )
        self.events = EventLog(workdir / "logs" / "executor.jsonl")
        self.resilience_log = workdir / "logs" / "resilience.jsonl"
        self.breakers = breakers or CircuitBreakers(
            SqlBreakerStore(store.engine),
            lambda adapter_id: inputs.adapters[adapter_id].breaker,
            self.clocks.wall,
            self._breaker_transition,
        )
        self.health = AdapterHealth(
            inputs.adapters,
            store=store,
            breakers=self.breakers,
            metrics=self.metrics,
            announce=self._announce,
            wall=self.clocks.wall,
            monotonic=self.clocks.monotonic,
            safe_mode=SafeModeConfig(max_open_seconds=config.safe_mode_max_open_seconds),
        )
        self._parked = False
        self._started = 0

    # ------------------------------------------------------------------ the loop

    def run(self) -> ExecutionResults:
        self.store.sync_inputs(
            self.run_id,
            list(self.inputs.adapters.values()),
            [(t.seq, t.spec, t.decision.adapter_id) for t in self.inputs.tasks],
        )
        self._repair_logs()
        self.recover()
        records = self.store.tasks(self.run_id)
        done = sum(1 for r in records if r.status.terminal)
        self.progress.start(self.run_id, len(self.inputs.tasks), done)
        try:
            while self._pass() and self.config.wait_for_breakers and not self.stop.is_set():
                delay = self._next_check_delay()
                self.progress.note(f"tasks are waiting; checking again in {delay:.1f}s")
                self._sleep(delay)
        finally:
            self.progress.stop()
        return self.write_results()

    def _pass(self) -> bool:
        """One pass over the queue; True if tasks were parked for a reason that clears."""
        self._parked = False
        for task in self.inputs.tasks:
            self.metrics.heartbeat()
            if self.stop.is_set():
                break
            if self.store.task(self.run_id, task.task_id).status.terminal:
                continue
            if self.config.max_tasks is not None and self._started >= self.config.max_tasks:
                break
            safe_mode = self.health.check_safe_mode()
            if safe_mode.active:
                self._wait(task, safe_mode.summary())
                continue
            self._started += 1
            self.execute_task(task)
        return self._parked

    def _next_check_delay(self) -> float:
        """Until the earliest breaker may admit work again (bounded), never a busy loop."""
        now = self.clocks.wall()
        waits = [
            retry_after(self.breakers.view(a), spec.breaker, now)
            for a, spec in self.inputs.adapters.items()
        ]
        probes = [
            s.health_check.interval_seconds for s in self.inputs.adapters.values() if s.health_check
        ]
        candidates = [w for w in waits if w] + probes
        return min(max(min(candidates, default=5.0), 0.5), 60.0)

    def _plan(self, task: RoutedTask, record: TaskRecord) -> _TaskPlan:
        chain = AdapterChain.of(task.decision.adapter_id, task.decision.fallback_adapter_ids)
        primary = self.inputs.adapters[chain.primary]
        policy = task.spec.retry or primary.retry
        history = [
            RetryHistoryItem(
                a.attempt,
                a.adapter_id,
                Classification.failure(a.failure_class, a.failure_message)
                if a.failure_class
                else Classification.success(),
            )
            for a in record.attempt_results
        ]
        return _TaskPlan(
            chain=chain,
            policy=policy,
            schedule=BackoffSchedule(policy, self.clocks.rng),
            budget=TaskBudget.resume(
                task.spec.timeout_seconds or primary.timeout_seconds,
                sum(a.duration_seconds for a in record.attempt_results),
                self.clocks.monotonic,
            ),
            history=history,
        )

    def _decide(self, plan: _TaskPlan) -> RetryDecision:
        return decide_retry(
            plan.policy,
            plan.chain,
            plan.history,
            remaining_seconds=plan.budget.remaining(),
            admits=self.health.admits_map(plan.chain.adapter_ids),
            schedule=plan.schedule,
            min_attempt_seconds=plan.policy.min_attempt_seconds,
        )

    def execute_task(self, task: RoutedTask) -> TaskRecord:
        """Run attempts of one task until it is terminal or has to wait."""
        record = self.store.task(self.run_id, task.task_id)
        plan = self._plan(task, record)
        extra: str | None = None
        if plan.history and not plan.history[-1].classification.succeeded:
            # resuming after a failed attempt (crash recovery, or parked on a breaker)
            decision = self._decide(plan)
            if not decision.retry:
                return self._give_up(task, decision.reason)
            if decision.waiting_for_breaker:
                return self._wait(task, decision.reason)
            assert decision.next_adapter_id is not None
            adapter_id = decision.next_adapter_id
            last_gate = record.attempt_results[-1].gate
            if decision.include_gate_feedback and last_gate is not None:
                extra = gate_feedback(last_gate)
        else:
            selection = first_adapter(plan.chain, self.health.admits_map(plan.chain.adapter_ids))
            if selection.waiting_for_breaker:
                return self._wait(task, selection.reason)
            adapter_id = selection.adapter_id
        while True:
            adapter = self.inputs.adapters[adapter_id]
            if adapter.kind is AdapterKind.MANUAL and not self._manual_patch_ready(task):
                return self._wait(task, self._manual_wait(task), transient=False)
            admission = self.breakers.acquire(adapter_id)
            if not admission.admitted:
                return self._wait(task, admission.reason)
            attempt = record.attempts + 1
            result, classification, outcome, patch = self._attempt(
                task, adapter_id, attempt, plan.budget, extra, trial=admission.trial
            )
            plan.history.append(RetryHistoryItem(attempt, adapter_id, classification))
            interrupted = outcome.cancelled and self.stop.is_set()
            decision = self._decide(plan)
            final = not interrupted and not decision.retry
            record = self._record(task, result.model_copy(update={"final": final}), final, patch)
            if final or interrupted:
                self.progress.task_done(record.result())
                if final:
                    self.metrics.task_finished(adapter_id, record.status, record.duration_seconds)
                return record
            assert decision.next_adapter_id is not None
            self.metrics.retry(adapter_id, str(classification.failure_class))
            self._resilience_event(
                "retry_scheduled", task_id=task.task_id, attempt=attempt, reason=decision.reason
            )
            if decision.waiting_for_breaker:
                return self._wait(task, decision.reason)
            extra = (
                gate_feedback(result.gate)
                if decision.include_gate_feedback and result.gate
                else None
            )
            self._sleep(decision.delay_seconds)
            if self.stop.is_set():
                return record
            adapter_id = decision.next_adapter_id

    def _sleep(self, seconds: float) -> None:
        if self.clocks.sleep is None:
            self.stop.wait(seconds)  # a stop request ends the backoff at once
        else:
            self.clocks.sleep(seconds)

    def _give_up(self, task: RoutedTask, reason: str) -> TaskRecord:
        """A waiting task whose policy or budget ran out: terminal, without another attempt."""
        self.events.write(self.store.give_up(self.run_id, task.task_id, reason))
        record = self.store.task(self.run_id, task.task_id)
        self.progress.task_done(record.result())
        adapter_id = record.current_adapter_id or record.adapter_id
        self.metrics.task_finished(adapter_id, record.status, record.duration_seconds)
        return record

    # ------------------------------------------------------------------ one attempt

    def _attempt(
        self,
        task: RoutedTask,
        adapter_id: str,
        attempt: int,
        budget: TaskBudget,
        extra: str | None,
        *,
        trial: bool,
    ) -> tuple[AttemptResult, Classification, AttemptOutcome, bytes | None]:
        adapter = self.inputs.adapters[adapter_id]
        self.events.write(self.store.begin_attempt(self.run_id, task.task_id, attempt, adapter_id))
        self.progress.task_started(task.task_id, attempt, adapter_id)
        started_at, started = self.clocks.wall(), self.clocks.monotonic()
        request = AttemptRequest(
            run_id=self.run_id,
            task=task.spec,
            adapter=adapter,
            attempt=attempt,
            repo_url=self.inputs.repo_url(task.spec),
            timeout_seconds=max(budget.attempt_timeout(adapter.timeout_seconds), 0.001),
            gate_checks=tuple(task.spec.gate if task.spec.gate is not None else adapter.gate),
            gate_baseline=task.spec.gate_baseline,
            max_log_bytes=self.config.max_log_bytes,
            max_diff_bytes=self.config.max_diff_bytes,
            extra_input=extra,
        )
        outcome = self.backend.run_attempt(request, _Hooks(self, task))
        diff = outcome.diff.summary if outcome.diff else None
        gate = outcome.gate
        classification = classify(
            FailureEvidence(
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                timed_out=outcome.timed_out,
                cancelled=outcome.cancelled,
                start_error=outcome.start_error,
                infrastructure_reason=outcome.infrastructure_reason,
                diff_empty=diff.empty if diff else None,
                allow_empty_diff=task.spec.allow_empty_diff,
                gate_passed=gate.passed if gate else None,
                gate_failed_checks=tuple(gate.blamed) if gate else (),
                output_tail=outcome.output_tail,
            )
        )
        if outcome.cancelled and self.stop.is_set():
            classification = Classification.failure(
                FailureClass.INFRASTRUCTURE, "interrupted: the executor was stopped"
            )
        if gate is not None:
            self.metrics.gate_finished(gate.passed)
        self.breakers.record(adapter_id, classification, trial=trial)
        result = AttemptResult(
            attempt=attempt,
            adapter_id=adapter_id,
            state=task_state(classification),
            failure_class=classification.failure_class,
            failure_message="" if classification.succeeded else classification.message,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            timed_out=outcome.timed_out,
            started_at=started_at,
            finished_at=self.clocks.wall(),
            duration_seconds=round(self.clocks.monotonic() - started, 3),
            log_path=_relative(outcome.log_path, self.config.workdir),
            log_bytes=outcome.log_bytes,
            log_truncated=outcome.log_truncated,
            diff=diff,
            gate=gate,
        )
        patch = outcome.diff.stored_patch(self.config.max_diff_bytes) if outcome.diff else None
        return result, classification, outcome, patch

    def _record(
        self, task: RoutedTask, result: AttemptResult, final: bool, patch: bytes | None
    ) -> TaskRecord:
        """Ledger first (fsynced), then state + event + ledger mirror in one DB transaction."""
        entry = self.ledger.append(
            run_id=self.run_id,
            task_id=task.task_id,
            base_commit=task.spec.base_commit,
            result=result,
            patch=patch,
        )
        events = self.store.finish_attempt(
            self.run_id, task.task_id, entry.result, final=final, entry=entry, patch=patch
        )
        record_gate_tests(
            self.store.engine, self.run_id, task.task_id, result.attempt, result.gate, self.metrics
        )
        self.events.write(events)
        return self.store.task(self.run_id, task.task_id)

    # ------------------------------------------------------------------ waiting, manual

    def _wait(self, task: RoutedTask, reason: str, *, transient: bool = True) -> TaskRecord:
        """Park a task PENDING with a visible reason; ``transient`` ones clear by themselves."""
        self._parked |= transient
        self.store.set_waiting(self.run_id, task.task_id, reason)
        record = self.store.task(self.run_id, task.task_id)
        self.progress.task_done(record.result())
        return record

    def _manual_patch_ready(self, task: RoutedTask) -> bool:
        return manual_paths(self.config.workdir, self.run_id, task.task_id)[1].exists()

    def _manual_wait(self, task: RoutedTask) -> str:
        instructions, _ = manual_paths(self.config.workdir, self.run_id, task.task_id)
        instructions.parent.mkdir(parents=True, exist_ok=True)
        text = manual_instructions(task.spec, self.run_id, self.inputs.repo_url(task.spec))
        instructions.write_text(text, encoding="utf-8")
        return (
            f"awaiting a human patch: read {_relative(instructions, self.config.workdir)}, "
            f"then `orchestrator manual submit --run {self.run_id} {task.task_id} <patch>`"
        )

    # ------------------------------------------------------------------ recovery

    def recover(self) -> list[str]:
        """Reconcile attempts a previous process left IN_PROGRESS/VALIDATING.

        If the ledger already holds the attempt, the process died after recording it: finish
        the database write from the ledger entry. Otherwise the attempt was interrupted: end
        its process group, remove its worktree, and record it as an ``infrastructure`` failure
        so the task resumes under its retry policy.
        """
        recovered = []
        for record in self.store.tasks(self.run_id):
            if record.status not in (TaskState.IN_PROGRESS, TaskState.VALIDATING):
                continue
            recovered.append(record.task_id)
            task = self.inputs.task(record.task_id)
            entry = self.ledger.find(self.run_id, record.task_id, record.attempts)
            if entry is not None:
                patch = self.ledger.read_patch(entry)
                self.events.write(
                    self.store.finish_attempt(
                        self.run_id,
                        record.task_id,
                        entry.result,
                        final=entry.result.final,
                        entry=entry,
                        patch=patch,
                    )
                )
                continue
            if record.pid is not None and process_group_alive(record.pid):
                terminate_group(record.pid)
            self.backend.cleanup_attempt(self.run_id, record.task_id, record.attempts)
            now = self.clocks.wall()
            adapter_id = record.current_adapter_id or record.adapter_id
            message = "interrupted: the executor stopped during this attempt"
            plan = self._plan(task, record)
            plan.history.append(
                RetryHistoryItem(
                    record.attempts,
                    adapter_id,
                    Classification.failure(FailureClass.INFRASTRUCTURE, message),
                )
            )
            final = not self._decide(plan).retry
            result = AttemptResult(
                attempt=record.attempts,
                adapter_id=adapter_id,
                state=TaskState.FAILED,
                failure_class=FailureClass.INFRASTRUCTURE,
                failure_message=message,
                started_at=record.started_at or now,
                finished_at=now,
                duration_seconds=0.0,
                final=final,
            )
            self._resilience_event(
                "attempt_recovered", task_id=record.task_id, attempt=record.attempts, final=final
            )
            self._record(task, result, final, None)
        return recovered

    def _repair_logs(self) -> None:
        """Bring the JSONL event log and the DB ledger mirror up to date after a crash."""
        self.events.repair(self.store.events(self.run_id))
        mirrored = self.store.mirrored_seqs()
        for entry in self.ledger.entries():
            if entry.seq not in mirrored:
                self.store.mirror_ledger(entry, self.ledger.read_patch(entry))

    # ------------------------------------------------------------------ outputs

    def write_results(self) -> ExecutionResults:
        records = self.store.tasks(self.run_id)
        summary = {state.value: 0 for state in TaskState}
        for record in records:
            summary[record.status.value] += 1
        summary["total"] = len(records)
        finished = all(r.status.terminal for r in records)
        results = ExecutionResults(
            run_id=self.run_id,
            backend=self.backend.name,
            generated_at=self.clocks.wall(),
            finished=finished,
            summary=summary,
            tasks=[r.result() for r in records],
        )
        write_model(self.config.workdir / STATE_DIR / EXECUTION_RESULTS, results)
        if finished:
            self.events.write(
                self.store.run_event(
                    self.run_id,
                    EventName.EXECUTION_FINISHED,
                    {"summary": summary},
                    key=f"{self.run_id}//EXECUTION_FINISHED",
                )
            )
        return results

    def _breaker_transition(self, transition: BreakerTransition) -> None:
        self.metrics.breaker(transition.adapter_id, transition.to_state.value)
        self._resilience_event("circuit_breaker", **transition.to_record())

    def _announce(self, event: str, fields: dict[str, object]) -> None:
        """Health results and safe-mode changes: resilience log; safe mode also as an event."""
        self._resilience_event(event, **fields)
        if event.startswith("safe_mode_"):
            name = EventName.SAFE_MODE_ENTERED if fields.get("active") else EventName.SAFE_MODE_LEFT
            key = f"{self.run_id}//{name.value}/{fields.get('at')}"
            self.events.write(self.store.run_event(self.run_id, name, dict(fields), key=key))

    def _resilience_event(self, event: str, **fields: Any) -> None:
        self.resilience_log.parent.mkdir(parents=True, exist_ok=True)
        record = {"ts": self.clocks.wall().isoformat(), "run_id": self.run_id, "event": event}
        with open(self.resilience_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, **fields}, default=str) + "\n")


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def build_executor(
    config: ExecutorConfig,
    *,
    backend: ExecutionBackend | None = None,
    progress: ProgressReporter | None = None,
    metrics: Metrics | None = None,
    clocks: Clocks | None = None,
    stop: threading.Event | None = None,
) -> Executor:
    """Check the entry contracts (inputs, database) and assemble an executor."""
    inputs = load_inputs(config.workdir, config.run_id)
    engine = make_engine(config.db_url)
    check_schema(engine, config.db_url, config.upgrade_hint)
    stop = stop or threading.Event()
    clocks = clocks or Clocks()
    return Executor(
        config,
        inputs,
        store=Store(engine, clocks.wall),
        backend=backend
        or LocalBackend(
            config.workdir,
            keep_worktrees=config.keep_worktrees,
            stop=stop,
            clock=clocks.monotonic,
        ),
        metrics=metrics,
        progress=progress,
        clocks=clocks,
        stop=stop,
    )


def run_executor_loop(config: ExecutorConfig | None = None, **kwargs: Any) -> ExecutionResults:
    """Execute every runnable task of a run and return the results (seed entry point).

    ``config`` defaults to ``ExecutorConfig(run_id=$ORCHESTRATOR_RUN_ID, workdir=cwd)``;
    keyword arguments go to :func:`build_executor`.
    """
    if config is None:
        run_id = os.environ.get("ORCHESTRATOR_RUN_ID")
        if not run_id:
            raise OrchestratorError("set ORCHESTRATOR_RUN_ID or pass an ExecutorConfig")
        config = ExecutorConfig(run_id=run_id, workdir=Path.cwd())
    return build_executor(config, **kwargs).run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.engine.executor --run <id>``: the executor without the full CLI."""
    parser = argparse.ArgumentParser(prog="python -m core.engine.executor")
    parser.add_argument("--run", required=True, help="run id (as in .state/task_queue.json)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="phase-4 work dir")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite)")
    args = parser.parse_args(argv)
    try:
        results = run_executor_loop(
            ExecutorConfig(args.run, args.workdir.resolve(), args.database_url)
        )
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if results.finished else 3


if __name__ == "__main__":
    sys.exit(main())

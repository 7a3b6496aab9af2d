"""The executor: takes the routed tasks of a run and drives each to a terminal state.

The embedded driver of the one lifecycle: for every task, in queue order, it asks
:func:`core.engine.lifecycle.next_step` what to do (start attempt N on adapter A with R
seconds, wait, or finish), runs the attempt on the local backend (the adapter, then the test
gate when :func:`~core.engine.lifecycle.needs_gate` says so), has the lifecycle conclude it,
and hands the verdict to the :class:`~core.engine.recorder.Recorder`. It decides nothing
about retries, budget, gates or final states itself.

Resumable and retry-safe: state lives in the database and the ledger, never only in memory.
A restart first reconciles attempts that a previous process left IN_PROGRESS/VALIDATING, then
continues with what is not terminal. Every write is keyed, so replaying an attempt adds no
rows, ledger entries or events.

Entry points: :func:`run_executor_loop` (Python), ``python -m core.engine.executor`` and
``orchestrator execute``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.db.breaker_rows import SqlBreakerRows
from core.db.database import check_schema, default_url, make_engine, redact, sqlite_files
from core.db.store import Store, TaskRecord
from core.engine.adapter_health import AdapterHealth
from core.engine.adapters import manual_instructions, manual_paths
from core.engine.backend import AttemptRequest, ExecutionBackend
from core.engine.inputs import RoutedTask, RunInputs, load_inputs
from core.engine.lifecycle import (
    AttemptEvidence,
    Finish,
    Start,
    TaskPlan,
    Wait,
    WaitCause,
    conclude,
    interrupted_evidence,
    needs_gate,
    next_step,
)
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import ConsoleProgress, ProgressReporter
from core.engine.process_group import process_group_alive, terminate_group
from core.engine.process_spawner import LocalBackend
from core.engine.recorder import Outcome as RecordedAttempt
from core.engine.recorder import Recorder
from core.engine.resilience.breaker_store import CircuitBreakers, RowBreakerStore
from core.engine.resilience.circuit_breaker import retry_after
from core.engine.resilience.classification import Classification
from core.engine.resilience.safe_mode import SafeModeConfig
from core.engine.sandbox import Sandbox, select_sandbox
from core.engine.state_files import EXECUTION_RESULTS, STATE_DIR, write_model
from core.errors import OrchestratorError
from core.identity import EMBEDDED_SCOPE, TaskKey
from core.models import (
    AdapterKind,
    EventName,
    ExecutionResults,
    FailureClass,
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
    #: Run adapters and gate checks in the sandbox (``--no-sandbox``: False); with True and
    #: no working sandbox on the machine, :func:`build_executor` refuses.
    sandbox: bool = True

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


class _Hooks:
    def __init__(self, store: Store, key: TaskKey) -> None:
        self._store, self._key = store, key

    def started(self, pgid: int | None, workspace: Path | None) -> None:
        self._store.set_process(self._key, pgid, str(workspace) if workspace else None)

    def validating(self, diff: Any) -> None:
        self._store.set_validating(self._key)


class Executor:
    """The embedded driver of the lifecycle: attempts run as local process groups."""

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
        sandbox: Sandbox | None = None,
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
        self.recorder = Recorder(
            store, config.workdir, metrics=self.metrics, clock=self.clocks.wall
        )
        self.breakers = breakers or CircuitBreakers(
            RowBreakerStore(SqlBreakerRows(store.engine, EMBEDDED_SCOPE)),
            lambda adapter_id: inputs.adapters[adapter_id].breaker,
            self.clocks.wall,
            self.recorder.on_breaker_transition,
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
            sandbox=sandbox,
        )
        self._parked = False
        self._started = 0

    # ------------------------------------------------------------------ the loop

    def key(self, task: RoutedTask) -> TaskKey:
        return TaskKey(self.run_id, task.task_id)

    def plan(self, task: RoutedTask) -> TaskPlan:
        decision = task.decision
        return TaskPlan.of(
            task.spec, [decision.adapter_id, *decision.fallback_adapter_ids], self.inputs.adapters
        )

    def run(self) -> ExecutionResults:
        self.store.sync_inputs(
            self.run_id,
            list(self.inputs.adapters.values()),
            [(t.seq, t.spec, t.decision.adapter_id) for t in self.inputs.tasks],
        )
        self.recorder.repair(self.run_id)
        self.recover()
        records = self.store.tasks(self.run_id, EMBEDDED_SCOPE)
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
            if self.store.task(self.key(task)).status.terminal:
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

    def execute_task(self, task: RoutedTask) -> TaskRecord:
        """Run attempts of one task until it is terminal or has to wait."""
        key, plan = self.key(task), self.plan(task)
        served: datetime | None = None  # a backoff this process already waited out
        while True:
            record = self.store.task(key)
            if record.status.terminal:
                return record
            now = self.clocks.wall()
            step = next_step(
                plan,
                record.attempt_results,
                now=max(now, served) if served else now,
                admits=self.health.admits_map(plan.chain.adapter_ids),
            )
            if isinstance(step, Finish):
                return self._end(task, step)
            if isinstance(step, Wait):
                if step.cause is not WaitCause.BACKOFF or step.until is None:
                    return self._wait(task, step.reason)
                self._sleep(max(0.0, (step.until - now).total_seconds()))
                if self.stop.is_set():
                    return record
                served = step.until
                continue
            adapter = self.inputs.adapters[step.adapter_id]
            if adapter.kind is AdapterKind.MANUAL and not self._manual_patch_ready(task):
                return self._wait(task, self._manual_wait(task), transient=False)
            admission = self.breakers.acquire(step.adapter_id)
            if not admission.admitted:
                return self._wait(task, admission.reason)
            outcome, interrupted = self._attempt(task, plan, record, step, trial=admission.trial)
            if outcome.finish is not None or interrupted:
                self.progress.task_done(outcome.record.result())
                return outcome.record

    def _sleep(self, seconds: float) -> None:
        if self.clocks.sleep is None:
            self.stop.wait(seconds)  # a stop request ends the backoff at once
        else:
            self.clocks.sleep(seconds)

    def _end(self, task: RoutedTask, finish: Finish) -> TaskRecord:
        """A waiting task whose budget ran out: terminal, without another attempt."""
        record = self.recorder.end(self.key(task), finish)
        self.progress.task_done(record.result())
        return record

    # ------------------------------------------------------------------ one attempt

    def _attempt(
        self,
        task: RoutedTask,
        plan: TaskPlan,
        record: TaskRecord,
        start: Start,
        *,
        trial: bool,
    ) -> tuple[RecordedAttempt, bool]:
        """Run one attempt on the backend, conclude it, record it; True if interrupted."""
        key = self.key(task)
        adapter = self.inputs.adapters[start.adapter_id]
        started_at, started = self.clocks.wall(), self.clocks.monotonic()
        self.recorder.begin(key, start, started_at=started_at)
        self.progress.task_started(task.task_id, start.attempt, start.adapter_id)
        request = AttemptRequest(
            key=key,
            task=task.spec,
            adapter=adapter,
            attempt=start.attempt,
            repo_url=self.inputs.repo_url(task.spec),
            timeout_seconds=max(start.timeout_seconds, 0.001),
            gate_checks=plan.gate_checks(start.adapter_id),
            gate_baseline=task.spec.gate_baseline,
            max_log_bytes=self.config.max_log_bytes,
            max_diff_bytes=self.config.max_diff_bytes,
            extra_input=start.feedback,
        )
        hooks = _Hooks(self.store, key)
        run = self.backend.run_adapter(request, hooks)
        try:
            out = run.outcome
            evidence = AttemptEvidence(
                attempt=start.attempt,
                adapter_id=start.adapter_id,
                started_at=started_at,
                finished_at=started_at,
                exit_code=out.exit_code,
                signal=out.signal,
                timed_out=out.timed_out,
                cancelled=out.cancelled,
                start_error=out.start_error,
                infrastructure_reason=out.infrastructure_reason,
                output_tail=out.output_tail,
                diff=out.diff.summary if out.diff else None,
                isolation=out.isolation,
            )
            if needs_gate(plan, evidence) and not self.stop.is_set():
                hooks.validating(evidence.diff)
                evidence = replace(evidence, gate=self.backend.run_gate(request, run))
        finally:
            log = self.backend.release(run)
        evidence = replace(
            evidence,
            finished_at=self.clocks.wall(),
            charged_seconds=self.clocks.monotonic() - started,
            log_path=_relative(log.path, self.config.workdir),
            log_bytes=log.bytes,
            log_truncated=log.truncated,
        )
        interrupted = out.cancelled and self.stop.is_set()
        verdict = conclude(
            plan,
            record.attempt_results,
            evidence,
            rng=self.clocks.rng,
            classification=Classification.failure(
                FailureClass.INFRASTRUCTURE, "interrupted: the executor was stopped"
            )
            if interrupted
            else None,
        )
        patch = out.diff.stored_patch(self.config.max_diff_bytes) if out.diff else None
        outcome = self.recorder.record(
            key,
            task.spec.base_commit,
            verdict,
            breakers=self.breakers,
            trial=trial,
            patch=patch,
        )
        return outcome, interrupted

    # ------------------------------------------------------------------ waiting, manual

    def _wait(self, task: RoutedTask, reason: str, *, transient: bool = True) -> TaskRecord:
        """Park a task PENDING with a visible reason; ``transient`` ones clear by themselves."""
        self._parked |= transient
        record = self.recorder.park(self.key(task), reason)
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
        charged with the time it ran, so the task resumes under its retry policy.
        """
        recovered = []
        for record in self.store.tasks(self.run_id, EMBEDDED_SCOPE):
            if record.status not in (TaskState.IN_PROGRESS, TaskState.VALIDATING):
                continue
            recovered.append(record.task_id)
            key = record.key
            entry = self.recorder.ledger.find(key, record.attempts)
            if entry is not None:
                self.recorder.replay(key, entry, breakers=self.breakers)
                continue
            if record.pid is not None and process_group_alive(record.pid):
                terminate_group(record.pid)
            self.backend.cleanup_attempt(key, record.attempts)
            task = self.inputs.task(record.task_id)
            now = self.clocks.wall()
            verdict = conclude(
                self.plan(task),
                record.attempt_results,
                interrupted_evidence(
                    attempt=record.attempts,
                    adapter_id=record.current_adapter_id or record.adapter_id,
                    started_at=record.attempt_started_at or record.started_at or now,
                    granted_seconds=record.attempt_timeout_seconds,
                    now=now,
                ),
                rng=self.clocks.rng,
            )
            self.recorder.resilience.write(
                "attempt_recovered",
                run_id=self.run_id,
                task_id=record.task_id,
                attempt=record.attempts,
                final=verdict.finish is not None,
                charged_seconds=verdict.result.duration_seconds,
            )
            self.recorder.record(
                key, task.spec.base_commit, verdict, breakers=self.breakers, trial=False
            )
        return recovered

    # ------------------------------------------------------------------ outputs

    def write_results(self) -> ExecutionResults:
        records = self.store.tasks(self.run_id, EMBEDDED_SCOPE)
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
            self.recorder.events.write(
                self.store.run_event(
                    self.run_id,
                    EventName.EXECUTION_FINISHED,
                    {"summary": summary},
                    key=f"{self.run_id}//EXECUTION_FINISHED",
                )
            )
        return results

    def _announce(self, event: str, fields: dict[str, object]) -> None:
        """Health results and safe-mode changes: resilience log; safe mode also as an event."""
        self.recorder.resilience.write(event, run_id=self.run_id, **fields)
        if event.startswith("safe_mode_"):
            name = EventName.SAFE_MODE_ENTERED if fields.get("active") else EventName.SAFE_MODE_LEFT
            key = f"{self.run_id}//{name.value}/{fields.get('at')}"
            self.recorder.events.write(
                self.store.run_event(self.run_id, name, dict(fields), key=key)
            )


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
    """Check the entry contracts (inputs, database, sandbox) and assemble an executor."""
    inputs = load_inputs(config.workdir, config.run_id)
    engine = make_engine(config.db_url)
    check_schema(engine, config.db_url, config.upgrade_hint)
    sandbox = select_sandbox(
        config.sandbox, workdir=config.workdir, hidden=sqlite_files(config.db_url)
    )
    stop = stop or threading.Event()
    clocks = clocks or Clocks()
    return Executor(
        config,
        inputs,
        store=Store(engine, clocks.wall),
        backend=backend
        or LocalBackend(
            config.workdir,
            sandbox=sandbox,
            keep_worktrees=config.keep_worktrees,
            stop=stop,
            clock=clocks.monotonic,
        ),
        metrics=metrics,
        progress=progress,
        clocks=clocks,
        stop=stop,
        sandbox=sandbox,
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
    parser.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run adapters and gate checks unconfined (default: refuse without bubblewrap)",
    )
    args = parser.parse_args(argv)
    try:
        results = run_executor_loop(
            ExecutorConfig(
                args.run, args.workdir.resolve(), args.database_url, sandbox=not args.no_sandbox
            )
        )
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if results.finished else 3


if __name__ == "__main__":
    sys.exit(main())

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
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

from core.db.breaker_rows import SqlBreakerRows
from core.db.database import check_schema, default_url, make_engine, redact, sqlite_files
from core.db.store import Store, TaskRecord
from core.engine.adapter_health import AdapterHealth
from core.engine.adapters import manual_instructions, manual_paths
from core.engine.backend import AttemptRequest, ExecutionBackend
from core.engine.escalation import EscalationPolicy
from core.engine.inputs import (
    DEFAULT_MAX_PROMPT_BYTES,
    RoutedTask,
    RunInputs,
    check_base_commits,
    load_inputs,
)
from core.engine.lifecycle import (
    AttemptEvidence,
    Finish,
    Start,
    TaskPlan,
    Wait,
    WaitCause,
    base_of,
    conclude,
    interrupted_evidence,
    needs_gate,
    next_step,
)
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import ConsoleProgress, ProgressReporter, RedactingProgress
from core.engine.process_group import process_group_alive, terminate_group
from core.engine.process_spawner import WORK_DIR, LocalBackend
from core.engine.recorder import Outcome as RecordedAttempt
from core.engine.recorder import Recorder
from core.engine.redaction import SHAPES_ONLY, adapter_redactor
from core.engine.resilience.breaker_store import (
    PEEK_MAX_AGE_SECONDS,
    CircuitBreakers,
    RowBreakerStore,
)
from core.engine.resilience.circuit_breaker import retry_after
from core.engine.resilience.classification import Classification
from core.engine.resilience.safe_mode import SafeModeConfig
from core.engine.run_watcher import RunWatcher, serve_runs, stop_on_signals
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

logger = logging.getLogger(__name__)

DEFAULT_MAX_LOG_BYTES = 2 * 1024 * 1024
#: Hard limit of one attempt's diff: a larger one is not kept and fails as diff_too_large.
DEFAULT_MAX_DIFF_BYTES = 100 * 1024 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ExecutorConfig:
    run_id: str
    workdir: Path
    database_url: str | None = None
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    max_diff_bytes: int = DEFAULT_MAX_DIFF_BYTES
    #: Cap of each gate check's output in the task log (None: ``max_log_bytes``).
    max_gate_log_bytes: int | None = None
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    keep_worktrees: bool = False
    max_tasks: int | None = None
    wait_for_breakers: bool = True
    safe_mode_max_open_seconds: float | None = 900.0
    escalation: EscalationPolicy = field(default_factory=EscalationPolicy)
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
        self.stop = stop or threading.Event()
        self.env: Mapping[str, str] = os.environ
        # run-wide sinks (the console) mask the secrets of every adapter of the run
        self.redactor = SHAPES_ONLY
        for spec in inputs.adapters.values():
            self.redactor = self.redactor.merge(adapter_redactor(spec, self.env))
        self.progress = RedactingProgress(progress or ConsoleProgress(), self.redactor)
        self.recorder = Recorder(
            store,
            config.workdir,
            metrics=self.metrics,
            clock=self.clocks.wall,
            escalation=config.escalation,
            evidence=getattr(backend, "evidence", None),
        )
        self.breakers = breakers or CircuitBreakers(
            RowBreakerStore(SqlBreakerRows(store.engine, EMBEDDED_SCOPE)),
            lambda adapter_id: inputs.adapters[adapter_id].breaker,
            self.clocks.wall,
            self.recorder.on_breaker_transition,
            # peeks (safe mode, admits) within a second of a read or write of this process
            # are answered from it: 1 breaker read per attempt instead of 4
            max_age_seconds=PEEK_MAX_AGE_SECONDS,
            monotonic=self.clocks.monotonic,
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
            watch=lambda snaps, now: self.recorder.escalations.breakers_seen(
                snaps, now, run_id=self.run_id
            ),
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
            self.recorder.escalations.close()  # webhook deliveries flushed
            self.backend.drain()  # a finished run leaves no attempt dir behind
        return self.write_results()

    def _pass(self) -> bool:
        """One pass over the queue; True if tasks were parked for a reason that clears."""
        self._parked = False
        for task in self.inputs.tasks:
            self.metrics.heartbeat()
            if self.stop.is_set():
                break
            record = self.store.task(self.key(task))
            if record.status.terminal:
                continue
            if self.config.max_tasks is not None and self._started >= self.config.max_tasks:
                break
            safe_mode = self.health.check_safe_mode()
            if safe_mode.active:
                self._wait(task, safe_mode.summary())
                continue
            self._started += 1
            self.execute_task(task, record)
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

    def execute_task(self, task: RoutedTask, record: TaskRecord | None = None) -> TaskRecord:
        """Run attempts of one task until it is terminal or has to wait.

        ``record``: the task's row as the caller has just read it (saves reading it again).
        """
        key, plan = self.key(task), self.plan(task)
        served: datetime | None = None  # a backoff this process already waited out
        fresh = record
        while True:
            record, fresh = fresh or self.store.task(key), None
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
        # a task reopened by the integration worker starts from the integration branch's head
        spec, repo_url = task.spec, self.inputs.repo_url(task.spec)
        if start.base is not None:
            spec = spec.model_copy(update={"base_commit": start.base.commit})
            repo_url = start.base.repository
        started_at, started = self.clocks.wall(), self.clocks.monotonic()
        gate_checks = plan.gate_checks(start.adapter_id)
        redactor = adapter_redactor(adapter, self.env, gate_checks)
        self.recorder.begin(key, start, started_at=started_at)
        self.progress.task_started(task.task_id, start.attempt, start.adapter_id)
        request = AttemptRequest(
            key=key,
            task=spec,
            adapter=adapter,
            attempt=start.attempt,
            repo_url=repo_url,
            timeout_seconds=max(start.timeout_seconds, 0.001),
            gate_checks=gate_checks,
            gate_baseline=task.spec.gate_baseline,
            max_log_bytes=self.config.max_log_bytes,
            max_diff_bytes=self.config.max_diff_bytes,
            extra_input=start.feedback,
            redactor=redactor,
            max_gate_log_bytes=self.config.max_gate_log_bytes,
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
                adapter_error=out.adapter_error,
                retry_after_seconds=out.retry_after_seconds,
                usage=out.usage,
                isolation=out.isolation,
            )
            # a stop request between the adapter and the gate: the attempt is interrupted,
            # never concluded as a success without its gate
            gate_skipped = needs_gate(plan, evidence) and self.stop.is_set()
            if needs_gate(plan, evidence) and not gate_skipped:
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
        interrupted = (out.cancelled and self.stop.is_set()) or gate_skipped
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
            redactor=redactor,
        )
        outcome = self.recorder.record(
            key, spec.base_commit, verdict, breakers=self.breakers, trial=trial
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
            rebased = base_of(record.attempt_results)
            base_commit = rebased.commit if rebased is not None else task.spec.base_commit
            self.recorder.record(key, base_commit, verdict, breakers=self.breakers, trial=False)
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
            self.recorder.commit_events(
                lambda: self.store.run_event(
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
            self.recorder.commit_events(
                lambda: self.store.run_event(self.run_id, name, dict(fields), key=key)
            )
            if fields.get("active"):
                reasons = fields.get("reasons")
                self.recorder.escalations.safe_mode_entered(
                    self.run_id,
                    [str(r) for r in reasons] if isinstance(reasons, list) else [],
                    str(fields.get("at")),
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
    env: Mapping[str, str] | None = None,
) -> Executor:
    """Check the entry contracts (inputs, base commits, database, sandbox) and assemble an
    executor. ``env``: where ``api`` adapters' key variables are read (default: this
    process's)."""
    env = os.environ if env is None else env
    inputs = load_inputs(
        config.workdir, config.run_id, env=env, max_prompt_bytes=config.max_prompt_bytes
    )
    engine = make_engine(config.db_url)
    check_schema(engine, config.db_url, config.upgrade_hint)
    sandbox = select_sandbox(
        config.sandbox, workdir=config.workdir, hidden=sqlite_files(config.db_url)
    )
    if backend is None:  # after the sandbox check: a refusal leaves nothing behind
        check_base_commits(inputs, config.workdir / WORK_DIR / "mirrors")
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
            env=env,
        ),
        metrics=metrics,
        progress=progress,
        clocks=clocks,
        stop=stop,
        sandbox=sandbox,
    )


@overload
def run_executor_loop(
    config: ExecutorConfig | None = None,
    *,
    run_id: str | None = None,
    workdir: Path | str | None = None,
    database_url: str | None = None,
    continuous: Literal[False] = False,
    **kwargs: Any,
) -> ExecutionResults: ...


@overload
def run_executor_loop(
    config: ExecutorConfig | None = None,
    *,
    run_id: str | None = None,
    workdir: Path | str | None = None,
    database_url: str | None = None,
    continuous: Literal[True],
    **kwargs: Any,
) -> list[ExecutionResults]: ...


def run_executor_loop(
    config: ExecutorConfig | None = None,
    *,
    run_id: str | None = None,
    workdir: Path | str | None = None,
    database_url: str | None = None,
    continuous: bool = False,
    **kwargs: Any,
) -> ExecutionResults | list[ExecutionResults]:
    """Execute every runnable task of a run and return the results (seed entry point).

    ``run_executor_loop(run_id="demo", workdir="/path/to/workdir")``, or a full
    :class:`ExecutorConfig`. Without either, the run is ``$ORCHESTRATOR_RUN_ID`` in the
    current directory. Other keyword arguments go to :func:`build_executor` (``stop``,
    ``metrics``, ``progress``, ``clocks``...).

    ``continuous=True``: the executor loop of the seed -- execute the run the work dir's
    ``ROUTING_COMPLETE`` names (only ``run_id``'s, when given), then wait for the next run or
    new tasks (file-system notifications, no busy polling) and execute them, until the
    ``stop`` event is set; in the main thread without a ``stop`` of the caller's, SIGTERM and
    SIGINT set it (the running attempt is stopped and recorded as interrupted, to resume on
    the next start). Returns the results of every run executed. See
    :func:`serve_continuously`.
    """
    if config is None:
        run_id = run_id or os.environ.get("ORCHESTRATOR_RUN_ID")
        if not run_id and not continuous:
            raise OrchestratorError(
                "which run? pass run_id='<id>' (and workdir=...), set ORCHESTRATOR_RUN_ID, "
                "or pass an ExecutorConfig"
            )
        config = ExecutorConfig(
            run_id=run_id or "",
            workdir=Path(workdir).resolve() if workdir is not None else Path.cwd(),
            database_url=database_url,
        )
    elif run_id is not None or workdir is not None or database_url is not None:
        raise OrchestratorError("pass either an ExecutorConfig or run_id/workdir/database_url")
    if not continuous:
        return build_executor(config, **kwargs).run()
    return serve_continuously(config, **kwargs)


def serve_continuously(
    config: ExecutorConfig,
    *,
    stop: threading.Event | None = None,
    watcher: RunWatcher | None = None,
    on_results: Callable[[ExecutionResults], None] | None = None,
    report: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> list[ExecutionResults]:
    """Continuous mode (``config.run_id`` empty: every run; else only that one); see
    :func:`core.engine.run_watcher.serve_runs`. Other keyword arguments go to
    :func:`build_executor` for each run."""
    if kwargs.get("metrics") is None:
        kwargs["metrics"] = Metrics()
    metrics: Metrics = kwargs["metrics"]
    own_stop = stop is None
    stop = stop or threading.Event()
    watcher = watcher or RunWatcher(config.workdir, stop, on_tick=metrics.heartbeat)

    def execute(run: str) -> ExecutionResults:
        executor = build_executor(replace(config, run_id=run), stop=stop, **kwargs)
        try:
            results = executor.run()
        finally:
            executor.store.engine.dispose()
        if on_results is not None:
            on_results(results)
        return results

    with stop_on_signals(stop) if own_stop else nullcontext():
        return serve_runs(
            watcher,
            execute,
            only_run=config.run_id or None,
            report=report or logger.info,
            heartbeat=metrics.heartbeat,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.engine.executor --run <id>``: the executor without the full CLI;
    ``--watch``: the executor loop (continuous mode) until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m core.engine.executor")
    parser.add_argument("--run", help="run id (as in .state/task_queue.json)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="phase-4 work dir")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite)")
    parser.add_argument("--watch", action="store_true", help="keep executing new runs")
    parser.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run adapters and gate checks unconfined (default: refuse without bubblewrap)",
    )
    args = parser.parse_args(argv)
    if not args.run and not args.watch:
        parser.error("--run is required (or --watch)")
    config = ExecutorConfig(
        args.run or "", args.workdir.resolve(), args.database_url, sandbox=not args.no_sandbox
    )
    try:
        if args.watch:
            run_executor_loop(config, continuous=True, report=print)
            return 0
        results = run_executor_loop(config)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if results.finished else 3


if __name__ == "__main__":
    sys.exit(main())

"""The operator's reconciler: the Kubernetes driver of the one attempt lifecycle.

Level-triggered and idempotent: every call looks at a TaskExecution, the database record of
its task and the Jobs its status names, and takes the next step. The decisions (which
adapter, how much budget, whether to gate, retry or finish, in which state) are the
lifecycle's (:mod:`core.engine.lifecycle`); the writes are the recorder's
(:class:`~core.engine.recorder.Recorder`: ledger, database with the breaker, event log).
Status is a projection of what was recorded, written through one code path.

    PENDING     -> lifecycle.next_step: start (create the adapter Job), wait, or finish
    IN_PROGRESS -> adapter Job done: read the runner's report from the pod log, save logs;
                   lifecycle.needs_gate -> ConfigMap with the patch + gate Job; else conclude
    VALIDATING  -> gate Job done: conclude with the gate's result
    conclude    -> lifecycle.conclude, Recorder.record, then status and an Event

Identity: a task is its TaskExecution's uid (plus namespace and run id), an adapter and its
breaker are (namespace, name) -- see :mod:`core.identity`. Job names are deterministic, so a
replayed step after a crash finds its Job (409) instead of making a second one.

Each step runs under a per-TaskExecution asyncio lock. Database and ledger calls are
synchronous and run in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from core.db.breaker_rows import SqlBreakerRows
from core.db.store import Store, TaskRecord
from core.engine.lifecycle import (
    AttemptEvidence,
    Finish,
    Start,
    TaskPlan,
    Wait,
    WaitCause,
    conclude,
    needs_gate,
    next_step,
)
from core.engine.monitoring.metrics import Metrics
from core.engine.recorder import Recorder, finish_of
from core.engine.resilience.breaker_store import CircuitBreakers, RowBreakerStore
from core.engine.resilience.circuit_breaker import BreakerTransition
from core.identity import TaskKey
from core.kube.api import KubeApi
from core.kube.attempts import (
    adapter_evidence,
    attempt_recorded,
    attempt_started,
    diff_too_large,
    gate_evidence,
    gate_started,
    parse_time,
    task_ended,
)
from core.kube.conditions import set_conditions
from core.kube.jobs import (
    PATCH_DIR,
    egress_policy,
    job_finished,
    job_manifest,
    job_name,
)
from core.kube.jobs import patch_configmap as configmap_manifest
from core.models import AdapterSpec, FailureClass, TaskSpec, TaskState
from core.resources import (
    AdapterResourceSpec,
    AdapterResourceStatus,
    TaskExecutionSpec,
    TaskExecutionStatus,
    adapter_spec,
    task_spec,
)
from core.runner.protocol import RunnerRequest, RunnerResult, parse_pod_log

log = logging.getLogger("orchestrator.operator")
T = TypeVar("T")
TE = "taskexecutions"
ADAPTERS = "adapters"

__all__ = ["Controller", "ControllerSettings", "TaskContext"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ControllerSettings:
    workdir: Path
    runner_image: str
    #: The namespaces served (empty: all).
    namespaces: tuple[str, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    max_log_bytes: int = 2 * 1024 * 1024
    max_diff_bytes: int = 512 * 1024  # the patch travels in a ConfigMap (1 MiB limit)
    resync_seconds: float = 30.0


@dataclass
class TaskContext:
    """One TaskExecution as the reconciler sees it in one step."""

    te: dict[str, Any]
    spec: TaskExecutionSpec
    status: TaskExecutionStatus
    task: TaskSpec
    adapters: dict[str, AdapterResourceSpec]
    plan: TaskPlan
    key: TaskKey = field(init=False)

    def __post_init__(self) -> None:
        meta = self.te["metadata"]
        self.key = TaskKey(self.spec.run_id, self.task.task_id, meta["uid"], meta["namespace"])

    @property
    def ns(self) -> str:
        return str(self.te["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.te["metadata"]["name"])

    @property
    def log_path(self) -> str:
        return f"logs/execution/{self.key.log_name}.jsonl"


class Controller:
    """Reconciles TaskExecutions: the state machine of the module docstring."""

    def __init__(
        self,
        api: KubeApi,
        store: Store,
        settings: ControllerSettings,
        *,
        metrics: Metrics | None = None,
        now: Callable[[], datetime] = _now,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.store = store
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.now = now
        self.rng = rng or random.Random()
        # the database de-duplicates events (keyed inserts): no key set kept in memory
        self.recorder = Recorder(
            store, settings.workdir, metrics=self.metrics, clock=now, dedupe_events=False
        )
        self._breakers: dict[str, CircuitBreakers] = {}
        self._policies: dict[tuple[str, str], AdapterSpec] = {}
        self._breaker_changes: dict[str, list[BreakerTransition]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._egress_applied: set[tuple[str, str, int | None]] = set()
        # newest known body of each unfinished TaskExecution, and the Adapters by name
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._adapters: dict[tuple[str, str], dict[str, Any]] = {}
        self._synced: set[tuple[str, tuple[tuple[str, int | None], ...]]] = set()
        self._written: dict[tuple[str, str], str | None] = {}

    # ------------------------------------------------------------------ breakers

    def breakers(self, namespace: str) -> CircuitBreakers:
        """The circuit breakers of one namespace's Adapters (see :mod:`core.identity`)."""
        found = self._breakers.get(namespace)
        if found is None:
            changes = self._breaker_changes.setdefault(namespace, [])

            def on_transition(transition: BreakerTransition) -> None:
                self.recorder.on_breaker_transition(transition)
                changes.append(transition)

            found = CircuitBreakers(
                RowBreakerStore(SqlBreakerRows(self.store.engine, namespace)),
                lambda adapter: self._policies[(namespace, adapter)].breaker,
                self.now,
                on_transition,
            )
            self._breakers[namespace] = found
        return found

    def breaker_states(self) -> dict[str, str]:
        """``namespace/adapter`` -> breaker state, of every Adapter seen (health probe)."""
        return {
            f"{ns}/{name}": self.breakers(ns).view(name).state.value
            for ns, name in sorted(self._policies)
        }

    # ------------------------------------------------------------------ entry points

    async def reconcile(
        self, namespace: str, name: str, body: dict[str, Any] | None = None
    ) -> None:
        """One step for one TaskExecution. ``body``: the object as a watch event delivered it.

        The controller is the only writer of status and the spec is immutable, so the newest
        body seen (from watch events and from our own status patches) is the object: an API
        GET is only needed for a TaskExecution this process has not seen yet.
        """
        key = (namespace, name)
        if body is not None:
            self.remember(body)
            if self._echo_of_own_write(body):
                return  # the watch echo of our own status patch: the next step waits on a Job
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            te = self._latest.get(key)
            if te is None:
                te = await self.api.get_object(TE, namespace, name)
                if te is not None:
                    self.remember(te)
            if te is None or te["metadata"].get("deletionTimestamp"):
                self.forget(namespace, name)
                return
            try:
                await self._reconcile(te)
            finally:
                await self._mirror_breakers(namespace)
            if TaskState((te.get("status") or {}).get("state", "PENDING")).terminal:
                self.forget(namespace, name)  # nothing left to do: keep no memory of it
        self.metrics.heartbeat()

    def adapter_event(self, type_: str | None, body: dict[str, Any]) -> None:
        """Keep the Adapter cache current from its watch (no GET per reconcile)."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if type_ == "DELETED":
            self._adapters.pop(key, None)
        else:
            self._adapters[key] = body

    async def deleted(self, te: dict[str, Any]) -> None:
        """A TaskExecution was deleted: a task that was not finished is recorded CANCELLED.

        Its Jobs go with it through their owner references; no finalizer is needed.
        """
        meta = te["metadata"]
        self.forget(meta["namespace"], meta["name"])
        try:
            spec = TaskExecutionSpec.model_validate(te["spec"])
            status = TaskExecutionStatus.model_validate(te.get("status") or {})
        except ValidationError:
            return
        if status.state.terminal:
            return
        key = TaskKey(spec.run_id, spec.task_id or meta["name"], meta["uid"], meta["namespace"])
        finish = Finish(
            TaskState.CANCELLED,
            FailureClass.CANCELLED,
            "TaskExecution deleted while it was running",
        )
        if await self._db(self.store.find_task, key) is not None:
            await self._db(self.recorder.end, key, finish)

    async def resync_forever(self) -> None:
        """The safety net of a level-triggered controller: re-reconcile unfinished objects."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            try:
                await self.resync()
            except Exception:
                log.exception("resync failed")

    async def resync(self) -> None:
        for namespace in self.settings.namespaces or (None,):
            for te in await self.api.list_objects(TE, namespace):
                state = (te.get("status") or {}).get("state", "PENDING")
                if not TaskState(state).terminal:
                    await self.reconcile(te["metadata"]["namespace"], te["metadata"]["name"], te)

    # ------------------------------------------------------------------ the state machine

    async def _reconcile(self, te: dict[str, Any]) -> None:
        ctx = await self._context(te)
        if ctx is None or ctx.status.state.terminal:
            return
        record: TaskRecord = await self._db(self.store.task, ctx.key)
        if await self._caught_up(ctx, record):
            return
        match ctx.status.state:
            case TaskState.PENDING:
                await self._pending(ctx, record)
            case TaskState.IN_PROGRESS:
                await self._after_adapter(ctx, record)
            case TaskState.VALIDATING:
                await self._after_gate(ctx, record)

    async def _caught_up(self, ctx: TaskContext, record: TaskRecord) -> bool:
        """Bring status up to what the database recorded (a crash came between the two)."""
        status = ctx.status
        live = record.status in (TaskState.IN_PROGRESS, TaskState.VALIDATING)
        if live and status.state is TaskState.PENDING and record.attempts > status.attempt:
            # the Job of this attempt was created and recorded, its status write was lost
            adapter = record.current_adapter_id or record.adapter_id
            name = job_name(ctx.name, ctx.te["metadata"]["uid"], record.attempts, "adapter")
            started = record.attempt_started_at or self.now()
            new = attempt_started(
                status, attempt=record.attempts, adapter=adapter, job_name=name, trial=False,
                now=started,
            )
            await self._write_status(ctx.te, new)
            return True
        if status.state in (TaskState.IN_PROGRESS, TaskState.VALIDATING):
            done = next((a for a in record.attempt_results if a.attempt == status.attempt), None)
            if done is not None:
                finish = finish_of(done)
                await self._write_status(ctx.te, attempt_recorded(status, done, finish, ""))
                if finish is not None:
                    await self._post_finish(ctx.te, finish, done.attempt)
                return True
        if record.status.terminal and not status.state.terminal:
            last = record.attempt_results[-1] if record.attempt_results else None
            finish = finish_of(last) if last is not None and last.final else None
            if finish is None or finish.state is not record.status:
                finish = Finish(
                    record.status, record.failure_class, record.failure_message or ""
                )
            await self._write_status(ctx.te, task_ended(status, finish, self.now()))
            await self._post_finish(ctx.te, finish, record.attempts)
            return True
        return False

    async def _context(self, te: dict[str, Any]) -> TaskContext | None:
        name = te["metadata"]["name"]
        namespace = te["metadata"]["namespace"]
        status = TaskExecutionStatus.model_validate(te.get("status") or {})
        try:
            spec = TaskExecutionSpec.model_validate(te["spec"])
            task = task_spec(name, spec)
        except ValidationError as exc:
            await self._terminal_invalid(te, status, str(exc).splitlines()[0:3])
            return None
        names = [spec.adapter_ref.name, *(r.name for r in spec.fallback_adapter_refs)]
        adapters: dict[str, AdapterResourceSpec] = {}
        for adapter_name in names:
            obj = self._adapters.get((namespace, adapter_name))
            if obj is None:
                obj = await self.api.get_object(ADAPTERS, namespace, adapter_name)
                if obj is not None:
                    self._adapters[(namespace, adapter_name)] = obj
            if obj is None:
                await self._park(
                    te, status, "AdapterNotFound", f"Adapter {adapter_name!r} not found"
                )
                return None
            adapters[adapter_name] = AdapterResourceSpec.model_validate(obj["spec"])
            await self._ensure_egress(obj, adapters[adapter_name])
        engine = {n: adapter_spec(n, a) for n, a in adapters.items()}
        for adapter_name, adapter in engine.items():
            self._policies[(namespace, adapter_name)] = adapter
        ctx = TaskContext(te, spec, status, task, adapters, TaskPlan.of(task, names, engine))
        synced = (te["metadata"]["uid"], tuple(_generations(self._adapters, namespace, names)))
        if synced not in self._synced:
            seq = int(parse_time(te["metadata"].get("creationTimestamp")).timestamp())
            await self._db(self.store.sync_adapters, namespace, list(engine.values()))
            await self._db(self.store.sync_tasks, [(ctx.key, seq, task, names[0])])
            self._synced.add(synced)
        return ctx

    async def _ensure_egress(self, adapter: dict[str, Any], spec: AdapterResourceSpec) -> None:
        """Keep the Adapter's egress NetworkPolicy in line with its spec (once per change)."""
        meta = adapter["metadata"]
        key = (meta["namespace"], meta["name"], meta.get("generation"))
        if not spec.egress or key in self._egress_applied:
            return
        await self.api.apply_network_policy(meta["namespace"], egress_policy(adapter, spec))
        self._egress_applied.add(key)

    async def _pending(self, ctx: TaskContext, record: TaskRecord) -> None:
        now = self.now()
        breakers = self.breakers(ctx.ns)
        admits = await self._db(breakers.admits_map, ctx.plan.chain.adapter_ids)
        step = next_step(ctx.plan, record.attempt_results, now=now, admits=admits)
        if isinstance(step, Finish):
            await self._end(ctx, step)
            return
        if isinstance(step, Wait):
            await self._wait(ctx, step, now)
            return
        admission = await self._db(breakers.acquire, step.adapter_id)
        if not admission.admitted:
            await self._park(ctx.te, ctx.status, "WaitingForBreaker", admission.reason)
            await self._db(self.recorder.park, ctx.key, admission.reason)
            self._schedule(
                ctx.ns, ctx.name, admission.retry_after_seconds or self.settings.resync_seconds
            )
            return
        await self._start(ctx, step, trial=admission.trial, now=now)

    async def _wait(self, ctx: TaskContext, wait: Wait, now: datetime) -> None:
        if wait.cause is WaitCause.BACKOFF and wait.until is not None:
            if ctx.status.not_before != wait.until:
                await self._write_status(
                    ctx.te, ctx.status.model_copy(update={"not_before": wait.until})
                )
            self._schedule(ctx.ns, ctx.name, (wait.until - now).total_seconds())
            return
        await self._park(ctx.te, ctx.status, "WaitingForBreaker", wait.reason)
        await self._db(self.recorder.park, ctx.key, wait.reason)
        self._schedule(ctx.ns, ctx.name, self.settings.resync_seconds)

    async def _start(self, ctx: TaskContext, start: Start, *, trial: bool, now: datetime) -> None:
        adapter = ctx.plan.adapters[start.adapter_id]
        name = job_name(ctx.name, ctx.te["metadata"]["uid"], start.attempt, "adapter")
        request = RunnerRequest(
            kind="adapter",
            run_id=ctx.key.run_id,
            task=ctx.task,
            adapter=adapter,
            attempt=start.attempt,
            repo_url=ctx.task.repo,
            timeout_seconds=start.timeout_seconds,
            max_log_bytes=self.settings.max_log_bytes,
            max_diff_bytes=self.settings.max_diff_bytes,
            extra_input=start.feedback,
            gate_checks=[],
            gate_baseline=False,
            patch_file=None,
        )
        job = self._job(
            ctx, name, "adapter", start.attempt, request, start.timeout_seconds, start.adapter_id
        )
        await self.api.create_job(ctx.ns, job)
        await self._db(self.recorder.begin, ctx.key, start, started_at=now)
        new = attempt_started(
            ctx.status,
            attempt=start.attempt,
            adapter=start.adapter_id,
            job_name=name,
            trial=trial,
            now=now,
        )
        await self._write_status(ctx.te, new)
        await self.api.post_event(ctx.te, "Normal", "TASK_STARTED", new.message, "Start")

    async def _end(self, ctx: TaskContext, finish: Finish) -> None:
        """A task ends without another attempt (its budget ran out while it waited)."""
        await self._db(self.recorder.end, ctx.key, finish)
        await self._write_status(ctx.te, task_ended(ctx.status, finish, self.now()))
        await self._post_finish(ctx.te, finish, ctx.status.attempt)

    async def _post_finish(self, te: dict[str, Any], finish: Finish, attempts: int) -> None:
        ok = finish.succeeded
        message = f"{finish.state.value} after {attempts} attempt(s)"
        if not ok:
            message += f": {finish.failure_class}: {finish.message}"
        await self.api.post_event(
            te,
            "Normal" if ok else "Warning",
            "TASK_COMPLETED" if ok else "TASK_FAILED",
            message,
            "Finish",
        )

    def _job(
        self,
        ctx: TaskContext,
        name: str,
        role: str,
        attempt: int,
        request: RunnerRequest,
        deadline: float,
        adapter_name: str,
        configmap: str | None = None,
    ) -> dict[str, Any]:
        resource = ctx.adapters[adapter_name]
        return job_manifest(
            te=ctx.te,
            name=name,
            role=role,  # type: ignore[arg-type]
            run_id=ctx.key.run_id,
            task_id=ctx.key.task_id,
            attempt=attempt,
            image=(resource.image if role == "adapter" and resource.image else None)
            or self.settings.runner_image,
            request_json=request.model_dump_json(),
            deadline_seconds=deadline,
            adapter=resource,
            patch_configmap=configmap,
            image_pull_policy=self.settings.image_pull_policy,
            adapter_name=adapter_name,
        )

    async def _collect(
        self, ctx: TaskContext, job: str, role: str, attempt: int
    ) -> RunnerResult | None:
        """Read the runner's report from the pod log and save the log in the task's log file."""
        pods = await self.api.job_pods(ctx.ns, job)
        text = await self.api.pod_log(ctx.ns, pods[-1]["metadata"]["name"]) if pods else None
        if text is None:
            return None
        parsed = parse_pod_log(text)
        await self._db(self._save_log, ctx.key, attempt, role, parsed.records)
        return parsed.result

    def _save_log(
        self, key: TaskKey, attempt: int, role: str, records: list[dict[str, Any]]
    ) -> None:
        path = self.settings.workdir / "logs" / "execution" / f"{key.log_name}.jsonl"
        marker = {"event": f"{role}_log_saved", "attempt": attempt}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("event") == marker["event"] and rec.get("attempt") == attempt:
                    return  # saved before a restart
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps({**rec, "task_id": key.task_id, "attempt": attempt}) + "\n")
            fh.write(
                json.dumps({"ts": self.now().isoformat(), "task_id": key.task_id, **marker})
                + "\n"
            )

    async def _after_adapter(self, ctx: TaskContext, record: TaskRecord) -> None:
        status = ctx.status
        assert status.job_name is not None
        job = await self.api.get_job(ctx.ns, status.job_name)
        if job is not None and job_finished(job) is None:
            return
        result = (
            await self._collect(ctx, status.job_name, "adapter", status.attempt) if job else None
        )
        current = status.attempts[-1]
        evidence = adapter_evidence(current, job, result, now=self.now(), log_path=ctx.log_path)
        if needs_gate(ctx.plan, evidence) and result is not None:
            if result.patch_b64 is None and evidence.diff is not None and not evidence.diff.empty:
                evidence = replace(evidence, gate=diff_too_large(self.settings.max_diff_bytes))
            else:
                await self._start_gate(ctx, evidence, result.patch_b64 or "")
                return
        patch = base64.b64decode(result.patch_b64) if result and result.patch_b64 else None
        await self._conclude(ctx, record, evidence, patch)

    async def _start_gate(self, ctx: TaskContext, evidence: AttemptEvidence, patch: str) -> None:
        status = ctx.status
        adapter_name = status.adapter or ctx.spec.adapter_ref.name
        name = job_name(ctx.name, ctx.te["metadata"]["uid"], status.attempt, "gate")
        cm = f"{name}-patch"
        await self.api.create_configmap(ctx.ns, configmap_manifest(ctx.te, cm, patch))
        checks = ctx.plan.gate_checks(adapter_name)
        request = RunnerRequest(
            kind="gate",
            run_id=ctx.key.run_id,
            task=ctx.task,
            adapter=ctx.plan.adapters[adapter_name],
            attempt=status.attempt,
            repo_url=ctx.task.repo,
            timeout_seconds=sum(c.timeout_seconds for c in checks) or 60,
            max_log_bytes=self.settings.max_log_bytes,
            max_diff_bytes=self.settings.max_diff_bytes,
            extra_input=None,
            gate_checks=list(checks),
            gate_baseline=ctx.task.gate_baseline,
            patch_file=f"{PATCH_DIR}/patch",
        )
        deadline = request.timeout_seconds * (2 if ctx.task.gate_baseline else 1) + 120
        await self.api.create_job(
            ctx.ns,
            self._job(ctx, name, "gate", status.attempt, request, deadline, adapter_name, cm),
        )
        await self._db(self.store.set_validating, ctx.key)
        await self._write_status(ctx.te, gate_started(status, evidence, name))

    async def _after_gate(self, ctx: TaskContext, record: TaskRecord) -> None:
        status = ctx.status
        assert status.gate_job_name is not None
        job = await self.api.get_job(ctx.ns, status.gate_job_name)
        if job is not None and job_finished(job) is None:
            return
        result = (
            await self._collect(ctx, status.gate_job_name, "gate", status.attempt) if job else None
        )
        cm = await self.api.get_configmap(ctx.ns, f"{status.gate_job_name}-patch")
        raw = ((cm or {}).get("binaryData") or {}).get("patch")
        patch = base64.b64decode(raw) if raw else None
        evidence = gate_evidence(
            status.attempts[-1], job, result, now=self.now(), log_path=ctx.log_path
        )
        await self._conclude(ctx, record, evidence, patch)

    async def _conclude(
        self,
        ctx: TaskContext,
        record: TaskRecord,
        evidence: AttemptEvidence,
        patch: bytes | None,
    ) -> None:
        history = [a for a in record.attempt_results if a.attempt < evidence.attempt]
        verdict = conclude(ctx.plan, history, evidence, rng=self.rng)
        trial = ctx.status.attempts[-1].trial if ctx.status.attempts else False
        outcome = await self._db(
            self.recorder.record,
            ctx.key,
            ctx.task.base_commit,
            verdict,
            breakers=self.breakers(ctx.ns),
            trial=trial,
            patch=patch,
        )
        result = outcome.entry.result
        why = verdict.decision.reason
        await self._write_status(ctx.te, attempt_recorded(ctx.status, result, outcome.finish, why))
        if outcome.finish is not None:
            await self._post_finish(ctx.te, outcome.finish, result.attempt)
        else:
            delay = (result.finished_at - self.now()).total_seconds() + result.backoff_seconds
            self._schedule(ctx.ns, ctx.name, delay)

    # ------------------------------------------------------------------ status writes

    async def _park(
        self, te: dict[str, Any], status: TaskExecutionStatus, reason: str, message: str
    ) -> None:
        if status.reason == reason and status.message == message:
            return  # nothing new to say: no write
        await self._write_status(
            te, status.model_copy(update={"reason": reason, "message": message})
        )

    async def _terminal_invalid(
        self, te: dict[str, Any], status: TaskExecutionStatus, problems: list[str]
    ) -> None:
        if status.state.terminal:
            return
        message = "invalid TaskExecution: " + " ".join(problems)
        new = status.model_copy(
            update={"state": TaskState.FAILED, "reason": "InvalidSpec", "message": message[:1000]}
        )
        await self._write_status(te, new)
        await self.api.post_event(te, "Warning", "TASK_FAILED", message, "Validate")

    async def _write_status(self, te: dict[str, Any], status: TaskExecutionStatus) -> None:
        """The one code path that writes TaskExecution status (and owns its conditions)."""
        generation = te["metadata"].get("generation")
        status = set_conditions(status, self.now(), generation)
        body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["observedGeneration"] = generation
        # merge patch: explicitly clear fields that are now unset
        for name in ("notBefore", "gateJobName", "failureClass"):
            body.setdefault(name, None)
        updated = await self.api.patch_status(
            TE, te["metadata"]["namespace"], te["metadata"]["name"], body
        )
        if updated is not None:
            te["status"] = updated.get("status", body)
            self.remember(updated)
            meta = updated["metadata"]
            self._written[(meta["namespace"], meta["name"])] = meta.get("resourceVersion")

    def _echo_of_own_write(self, body: dict[str, Any]) -> bool:
        """A watch event carrying exactly our last status patch, while a Job runs."""
        meta = body["metadata"]
        written = self._written.get((meta["namespace"], meta["name"]))
        state = (body.get("status") or {}).get("state")
        running = state in (TaskState.IN_PROGRESS.value, TaskState.VALIDATING.value)
        return running and written is not None and written == meta.get("resourceVersion")

    def remember(self, body: dict[str, Any]) -> None:
        """Keep ``body`` as the newest known state of its TaskExecution, unless it is older."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        known = self._latest.get(key)
        if known is not None and _older(meta, known["metadata"]):
            return
        self._latest[key] = body

    def forget(self, namespace: str, name: str) -> None:
        self._latest.pop((namespace, name), None)
        self._written.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)

    # ------------------------------------------------------------------ breakers, timers

    async def _mirror_breakers(self, namespace: str) -> None:
        """Copy breaker transitions into the Adapter resources' status (only on change)."""
        changes = self._breaker_changes.get(namespace)
        if not changes:
            return
        pending = list(changes)
        changes.clear()
        breakers = self.breakers(namespace)
        for adapter in {c.adapter_id for c in pending}:
            snap = await self._db(breakers.view, adapter)
            status = AdapterResourceStatus(
                breaker_state=snap.state.value,
                consecutive_failures=snap.consecutive_failures,
                opened_at=snap.opened_at,
                message=[c for c in pending if c.adapter_id == adapter][-1].reason,
            )
            await self.api.patch_status(
                ADAPTERS, namespace, adapter, status.model_dump(mode="json", by_alias=True)
            )

    def _schedule(self, namespace: str, name: str, delay: float) -> None:
        key = (namespace, name)
        if (old := self._timers.pop(key, None)) is not None:
            old.cancel()
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(key, None)
            task = loop.create_task(self.reconcile(namespace, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._timers[key] = loop.call_later(max(delay, 0.05), fire)

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)


def _older(meta: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether ``meta`` describes an older version of the same object than ``than``.

    resourceVersions are opaque in general but are etcd revisions (integers) in practice;
    anything else (or another object with the same name: a new uid) counts as newer.
    """
    if meta.get("uid") != than.get("uid"):
        return False
    try:
        return int(meta.get("resourceVersion", 0)) < int(than.get("resourceVersion", 0))
    except ValueError:
        return False


def _generations(
    cache: dict[tuple[str, str], dict[str, Any]], namespace: str, names: list[str]
) -> list[tuple[str, int | None]]:
    return [(n, cache.get((namespace, n), {}).get("metadata", {}).get("generation")) for n in names]

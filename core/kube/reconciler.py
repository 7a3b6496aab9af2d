"""The operator's reconciler: the Kubernetes driver of the one attempt lifecycle.

One call of :meth:`Controller.sync` is one level-triggered step for one key of the work
queue (see :mod:`core.kube.control_loop`): it looks at the TaskExecution (from the watch
cache), the database record of its task and the Jobs its status names, takes the next step,
and says when to look again. The decisions (which adapter, how much budget, whether to gate,
retry or finish, in which state) are the lifecycle's (:mod:`core.engine.lifecycle`); the
writes are the recorder's (ledger, database with the breaker, event log). Status is a
projection of what was recorded, written through one code path with a resourceVersion
precondition.

    PENDING     -> lifecycle.next_step: start (create the adapter Job), wait, or finish
    IN_PROGRESS -> pod pending: triage (image pull, Secret, scheduling); container started:
                   the budget counts from there; Job done: read the runner's report from the
                   pod log, save logs; lifecycle.needs_gate -> patch ConfigMap + gate Job,
                   else conclude
    VALIDATING  -> gate Job done: conclude with the gate's result
    conclude    -> lifecycle.conclude, Recorder.record, then status and an Event

Nothing here swallows an error: an exception goes back to the work queue, which retries the
key with a per-key backoff (and :meth:`Controller.report_error` shows it in the status). Only
a confirmed 404 means an object is gone; an object with our name that we do not own is never
used.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
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
    conclude,
    interrupted_evidence,
    needs_gate,
    next_step,
)
from core.engine.monitoring.metrics import Metrics
from core.engine.recorder import Recorder, finish_of
from core.engine.resilience.breaker_store import CircuitBreakers, RowBreakerStore
from core.engine.resilience.circuit_breaker import BreakerTransition
from core.errors import ConflictError, RejectedError
from core.identity import TaskKey
from core.kube.api import Body, KubeApi, is_owned_by
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
    BACKSTOP_GRACE_SECONDS,
    PATCH_DIR,
    egress_policy,
    egress_policy_action,
    egress_policy_name,
    job_finished,
    job_manifest,
    job_name,
)
from core.kube.jobs import patch_configmap as configmap_manifest
from core.kube.pods import triage
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

#: Work-queue keys: ("task", namespace, name) or ("gone", namespace, name, run, task, uid).
Key = tuple[str, ...]

__all__ = ["Controller", "ControllerSettings", "Key", "TaskContext"]

#: How often to look at an attempt whose pod has not started yet.
PENDING_POLL_SECONDS = 5.0


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

    te: Body
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
    def uid(self) -> str:
        return str(self.te["metadata"]["uid"])

    @property
    def log_path(self) -> str:
        return f"logs/execution/{self.key.log_name}.jsonl"


def task_key(namespace: str, name: str) -> Key:
    return ("task", namespace, name)


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
        # the watch cache: unfinished TaskExecutions, Adapters, the operator's Jobs
        self.tasks: dict[tuple[str, str], Body] = {}
        self.adapters: dict[tuple[str, str], Body] = {}
        self.jobs: dict[tuple[str, str], Body] = {}
        self._users: dict[tuple[str, str], set[str]] = {}  # Adapter -> TaskExecution names
        self._synced: set[tuple[str, tuple[tuple[str, int | None], ...]]] = set()
        self._egress: set[tuple[str, str, str, int | None]] = set()
        self._reported: dict[tuple[str, str], str] = {}

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

    # ------------------------------------------------------------------ watch events

    def observe_task(self, type_: str, body: Body) -> list[Key]:
        """A TaskExecution watch event: update the cache; the keys to (re)consider."""
        meta = body["metadata"]
        where = (meta.get("namespace", ""), meta["name"])
        known = self.tasks.get(where)
        if type_ == "DELETED":
            self.tasks.pop(where, None)
            spec = body.get("spec")
            state = (body.get("status") or {}).get("state", "PENDING")
            if spec is None or TaskState(state).terminal:
                return []
            run_id = str(spec.get("runId") or "k8s")
            task_id = str(spec.get("taskId") or meta["name"])
            return [("gone", *where, run_id, task_id, str(meta.get("uid", "")))]
        if TaskState((body.get("status") or {}).get("state", "PENDING")).terminal:
            self.tasks.pop(where, None)
            return []
        same = known is not None and known["metadata"].get("uid") == meta.get("uid")
        if same and not _newer(meta, known["metadata"]):  # type: ignore[index]
            return []  # an echo of our own write, or older: already known
        self.tasks[where] = _trim(body)
        spec = body.get("spec") or {}
        refs = [spec.get("adapterRef") or {}, *(spec.get("fallbackAdapterRefs") or [])]
        for ref in refs:
            if ref.get("name"):
                self._users.setdefault((where[0], str(ref["name"])), set()).add(where[1])
        return [task_key(*where)]

    def observe_adapter(self, type_: str, body: Body) -> list[Key]:
        """An Adapter watch event: the TaskExecutions that use it look again."""
        meta = body["metadata"]
        where = (meta.get("namespace", ""), meta["name"])
        if type_ == "DELETED":
            self.adapters.pop(where, None)
        else:
            self.adapters[where] = _trim(body)
        users = self._users.get(where, set())
        return [
            task_key(where[0], name) for name in sorted(users) if (where[0], name) in self.tasks
        ]

    def observe_job(self, type_: str, body: Body) -> list[Key]:
        """A Job watch event: its TaskExecution looks again when it finished or vanished."""
        meta = body["metadata"]
        where = (meta.get("namespace", ""), meta["name"])
        if type_ == "DELETED":
            self.jobs.pop(where, None)
        else:
            self.jobs[where] = _slim_job(body)
        if type_ != "DELETED" and job_finished(body) is None:
            return []
        return [
            task_key(where[0], str(ref["name"]))
            for ref in meta.get("ownerReferences") or []
            if ref.get("kind") == "TaskExecution"
        ]

    def unfinished_keys(self) -> list[Key]:
        """Every cached TaskExecution that is not terminal (the resync set)."""
        return [task_key(*where) for where in sorted(self.tasks)]

    # ------------------------------------------------------------------ the queue handler

    async def sync(self, key: Key) -> float | None:
        """One step for one key; returns when to look again (None: when something changes)."""
        if key[0] == "gone":
            _, namespace, name, run_id, task_id, uid = key
            await self._gone(TaskKey(run_id, task_id, uid, namespace))
            return None
        _, namespace, name = key
        te = self.tasks.get((namespace, name))
        if te is None:
            return None
        try:
            return await self._sync(te)
        finally:
            await self._mirror_breakers(namespace)
            self.metrics.heartbeat()

    async def report_error(self, key: Key, error: BaseException) -> None:
        """Show why a key keeps failing in its TaskExecution's status (best effort)."""
        if key[0] != "task":
            return
        te = self.tasks.get((key[1], key[2]))
        if te is None:
            return
        message = f"{type(error).__name__}: {error}"[:900]
        if self._reported.get((key[1], key[2])) == message:
            return
        self._reported[(key[1], key[2])] = message
        status = TaskExecutionStatus.model_validate(te.get("status") or {})
        try:
            await self._park(te, status, "ReconcileError", message)
        except Exception:  # the error is in the queue's log already
            log.debug("could not report the error of %s", key, exc_info=True)

    async def sweep(self, namespaces: tuple[str, ...]) -> int:
        """Record CANCELLED every unfinished task whose TaskExecution is gone (deleted while
        no operator was leading). Call once the TaskExecution cache is complete."""
        live = {str(te["metadata"].get("uid")) for te in self.tasks.values()}
        records = await self._db(self.store.unfinished)
        gone = [
            r
            for r in records
            if r.key.uid
            and r.key.uid not in live
            and (not namespaces or r.key.scope in namespaces)
        ]
        for record in gone:
            await self._gone(record.key)
        return len(gone)

    async def _gone(self, key: TaskKey) -> None:
        finish = Finish(
            TaskState.CANCELLED,
            FailureClass.CANCELLED,
            "TaskExecution deleted while it was running",
        )
        record = await self._db(self.store.find_task, key)
        if record is not None and not record.status.terminal:
            await self._db(self.recorder.end, key, finish)

    # ------------------------------------------------------------------ the state machine

    async def _sync(self, te: Body) -> float | None:
        if te["metadata"].get("deletionTimestamp"):
            return None
        ctx = await self._context(te)
        if ctx is None or ctx.status.state.terminal:
            return None
        record: TaskRecord = await self._db(self.store.task, ctx.key)
        if await self._caught_up(ctx, record):
            return 0.0
        match ctx.status.state:
            case TaskState.PENDING:
                return await self._pending(ctx, record)
            case TaskState.IN_PROGRESS:
                return await self._after_adapter(ctx, record)
            case TaskState.VALIDATING:
                return await self._after_gate(ctx, record)
        return None

    async def _caught_up(self, ctx: TaskContext, record: TaskRecord) -> bool:
        """Bring status up to what the database recorded (a crash came between the two)."""
        status = ctx.status
        live = record.status in (TaskState.IN_PROGRESS, TaskState.VALIDATING)
        if live and status.state is TaskState.PENDING and record.attempts > status.attempt:
            # the Job of this attempt was created and recorded, its status write was lost
            adapter = record.current_adapter_id or record.adapter_id
            name = job_name(ctx.name, ctx.uid, record.attempts, "adapter")
            started = record.attempt_started_at or self.now()
            new = attempt_started(
                status,
                attempt=record.attempts,
                adapter=adapter,
                job_name=name,
                trial=False,
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
                finish = Finish(record.status, record.failure_class, record.failure_message or "")
            await self._write_status(ctx.te, task_ended(status, finish, self.now()))
            await self._post_finish(ctx.te, finish, record.attempts)
            return True
        return False

    async def _context(self, te: Body) -> TaskContext | None:
        name = te["metadata"]["name"]
        namespace = te["metadata"]["namespace"]
        status = TaskExecutionStatus.model_validate(te.get("status") or {})
        try:
            spec = TaskExecutionSpec.model_validate(te["spec"])
            task = task_spec(name, spec)
        except ValidationError as exc:
            await self._terminal_invalid(te, status, _problems(exc))
            return None
        names = [spec.adapter_ref.name, *(r.name for r in spec.fallback_adapter_refs)]
        adapters: dict[str, AdapterResourceSpec] = {}
        for adapter_name in names:
            obj = self.adapters.get((namespace, adapter_name))
            if obj is None:
                obj = await self.api.get_object(ADAPTERS, namespace, adapter_name)
                if obj is not None:
                    self.adapters[(namespace, adapter_name)] = _trim(obj)
            if obj is None:
                field = (
                    "spec.adapterRef" if adapter_name == names[0] else "spec.fallbackAdapterRefs"
                )
                await self._park(
                    te,
                    status,
                    "AdapterNotFound",
                    f"{field}: Adapter {adapter_name!r} not found in namespace {namespace}; "
                    "create it (kubectl apply) and this TaskExecution starts",
                )
                return None
            try:
                adapters[adapter_name] = AdapterResourceSpec.model_validate(obj["spec"])
            except ValidationError as exc:
                problems = [f"Adapter {adapter_name}: {p}" for p in _problems(exc)]
                await self._park(te, status, "InvalidAdapter", " ".join(problems)[:1000])
                return None
            await self._ensure_egress(obj, adapters[adapter_name])
        engine = {n: adapter_spec(n, a) for n, a in adapters.items()}
        for adapter_name, adapter in engine.items():
            self._policies[(namespace, adapter_name)] = adapter
        ctx = TaskContext(te, spec, status, task, adapters, TaskPlan.of(task, names, engine))
        synced = (ctx.uid, tuple(_generations(self.adapters, namespace, names)))
        if synced not in self._synced:
            seq = int(parse_time(te["metadata"].get("creationTimestamp")).timestamp())
            await self._db(self.store.sync_adapters, namespace, list(engine.values()))
            await self._db(self.store.sync_tasks, [(ctx.key, seq, task, names[0])])
            self._synced.add(synced)
        return ctx

    async def _ensure_egress(self, adapter: Body, spec: AdapterResourceSpec) -> None:
        """Keep the Adapter's egress NetworkPolicy in line with its spec (once per change);
        a policy of that name that the operator does not own is reported, never changed."""
        meta = adapter["metadata"]
        mark = (meta["namespace"], meta["name"], str(meta.get("uid")), meta.get("generation"))
        if mark in self._egress:
            return
        name = egress_policy_name(meta["name"])
        existing = await self.api.get_object("networkpolicies", meta["namespace"], name)
        action = egress_policy_action(existing, adapter, spec)
        if action == "create":
            await self.api.create_object(
                "networkpolicies", meta["namespace"], egress_policy(adapter, spec)
            )
            return  # created, or raced: decide again on the next step
        if action == "patch" and existing is not None:
            await self.api.patch_object(
                "networkpolicies",
                meta["namespace"],
                name,
                {"spec": egress_policy(adapter, spec)["spec"]},
                resource_version=existing["metadata"]["resourceVersion"],
            )
        elif action == "foreign":
            await self.api.post_event(
                adapter,
                "Warning",
                "ForeignNetworkPolicy",
                f"NetworkPolicy {name} exists and is not this Adapter's: left alone, so "
                "spec.egress is not applied; rename or delete it",
                "Egress",
            )
        self._egress.add(mark)

    async def _pending(self, ctx: TaskContext, record: TaskRecord) -> float | None:
        now = self.now()
        breakers = self.breakers(ctx.ns)
        admits = await self._db(breakers.admits_map, ctx.plan.chain.adapter_ids)
        step = next_step(ctx.plan, record.attempt_results, now=now, admits=admits)
        if isinstance(step, Finish):
            await self._end(ctx, step)
            return None
        if isinstance(step, Wait):
            return await self._wait(ctx, step, now)
        admission = await self._db(breakers.acquire, step.adapter_id)
        if not admission.admitted:
            await self._park(ctx.te, ctx.status, "WaitingForBreaker", admission.reason)
            await self._db(self.recorder.park, ctx.key, admission.reason)
            return admission.retry_after_seconds or self.settings.resync_seconds
        return await self._start(ctx, step, trial=admission.trial, now=now)

    async def _wait(self, ctx: TaskContext, wait: Wait, now: datetime) -> float:
        if wait.until is not None:
            if ctx.status.not_before != wait.until:
                await self._write_status(
                    ctx.te, ctx.status.model_copy(update={"not_before": wait.until})
                )
            return max(0.0, (wait.until - now).total_seconds())
        await self._park(ctx.te, ctx.status, "WaitingForBreaker", wait.reason)
        await self._db(self.recorder.park, ctx.key, wait.reason)
        return self.settings.resync_seconds

    async def _start(
        self, ctx: TaskContext, start: Start, *, trial: bool, now: datetime
    ) -> float | None:
        adapter = ctx.plan.adapters[start.adapter_id]
        name = job_name(ctx.name, ctx.uid, start.attempt, "adapter")
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
        # the Job's deadline is only a backstop: the runner enforces the budget itself, from
        # its container's start; pulling and scheduling have their own limit
        deadline = start.timeout_seconds + ctx.spec.pending_timeout_seconds
        job = self._job(ctx, name, "adapter", start.attempt, request, deadline, start.adapter_id)
        if not await self._create_owned_job(ctx, job):
            return 60.0
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
        return PENDING_POLL_SECONDS

    async def _create_owned_job(self, ctx: TaskContext, job: Body) -> bool:
        """Create the Job; on 409 use the existing one only if it is this TaskExecution's."""
        try:
            created = await self.api.create_job(ctx.ns, job)
        except RejectedError as exc:
            if exc.status in (400, 422):  # the API server will refuse this spec every time
                await self._terminal_invalid(ctx.te, ctx.status, [exc.message])
                return False
            raise
        if created.created or is_owned_by(created.object, ctx.uid):
            self.jobs[(ctx.ns, job["metadata"]["name"])] = _slim_job(created.object)
            return True
        await self._foreign(ctx, "Job", job["metadata"]["name"])
        return False

    async def _foreign(self, ctx: TaskContext, kind: str, name: str) -> None:
        message = (
            f"{kind} {ctx.ns}/{name} exists and is not owned by this TaskExecution: it is "
            "never used; delete it (or the TaskExecution) to go on"
        )
        if ctx.status.reason != "ForeignObject":
            await self.api.post_event(ctx.te, "Warning", "ForeignObject", message, "Adopt")
        await self._park(ctx.te, ctx.status, "ForeignObject", message)

    async def _end(self, ctx: TaskContext, finish: Finish) -> None:
        """A task ends without another attempt (its budget ran out while it waited)."""
        await self._db(self.recorder.end, ctx.key, finish)
        await self._write_status(ctx.te, task_ended(ctx.status, finish, self.now()))
        await self._post_finish(ctx.te, finish, ctx.status.attempt)

    async def _post_finish(self, te: Body, finish: Finish, attempts: int) -> None:
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
    ) -> Body:
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

    async def _get_job(self, namespace: str, name: str) -> Body | None:
        """The Job from the watch cache; a miss is confirmed with the API (404 = gone)."""
        cached = self.jobs.get((namespace, name))
        if cached is not None:
            return cached
        job = await self.api.get_job(namespace, name)
        if job is not None:
            self.jobs[(namespace, name)] = _slim_job(job)
        return job

    async def _collect(
        self, ctx: TaskContext, job: str, role: str, attempt: int
    ) -> tuple[RunnerResult | None, str | None]:
        """The runner's report and its own failure reason from the pod log (log saved)."""
        pods = await self.api.job_pods(ctx.ns, job)
        text = await self.api.pod_log(ctx.ns, pods[-1]["metadata"]["name"]) if pods else None
        if text is None:
            return None, None
        parsed = parse_pod_log(text)
        await self._db(self._save_log, ctx.key, attempt, role, parsed.records)
        failed = [r.get("error") for r in parsed.records if r.get("event") == "runner_failed"]
        return parsed.result, str(failed[-1]) if failed and failed[-1] else None

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

    async def _triage(self, ctx: TaskContext, job: Body, role: str) -> float | None:
        """A running Job whose container has not started: wait, or end the attempt early."""
        current = ctx.status.attempts[-1]
        if role == "adapter" and current.pod_started_at is not None:
            return None  # running: the Job's events bring us back
        pods = await self.api.job_pods(ctx.ns, job["metadata"]["name"])
        created = parse_time(job["metadata"].get("creationTimestamp"))
        verdict = triage(
            pods,
            created_at=created,
            now=self.now(),
            pending_timeout_seconds=ctx.spec.pending_timeout_seconds,
        )
        if verdict.started_at is not None:
            if role == "adapter":
                attempts = list(ctx.status.attempts)
                attempts[-1] = current.model_copy(update={"pod_started_at": verdict.started_at})
                message = f"attempt {current.attempt} on adapter {current.adapter} is running"
                new = ctx.status.model_copy(update={"attempts": attempts, "message": message})
                await self._write_status(ctx.te, new)
            return None
        if verdict.problem is None:
            waiting = f"{role} pod pending: {verdict.waiting}"
            await self._park(ctx.te, ctx.status, ctx.status.reason or "Pending", waiting)
            return PENDING_POLL_SECONDS
        await self.api.delete_job(ctx.ns, job["metadata"]["name"], uid=job["metadata"]["uid"])
        record = await self._db(self.store.task, ctx.key)
        reason = verdict.problem if role == "adapter" else f"test gate: {verdict.problem}"
        evidence = interrupted_evidence(
            attempt=current.attempt,
            adapter_id=current.adapter,
            started_at=current.started_at or created,
            granted_seconds=0.0,  # the adapter never ran: nothing of its budget is charged
            now=self.now(),
            reason=reason,
        )
        await self._conclude(ctx, record, evidence, None)
        return 0.0

    async def _after_adapter(self, ctx: TaskContext, record: TaskRecord) -> float | None:
        status = ctx.status
        assert status.job_name is not None
        job = await self._get_job(ctx.ns, status.job_name)
        if job is not None and job_finished(job) is None:
            return await self._triage(ctx, job, "adapter")
        result, runner_error = (
            await self._collect(ctx, status.job_name, "adapter", status.attempt)
            if job
            else (None, None)
        )
        current = status.attempts[-1]
        evidence = adapter_evidence(
            current,
            job,
            result,
            now=self.now(),
            log_path=ctx.log_path,
            runner_error=runner_error,
        )
        if needs_gate(ctx.plan, evidence) and result is not None:
            if result.patch_b64 is None and evidence.diff is not None and not evidence.diff.empty:
                evidence = replace(evidence, gate=diff_too_large(self.settings.max_diff_bytes))
            else:
                return await self._start_gate(ctx, evidence, result.patch_b64 or "")
        patch = base64.b64decode(result.patch_b64) if result and result.patch_b64 else None
        await self._conclude(ctx, record, evidence, patch)
        return 0.0

    async def _start_gate(
        self, ctx: TaskContext, evidence: AttemptEvidence, patch: str
    ) -> float | None:
        status = ctx.status
        adapter_name = status.adapter or ctx.spec.adapter_ref.name
        name = job_name(ctx.name, ctx.uid, status.attempt, "gate")
        cm = f"{name}-patch"
        made = await self.api.create_configmap(ctx.ns, configmap_manifest(ctx.te, cm, patch))
        if not made.created and not _own_patch(made.object, ctx.uid, evidence):
            await self._foreign(ctx, "ConfigMap", cm)
            return 60.0
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
        deadline = (
            request.timeout_seconds * (2 if ctx.task.gate_baseline else 1)
            + ctx.spec.pending_timeout_seconds
            + BACKSTOP_GRACE_SECONDS
        )
        job = self._job(ctx, name, "gate", status.attempt, request, deadline, adapter_name, cm)
        if not await self._create_owned_job(ctx, job):
            return 60.0
        await self._db(self.store.set_validating, ctx.key)
        await self._write_status(ctx.te, gate_started(status, evidence, name))
        return PENDING_POLL_SECONDS

    async def _after_gate(self, ctx: TaskContext, record: TaskRecord) -> float | None:
        status = ctx.status
        assert status.gate_job_name is not None
        job = await self._get_job(ctx.ns, status.gate_job_name)
        if job is not None and job_finished(job) is None:
            return await self._triage(ctx, job, "gate")
        result, runner_error = (
            await self._collect(ctx, status.gate_job_name, "gate", status.attempt)
            if job
            else (None, None)
        )
        cm = await self.api.get_configmap(ctx.ns, f"{status.gate_job_name}-patch")
        raw = ((cm or {}).get("binaryData") or {}).get("patch")
        patch = base64.b64decode(raw) if raw and cm and is_owned_by(cm, ctx.uid) else None
        evidence = gate_evidence(
            status.attempts[-1],
            job,
            result,
            now=self.now(),
            log_path=ctx.log_path,
            runner_error=runner_error,
        )
        await self._conclude(ctx, record, evidence, patch)
        return 0.0

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

    # ------------------------------------------------------------------ status writes

    async def _park(
        self, te: Body, status: TaskExecutionStatus, reason: str, message: str
    ) -> None:
        if status.reason == reason and status.message == message:
            return  # nothing new to say: no write
        await self._write_status(
            te, status.model_copy(update={"reason": reason, "message": message})
        )

    async def _terminal_invalid(
        self, te: Body, status: TaskExecutionStatus, problems: list[str]
    ) -> None:
        if status.state.terminal:
            return
        message = "invalid TaskExecution: " + " ".join(problems)
        new = status.model_copy(
            update={"state": TaskState.FAILED, "reason": "InvalidSpec", "message": message[:1000]}
        )
        await self._write_status(te, new)
        await self.api.post_event(te, "Warning", "TASK_FAILED", message, "Validate")

    async def _write_status(self, te: Body, status: TaskExecutionStatus) -> None:
        """The one code path that writes TaskExecution status (and owns its conditions).

        The write carries the resourceVersion the decision was made on: if the object changed
        since, the API server refuses (409) and the cache is refreshed, so the next step
        decides again on what is there now.
        """
        meta = te["metadata"]
        generation = meta.get("generation")
        status = set_conditions(status, self.now(), generation)
        body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["observedGeneration"] = generation
        # merge patch: explicitly clear fields that are now unset
        for name in ("notBefore", "gateJobName", "failureClass"):
            body.setdefault(name, None)
        try:
            updated = await self.api.patch_status(
                TE,
                meta["namespace"],
                meta["name"],
                body,
                resource_version=meta.get("resourceVersion"),
            )
        except ConflictError:
            fresh = await self.api.get_object(TE, meta["namespace"], meta["name"])
            if fresh is not None:
                self.observe_task("MODIFIED", fresh)
            raise
        if updated is None:
            self.tasks.pop((meta["namespace"], meta["name"]), None)  # deleted meanwhile
            return
        te["status"] = updated.get("status", body)
        te["metadata"] = {**meta, "resourceVersion": updated["metadata"]["resourceVersion"]}
        where = (meta["namespace"], meta["name"])
        if TaskState(te["status"].get("state", "PENDING")).terminal:
            self.tasks.pop(where, None)
        elif where in self.tasks:
            self.tasks[where] = te

    # ------------------------------------------------------------------ breakers

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

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)


def _problems(exc: ValidationError) -> list[str]:
    """Each problem as ``field: message`` (the field named as in the manifest)."""
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        out.append(f"spec.{where}: {err['msg']}" if where else str(err["msg"]))
    return out[:5]


def _own_patch(cm: Body, uid: str, evidence: AttemptEvidence) -> bool:
    """Whether an existing patch ConfigMap is ours and holds exactly this attempt's diff."""
    if not is_owned_by(cm, uid):
        return False
    raw = (cm.get("binaryData") or {}).get("patch") or ""
    sha = hashlib.sha256(base64.b64decode(raw)).hexdigest()
    return evidence.diff is not None and sha == evidence.diff.sha256


def _trim(body: Body) -> Body:
    """What the cache keeps of an object: everything but the server's field bookkeeping."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return {**body, "metadata": meta}


def _slim_job(job: Body) -> Body:
    """What the reconciler reads of a Job: identity, owners and status."""
    meta = job["metadata"]
    keep = ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp")
    return {
        "apiVersion": job.get("apiVersion", "batch/v1"),
        "kind": "Job",
        "metadata": {k: meta[k] for k in keep if k in meta},
        "status": job.get("status") or {},
    }


def _newer(meta: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether ``meta`` is a newer version than ``than`` (resourceVersions are etcd revisions
    in practice; anything unparsable counts as newer)."""
    try:
        return int(meta.get("resourceVersion", 0)) > int(than.get("resourceVersion", 0))
    except ValueError:
        return meta.get("resourceVersion") != than.get("resourceVersion")


def _generations(
    cache: dict[tuple[str, str], Body], namespace: str, names: list[str]
) -> list[tuple[str, int | None]]:
    return [(n, cache.get((namespace, n), {}).get("metadata", {}).get("generation")) for n in names]

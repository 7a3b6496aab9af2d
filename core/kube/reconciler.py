"""The operator's reconciler: the Kubernetes driver of the one attempt lifecycle.

One call of :meth:`Controller.sync` is one level-triggered step for one key of the work
queue (see :mod:`core.kube.control_loop`): it looks at the TaskExecution (from the watch
cache), the database record of its task and the Jobs its status names, takes the next step,
and says when to look again. The decisions (which adapter, how much budget, whether to gate,
retry or finish, in which state) are the lifecycle's (:mod:`core.engine.lifecycle`); the
writes are the recorder's (ledger, database with the breaker, event log). Status is a
projection of what was recorded, written through one code path with a resourceVersion
precondition.

    PENDING     -> lifecycle.next_step: start (create the adapter Job), wait, or finish;
                   the Job is created first: a start reads the database (one thread trip
                   for the breakers, the step and the pod's stored request) but writes
                   nothing; the rest (the task's row if it is new, the attempt's record,
                   IN_PROGRESS status, TASK_STARTED Event) follows as LOW work of the queue,
                   so a burst of new tasks gets its Jobs before their paperwork
    IN_PROGRESS -> pod pending: triage (image pull, Secret, scheduling); container started:
                   the budget counts from there; Job done: read the runner's small report
                   from the pod log, check and adopt its uploads (full log, full diff:
                   core.kube.attempt_io); lifecycle.needs_gate -> gate Job, else conclude
    VALIDATING  -> gate Job done: conclude with the gate's result
    conclude    -> lifecycle.conclude (with the attempt's redactor), Recorder.record, then
                   status and an Event; the attempt's Jobs get their short TTL

Nothing here swallows an error: an exception goes back to the work queue, which retries the
key with a per-key backoff (and :meth:`Controller.report_error` shows it in the status). Only
a confirmed 404 means an object is gone; an object with our name that we do not own is never
used.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from core.db.store import Store, TaskRecord, TaskRow
from core.engine.evidence_grants import GrantingStore
from core.engine.lifecycle import (
    AttemptEvidence,
    Finish,
    Start,
    Wait,
    base_of,
    conclude,
    interrupted_evidence,
    needs_gate,
    next_step,
)
from core.engine.monitoring.metrics import Metrics
from core.engine.recorder import Recorder, finish_of
from core.engine.resilience import Admission
from core.errors import EvidenceError, RejectedError, RequestTooLargeError
from core.identity import TaskKey
from core.kube.adapter_breakers import AdapterBreakers
from core.kube.api import Body, KubeApi, is_owned_by
from core.kube.attempt_io import AttemptIO, PatchInput, PodInputs
from core.kube.attempts import (
    adapter_evidence,
    attempt_recorded,
    attempt_started,
    gate_evidence,
    gate_started,
    parse_time,
    task_ended,
)
from core.kube.jobs import (
    BACKSTOP_GRACE_SECONDS,
    PATCH_SOURCE_FILE,
    RunnerStorage,
    job_finished,
    job_manifest,
    job_name,
    patch_source_volume,
)
from core.kube.pod_logs import read_report, save_log
from core.kube.pods import job_counts_pods, storage_eviction, triage
from core.kube.queueing import QUEUED_REASON, pending_since, queue_wait, queued
from core.kube.redactors import operator_redactor
from core.kube.status_writer import StatusWriter
from core.kube.task_context import TaskContext, TaskContexts
from core.kube.watch_cache import Key, WatchCache, slim_job
from core.kube.workqueue import Later
from core.models import AdapterKind, AttemptResult, FailureClass, TaskSpec, TaskState
from core.resources import (
    TaskExecutionStatus,
)
from core.runner.protocol import DEFAULT_PATCH_FILE, RunnerRequest, RunnerResult

log = logging.getLogger("orchestrator.operator")
T = TypeVar("T")
#: ``(kind, name, seconds)``: one sync step or one database call (see add_observer).
StepObserver = Callable[[str, str, float], None]
TE = "taskexecutions"
ADAPTERS = "adapters"

__all__ = ["Controller", "ControllerSettings", "Key", "Later", "Next", "TaskContext"]

#: When to look at a key again: None (when something changes), seconds (HIGH), or Later.
Next = float | Later | None

TERMINAL_STATES = frozenset(s.value for s in TaskState if s.terminal)
#: How often to look at an attempt whose pod has not started yet.
PENDING_POLL_SECONDS = 5.0


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Started:
    """A Job created whose start is not recorded yet (the deferred half of ``_start``)."""

    start: Start
    job_name: str
    trial: bool
    at: datetime
    row: TaskRow  # to write the task's row with (it may not exist yet)


@dataclass(frozen=True, slots=True)
class _Launch:
    """An admitted attempt's pod inputs, ready before its Job is created."""

    inputs: PodInputs
    deadline: float
    patch_source: Body | None


@dataclass(frozen=True)
class ControllerSettings:
    workdir: Path
    runner_image: str
    #: The namespaces served (empty: all).
    namespaces: tuple[str, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    max_log_bytes: int = 2 * 1024 * 1024
    #: The hard limit of a diff (it travels through the evidence store, never etcd).
    max_diff_bytes: int = 100 * 1024 * 1024
    resync_seconds: float = 30.0
    #: A finished Job's TTL once its attempt is recorded (the evidence is in the store).
    job_ttl_seconds: int = 300
    #: The TTL a Job is created with: a backstop for an operator that never comes back.
    job_ttl_backstop_seconds: int = 7 * 24 * 3600
    #: NetworkPolicy egress rules reaching the evidence store, added to every Adapter's policy.
    evidence_egress: tuple[dict[str, Any], ...] = ()
    #: Runner pods' emptyDir size limits and ephemeral-storage (None: sized from
    #: max_diff_bytes with RunnerStorage's defaults).
    runner_storage: RunnerStorage | None = None


class Controller:
    """Reconciles TaskExecutions: the state machine of the module docstring."""

    def __init__(
        self,
        api: KubeApi,
        store: Store,
        settings: ControllerSettings,
        *,
        evidence: GrantingStore,
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
        self.io = AttemptIO(
            evidence,
            max_diff_bytes=settings.max_diff_bytes,
            max_log_bytes=settings.max_log_bytes,
        )
        # the database de-duplicates events (keyed inserts): no key set kept in memory
        self.recorder = Recorder(
            store,
            settings.workdir,
            metrics=self.metrics,
            clock=now,
            dedupe_events=False,
            evidence=evidence,
        )
        self.breakers = AdapterBreakers(api, store.engine, self.recorder, now)
        self.cache = WatchCache()
        self.status = StatusWriter(api, self.cache, now)
        self.contexts = TaskContexts(
            api, store, self.cache, self.status, self.breakers, settings.evidence_egress
        )
        self._reported: dict[tuple[str, str], str] = {}
        self._starting: dict[str, _Started] = {}  # by TaskExecution uid
        #: Tasks deleted after their Job was created and before their row was written.
        self._unrecorded: dict[str, TaskRow] = {}
        self._observers: list[StepObserver] = []

    def breaker_states(self) -> dict[str, str]:
        return self.breakers.states()

    def repair_logs(self) -> tuple[int, int]:
        """The recorder's :meth:`~core.engine.recorder.Recorder.repair_logs` of every run
        (blocking: call it in a thread)."""
        return self.recorder.repair_logs()

    # ------------------------------------------------------------------ watch events

    def observe_task(self, type_: str, body: Body) -> list[Key]:
        if type_ == "DELETED" or (body.get("status") or {}).get("state") in TERMINAL_STATES:
            meta = body["metadata"]
            uid = str(meta.get("uid", ""))
            self.contexts.forget(uid)
            started = self._starting.pop(uid, None)
            if started is not None and type_ == "DELETED":
                self._unrecorded[uid] = started.row  # for _gone: its Job was created
            self._reported.pop((str(meta.get("namespace", "")), str(meta["name"])), None)
        return self.cache.observe_task(type_, body)

    def observe_adapter(self, type_: str, body: Body) -> list[Key]:
        return self.cache.observe_adapter(type_, body)

    def observe_job(self, type_: str, body: Body) -> list[Key]:
        return self.cache.observe_job(type_, body)

    def unfinished_keys(self) -> list[Key]:
        """Every unfinished TaskExecution but those parked on an unchanged input."""
        return [k for k in self.cache.unfinished_keys() if not self.contexts.parked((k[1], k[2]))]

    # ------------------------------------------------------------------ the queue handler

    def add_observer(self, observer: StepObserver) -> Callable[[], None]:
        """Call ``observer(kind, name, seconds)`` after every sync step (kind ``sync``, name the
        key's kind) and every database call (kind ``db``, name the function): how benchmarks
        see the operator's work without patching it. Returns a function that removes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def _notify(self, kind: str, name: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        for observer in list(self._observers):
            try:
                observer(kind, name, elapsed)
            except Exception:
                log.exception("step observer %r failed", observer)

    async def sync(self, key: Key) -> Next:
        """One step for one key; returns when to look again (None: when something changes)."""
        started = time.perf_counter()
        try:
            return await self._step(key)
        finally:
            self._notify("sync", key[0], started)

    async def _step(self, key: Key) -> Next:
        if key[0] == "gone":
            _, namespace, name, run_id, task_id, uid = key
            await self._gone(TaskKey(run_id, task_id, uid, namespace))
            return None
        _, namespace, name = key
        te = self.cache.tasks.get((namespace, name))
        if te is None:
            return None
        try:
            return await self._sync(te)
        finally:
            await self.breakers.mirror(namespace)
            self.metrics.heartbeat()

    async def report_error(self, key: Key, error: BaseException) -> None:
        """Show why a key keeps failing in its TaskExecution's status (best effort)."""
        if key[0] != "task":
            return
        te = self.cache.tasks.get((key[1], key[2]))
        if te is None:
            return
        message = f"{type(error).__name__}: {error}"[:900]
        if self._reported.get((key[1], key[2])) == message:
            return
        self._reported[(key[1], key[2])] = message
        status = TaskExecutionStatus.model_validate(te.get("status") or {})
        try:
            await self.status.park(te, status, "ReconcileError", message)
        except Exception:  # the error is in the queue's log already
            log.debug("could not report the error of %s", key, exc_info=True)

    async def sweep(
        self, namespaces: tuple[str, ...], owns: Callable[[str], bool] | None = None
    ) -> int:
        """Record CANCELLED every unfinished task whose TaskExecution is gone (deleted while
        no operator was leading). Call once the TaskExecution cache is complete. ``owns``
        (sharded operators): only the tasks whose uid it accepts."""
        live = self.cache.live_uids()
        records = await self._db(self.store.unfinished)
        gone = [
            r
            for r in records
            if r.key.uid
            and r.key.uid not in live
            and (not namespaces or r.key.scope in namespaces)
            and (owns is None or owns(r.key.uid))
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
        row = self._unrecorded.pop(key.uid, None)
        record = await self._db(self.store.find_task, key)
        if record is None and row is not None:
            # its Job was created before its row was written: the row, then its end
            record = await self._db(self.store.synced_task, *row)
        if record is not None and not record.status.terminal:
            await self._db(self.recorder.end, key, finish)

    # ------------------------------------------------------------------ the state machine

    async def _sync(self, te: Body) -> Next:
        if te["metadata"].get("deletionTimestamp"):
            return None
        ctx = await self.contexts.build(te)
        if ctx is None or ctx.status.state.terminal:
            self._starting.pop(te["metadata"].get("uid", ""), None)
            return None
        record: TaskRecord = await self._db(self.contexts.record, ctx)
        behind = await self._catch_up(ctx, record)
        if behind is not None:
            return behind
        match ctx.status.state:
            case TaskState.PENDING:
                return await self._pending(ctx, record)
            case TaskState.IN_PROGRESS:
                return await self._after_adapter(ctx, record)
            case TaskState.VALIDATING:
                return await self._after_gate(ctx, record)
        return None

    async def _catch_up(self, ctx: TaskContext, record: TaskRecord) -> float | Later | None:
        """Bring the record and status up to what was done: the deferred half of a start,
        or what the database recorded ahead of the status (a crash came between the two).
        Returns when to look again, or None when nothing was behind."""
        status = ctx.status
        started = self._starting.get(ctx.uid)
        if started is not None and (
            status.state is not TaskState.PENDING or started.start.attempt <= status.attempt
        ):
            del self._starting[ctx.uid]  # overtaken (its status came from elsewhere)
            started = None
        if started is not None and record.attempts < started.start.attempt:
            begun = started.at
            await self._write(ctx, self.recorder.begin, ctx.key, started.start, started_at=begun)
            record = replace(
                record,
                status=TaskState.IN_PROGRESS,
                attempts=started.start.attempt,
                current_adapter_id=started.start.adapter_id,
                attempt_started_at=started.at,
            )
        live = record.status in (TaskState.IN_PROGRESS, TaskState.VALIDATING)
        if live and status.state is TaskState.PENDING and record.attempts > status.attempt:
            # the Job of this attempt was created and recorded, its status is still to write
            # (deferred by _start, or lost in a crash): the TASK_STARTED Event, then the status
            trial = started is not None and started.trial
            adapter = record.current_adapter_id or record.adapter_id
            name = job_name(ctx.name, ctx.uid, record.attempts, "adapter")
            new = attempt_started(
                status,
                attempt=record.attempts,
                adapter=adapter,
                job_name=name,
                trial=trial,
                now=record.attempt_started_at or self.now(),
            )
            await self.status.started(ctx.te, record.attempts, new.message)
            await self.status.write(ctx.te, new)
            self._starting.pop(ctx.uid, None)
            return Later(PENDING_POLL_SECONDS)
        if status.state in (TaskState.IN_PROGRESS, TaskState.VALIDATING):
            done = next((a for a in record.attempt_results if a.attempt == status.attempt), None)
            if done is not None:
                finish = finish_of(done)
                if finish is not None:
                    await self.status.finished(ctx.te, finish, done.attempt)
                await self.status.write(ctx.te, attempt_recorded(status, done, finish, ""))
                return 0.0
        if record.status.terminal and not status.state.terminal:
            last = record.attempt_results[-1] if record.attempt_results else None
            finish = finish_of(last) if last is not None and last.final else None
            if finish is None or finish.state is not record.status:
                finish = Finish(record.status, record.failure_class, record.failure_message or "")
            await self.status.finished(ctx.te, finish, record.attempts)
            await self.status.write(ctx.te, task_ended(status, finish, self.now()))
            return 0.0
        return None

    async def _pending(self, ctx: TaskContext, record: TaskRecord) -> Next:
        now = self.now()
        breakers = self.breakers.of(ctx.ns)

        def decide() -> tuple[Start | Wait | Finish, Admission | None, _Launch | str | None]:
            # one trip to a thread: the breakers' views, the step, a slot, and for a start
            # admitted its pod's inputs (the patch check and the request write)
            admits = breakers.admits_map(ctx.plan.chain.adapter_ids)
            step = next_step(ctx.plan, record.attempt_results, now=now, admits=admits)
            if not isinstance(step, Start):
                return step, None, None
            admission = breakers.acquire(step.adapter_id)
            if not admission.admitted:
                return step, admission, None
            return step, admission, self._launch(ctx, step)

        step, admission, launch = await self._db(decide)
        if isinstance(step, Finish):
            await self._end(ctx, step)
            return None
        if isinstance(step, Wait):
            return await self._wait(ctx, step, now)
        assert admission is not None
        if not admission.admitted:
            await self.status.park(ctx.te, ctx.status, "WaitingForBreaker", admission.reason)
            await self._write(ctx, self.recorder.park, ctx.key, admission.reason)
            return Later(admission.retry_after_seconds or self.settings.resync_seconds)
        if isinstance(launch, str):
            await self._reject(ctx, launch)
            return None
        assert launch is not None
        return await self._start(ctx, step, launch, trial=admission.trial, now=now)

    async def _wait(self, ctx: TaskContext, wait: Wait, now: datetime) -> float | Later:
        if wait.until is not None:
            if ctx.status.not_before != wait.until:
                await self.status.write(
                    ctx.te, ctx.status.model_copy(update={"not_before": wait.until})
                )
            return max(0.0, (wait.until - now).total_seconds())
        await self.status.park(ctx.te, ctx.status, "WaitingForBreaker", wait.reason)
        await self._write(ctx, self.recorder.park, ctx.key, wait.reason)
        return Later(self.settings.resync_seconds)

    def _launch(self, ctx: TaskContext, start: Start) -> _Launch | str:
        """What the attempt's pod gets (its request stored, its grant issued), or why the
        attempt can never start as specified. Blocking (the evidence store): in a thread."""
        adapter = ctx.plan.adapters[start.adapter_id]
        # a patch named by reference: from the store (fetched with the request), or a
        # ConfigMap/Secret key the kubelet mounts
        source, patch, patch_file = None, None, None
        task_patch = ctx.spec.task.patch_from
        if adapter.kind in (AdapterKind.PATCH, AdapterKind.MANUAL) and task_patch is not None:
            if task_patch.evidence is not None:
                sha = task_patch.evidence.sha256
                if not self.io.patch_exists(sha):
                    return (
                        f"spec.task.patchFrom.evidence.sha256: no patch {sha} in the evidence "
                        "store"
                    )
                patch, patch_file = PatchInput(sha), DEFAULT_PATCH_FILE
            else:
                ref = task_patch.config_map_key_ref or task_patch.secret_key_ref
                assert ref is not None  # one source: the CRD's rule
                kind: Literal["configMap", "secret"] = (
                    "configMap" if task_patch.config_map_key_ref else "secret"
                )
                source = patch_source_volume(kind, ref.name, ref.key)
                patch_file = PATCH_SOURCE_FILE
        # after a send-back by the integration, from the integration branch's head (pushed to
        # the task's repository: the operator's own copy is not reachable from a pod)
        task = ctx.task
        if start.base is not None:
            task = task.model_copy(update={"base_commit": start.base.commit})
        request = RunnerRequest(
            kind="adapter",
            run_id=ctx.key.run_id,
            task=task,
            adapter=adapter,
            attempt=start.attempt,
            repo_url=ctx.task.repo,
            timeout_seconds=start.timeout_seconds,
            max_log_bytes=self.settings.max_log_bytes,
            max_diff_bytes=self.settings.max_diff_bytes,
            extra_input=start.feedback,
            gate_checks=[],
            gate_baseline=False,
            patch_file=patch_file,
        )
        # the Job's deadline is only a backstop: the runner enforces the budget itself, from
        # its container's start; pulling and scheduling have their own limit
        deadline = start.timeout_seconds + ctx.spec.pending_timeout_seconds
        try:
            inputs = self.io.prepare(
                ctx.key, request, expires_at=self._grant_expiry(ctx, deadline), patch=patch
            )
        except RequestTooLargeError as exc:  # it would be as large on every try
            return (
                f"spec.task: {exc}: shorten spec.task.prompt, or hand a large patch over by "
                "spec.task.patchFrom instead of spec.task.patch"
            )
        return _Launch(inputs, deadline, source)

    async def _start(
        self, ctx: TaskContext, start: Start, launch: _Launch, *, trial: bool, now: datetime
    ) -> Next:
        name = job_name(ctx.name, ctx.uid, start.attempt, "adapter")
        job = self._job(
            ctx,
            name,
            "adapter",
            start.attempt,
            launch.inputs,
            launch.deadline,
            start.adapter_id,
            launch.patch_source,
        )
        if not await self._create_owned_job(ctx, job):
            return Later(60.0)
        # the Job first; the record, status and Event follow (_catch_up) when no new task
        # waits for its Job. A crash before then repeats this step: the Job's name is
        # deterministic and an owned Job on 409 is used.
        self._starting[ctx.uid] = _Started(start, name, trial, now, self.contexts.row(ctx))
        return Later(0.0)

    async def _create_owned_job(self, ctx: TaskContext, job: Body) -> bool:
        """Create the Job; on 409 use the existing one only if it is this TaskExecution's."""
        try:
            created = await self.api.create_job(ctx.ns, job)
        except RejectedError as exc:
            if exc.status in (400, 422):  # the API server will refuse this spec every time
                await self._reject(ctx, exc.message)
                return False
            raise
        if created.created or is_owned_by(created.object, ctx.uid):
            self.cache.jobs[(ctx.ns, job["metadata"]["name"])] = slim_job(created.object)
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
        await self.status.park(ctx.te, ctx.status, "ForeignObject", message)

    async def _reject(self, ctx: TaskContext, problem: str) -> None:
        """A task whose attempt cannot be started as specified, ever: FAILED in the database
        and then the status (its row exists by now; a status alone would leave the row
        unfinished, and the next leader's sweep would record it CANCELLED)."""
        message = f"invalid TaskExecution: {problem}"[:1000]
        await self._end(ctx, Finish(TaskState.FAILED, None, message, why="InvalidSpec"))

    async def _end(self, ctx: TaskContext, finish: Finish) -> None:
        """A task ends without another attempt (its budget ran out while it waited)."""
        await self._write(ctx, self.recorder.end, ctx.key, finish)
        await self.status.finished(ctx.te, finish, ctx.status.attempt)
        await self.status.write(ctx.te, task_ended(ctx.status, finish, self.now()))

    def _grant_expiry(self, ctx: TaskContext, deadline: float) -> datetime:
        """Until when a pod's grant holds: its Job's backstop, after the longest wait for a
        queue's admission when the task names a queue."""
        queue_wait_seconds = ctx.spec.queue_wait_limit_seconds if ctx.spec.queue_name else 0.0
        return self.now() + timedelta(
            seconds=deadline + queue_wait_seconds + BACKSTOP_GRACE_SECONDS
        )

    async def _prepare(
        self, ctx: TaskContext, request: RunnerRequest, deadline: float, patch: PatchInput | None
    ) -> PodInputs:
        """Store the request and grant the pod its inputs and uploads."""
        expires = self._grant_expiry(ctx, deadline)
        return await self._io(self.io.prepare, ctx.key, request, expires_at=expires, patch=patch)

    def _job(
        self,
        ctx: TaskContext,
        name: str,
        role: str,
        attempt: int,
        inputs: PodInputs,
        deadline: float,
        adapter_name: str,
        patch_source: Body | None = None,
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
            fetch_grant=inputs.fetch_grant,
            runner_grant=inputs.runner_grant,
            deadline_seconds=deadline,
            adapter=resource,
            patch_source=patch_source,
            image_pull_policy=self.settings.image_pull_policy,
            adapter_name=adapter_name,
            storage=self.settings.runner_storage
            or RunnerStorage.for_diff_limit(self.settings.max_diff_bytes),
            ttl_seconds_after_finished=self.settings.job_ttl_backstop_seconds,
            queue_name=ctx.spec.queue_name,
        )

    async def _get_job(self, namespace: str, name: str) -> Body | None:
        """The Job from the watch cache; a miss is confirmed with the API (404 = gone)."""
        cached = self.cache.jobs.get((namespace, name))
        if cached is not None:
            return cached
        job = await self.api.get_job(namespace, name)
        if job is not None:
            self.cache.jobs[(namespace, name)] = slim_job(job)
        return job

    async def _report(
        self, ctx: TaskContext, job: Body | None, role: str
    ) -> tuple[RunnerResult | None, str | None]:
        """The runner's report from the finished Job's pod log; the full log it uploaded
        (checked) saved first, or, without one, what the pod log holds."""
        if job is None:
            return None, None
        report = await read_report(self.api, ctx.ns, job["metadata"]["name"])
        if report is None:
            return None, None
        records, uploaded = report.records, report.result.log if report.result else None
        if uploaded is not None:
            try:
                records = await self._io(self.io.log_records, uploaded)
            except EvidenceError as exc:  # gone after an earlier save, or not what was said
                note = {"stream": "orchestrator", "event": "log_upload_unusable"}
                records = [*records, {**note, "error": str(exc)}]
        attempt = ctx.status.attempt
        await self._db(save_log, self.settings.workdir, ctx.key, attempt, role, records, self.now)
        if uploaded is not None:
            await self._io(self.io.discard, uploaded)
        return report.result, report.runner_error

    async def _disk_eviction(
        self, ctx: TaskContext, job: Body | None, result: RunnerResult | None
    ) -> str | None:
        """The kubelet's message when a failed Job's pod was evicted for its own disk limits
        (only asked when the runner gave no full report: it was killed)."""
        if job is None or job_finished(job) != "Failed":
            return None
        if result is not None and not result.cancelled:
            return None
        return storage_eviction(await self.api.job_pods(ctx.ns, job["metadata"]["name"]))

    async def _triage(self, ctx: TaskContext, job: Body, role: str) -> Next:
        """A running Job whose container has not started: wait, or end the attempt early.

        A Job suspended in a Kueue queue waits (reason ``Queued``) up to the queue timeout;
        its pod's pending time counts from its admission (:mod:`core.kube.queueing`)."""
        current = ctx.status.attempts[-1]
        if role == "adapter" and current.pod_started_at is not None:
            return None  # running: the Job's events bring us back
        created = parse_time(job["metadata"].get("creationTimestamp"))
        now = self.now()
        running_reason = "AdapterRunning" if role == "adapter" else "Validating"
        if queued(job):
            wait = queue_wait(
                job,
                role=role,
                created_at=created,
                now=now,
                timeout_seconds=ctx.spec.queue_wait_limit_seconds,
            )
            if wait.problem is None:
                await self.status.park(ctx.te, ctx.status, QUEUED_REASON, wait.message)
                return Later(wait.recheck_seconds)  # admission (a Job event) comes sooner
            problem = wait.problem
        else:
            since = pending_since(job, created_at=created, now=now)
            late = (now - since).total_seconds() > ctx.spec.pending_timeout_seconds
            pods = []
            if late or job_counts_pods(job):  # none yet: nothing to list (the count is an event)
                pods = await self.api.job_pods(ctx.ns, job["metadata"]["name"])
            verdict = triage(
                pods,
                created_at=since,
                now=now,
                pending_timeout_seconds=ctx.spec.pending_timeout_seconds,
            )
            if verdict.started_at is not None:
                if role == "adapter":
                    attempts = list(ctx.status.attempts)
                    attempts[-1] = current.model_copy(
                        update={"pod_started_at": verdict.started_at}
                    )
                    message = f"attempt {current.attempt} on adapter {current.adapter} is running"
                    update: dict[str, Any] = {"attempts": attempts, "message": message}
                    if ctx.status.reason == QUEUED_REASON:
                        update["reason"] = running_reason
                    await self.status.write(ctx.te, ctx.status.model_copy(update=update))
                elif ctx.status.reason == QUEUED_REASON:
                    await self.status.park(
                        ctx.te, ctx.status, running_reason, "gate Job admitted and running"
                    )
                return None
            if verdict.problem is None:
                waiting = f"{role} pod pending: {verdict.waiting}"
                reason = ctx.status.reason or "Pending"
                if reason == QUEUED_REASON:
                    reason = running_reason
                await self.status.park(ctx.te, ctx.status, reason, waiting)
                return Later(PENDING_POLL_SECONDS)
            problem = verdict.problem
        await self.api.delete_job(ctx.ns, job["metadata"]["name"], uid=job["metadata"]["uid"])
        record = await self._db(self.store.task, ctx.key)
        reason = problem if role == "adapter" else f"test gate: {problem}"
        evidence = interrupted_evidence(
            attempt=current.attempt,
            adapter_id=current.adapter,
            started_at=current.started_at or created,
            granted_seconds=0.0,  # the adapter never ran: nothing of its budget is charged
            now=self.now(),
            reason=reason,
        )
        await self._conclude(ctx, record, evidence)
        return 0.0

    async def _after_adapter(self, ctx: TaskContext, record: TaskRecord) -> Next:
        status = ctx.status
        assert status.job_name is not None
        job = await self._get_job(ctx.ns, status.job_name)
        if job is not None and job_finished(job) is None:
            return await self._triage(ctx, job, "adapter")
        result, runner_error = await self._report(ctx, job, "adapter")
        current = status.attempts[-1]
        evidence = adapter_evidence(
            current,
            job,
            result,
            now=self.now(),
            log_path=ctx.log_path,
            runner_error=runner_error,
            evicted=await self._disk_eviction(ctx, job, result),
        )
        if result is not None and evidence.diff is not None and not evidence.diff.truncated:
            evidence = await self._adopt_diff(evidence, result)
        if needs_gate(ctx.plan, evidence) and result is not None:
            return await self._start_gate(ctx, evidence, record)
        await self._conclude(ctx, record, evidence)
        return 0.0

    async def _adopt_diff(
        self, evidence: AttemptEvidence, result: RunnerResult
    ) -> AttemptEvidence:
        """The full diff the pod uploaded, checked and stored by its sha256 (the summary then
        names it); an upload that is missing or not what the runner measured is an
        infrastructure failure (the evidence is lost, the adapter is not blamed)."""
        assert evidence.diff is not None
        if result.patch is None:
            problem = result.upload_error or "the runner did not upload its diff"
        else:
            try:
                diff = await self._io(self.io.adopt_patch, evidence.diff, result.patch)
            except EvidenceError as exc:
                problem = str(exc)
            else:
                return replace(evidence, diff=diff)
        return replace(evidence, infrastructure_reason=f"evidence upload failed: {problem}")

    async def _start_gate(
        self, ctx: TaskContext, evidence: AttemptEvidence, record: TaskRecord
    ) -> Next:
        status = ctx.status
        task = _attempt_task(ctx.task, record.attempt_results, evidence.attempt)
        adapter_name = status.adapter or ctx.spec.adapter_ref.name
        name = job_name(ctx.name, ctx.uid, status.attempt, "gate")
        assert evidence.diff is not None  # needs_gate
        checks = ctx.plan.gate_checks(adapter_name)
        request = RunnerRequest(
            kind="gate",
            run_id=ctx.key.run_id,
            task=task,
            adapter=ctx.plan.adapters[adapter_name],
            attempt=status.attempt,
            repo_url=ctx.task.repo,
            timeout_seconds=sum(c.timeout_seconds for c in checks) or 60,
            max_log_bytes=self.settings.max_log_bytes,
            max_diff_bytes=self.settings.max_diff_bytes,
            extra_input=None,
            gate_checks=list(checks),
            gate_baseline=ctx.task.gate_baseline,
            patch_file=DEFAULT_PATCH_FILE,
        )
        deadline = (
            request.timeout_seconds * (2 if ctx.task.gate_baseline else 1)
            + ctx.spec.pending_timeout_seconds
            + BACKSTOP_GRACE_SECONDS
        )
        patch = PatchInput(evidence.diff.sha256, evidence.diff.bytes)
        inputs = await self._prepare(ctx, request, deadline, patch)
        job = self._job(ctx, name, "gate", status.attempt, inputs, deadline, adapter_name)
        if not await self._create_owned_job(ctx, job):
            return Later(60.0)
        await self._db(self.store.set_validating, ctx.key)
        await self.status.write(ctx.te, gate_started(status, evidence, name))
        return Later(PENDING_POLL_SECONDS)

    async def _after_gate(self, ctx: TaskContext, record: TaskRecord) -> Next:
        status = ctx.status
        assert status.gate_job_name is not None
        job = await self._get_job(ctx.ns, status.gate_job_name)
        if job is not None and job_finished(job) is None:
            return await self._triage(ctx, job, "gate")
        result, runner_error = await self._report(ctx, job, "gate")
        evidence = gate_evidence(
            status.attempts[-1],
            job,
            result,
            now=self.now(),
            log_path=ctx.log_path,
            runner_error=runner_error,
            evicted=await self._disk_eviction(ctx, job, result),
        )
        await self._conclude(ctx, record, evidence)
        return 0.0

    async def _conclude(
        self, ctx: TaskContext, record: TaskRecord, evidence: AttemptEvidence
    ) -> None:
        history = [a for a in record.attempt_results if a.attempt < evidence.attempt]
        adapter = ctx.adapters.get(evidence.adapter_id)
        checks = ctx.plan.gate_checks(evidence.adapter_id) if adapter is not None else ()
        redactor = operator_redactor(adapter, checks)
        verdict = conclude(ctx.plan, history, evidence, rng=self.rng, redactor=redactor)
        trial = ctx.status.attempts[-1].trial if ctx.status.attempts else False
        outcome = await self._db(
            self.recorder.record,
            ctx.key,
            _attempt_task(ctx.task, history, evidence.attempt).base_commit,
            verdict,
            breakers=self.breakers.of(ctx.ns),
            trial=trial,
        )
        result = outcome.entry.result
        why = verdict.decision.reason
        if outcome.finish is not None:  # the Event first: see core.kube.status_writer
            await self.status.finished(ctx.te, outcome.finish, result.attempt)
        await self.status.write(ctx.te, attempt_recorded(ctx.status, result, outcome.finish, why))
        await self._expire_jobs(ctx, ctx.status.job_name, ctx.status.gate_job_name)

    async def _expire_jobs(self, ctx: TaskContext, *names: str | None) -> None:
        """The attempt is recorded, its evidence in the store: its finished Jobs may go
        (the TTL controller deletes them, their pods with them, after the short TTL)."""
        ttl = {"spec": {"ttlSecondsAfterFinished": self.settings.job_ttl_seconds}}
        for name in names:
            job = await self._get_job(ctx.ns, name) if name else None
            if job is None or not is_owned_by(job, ctx.uid):
                continue
            try:
                await self.api.patch_object("jobs", ctx.ns, str(name), ttl)
            except Exception:  # the backstop TTL still applies
                log.warning("could not shorten the TTL of Job %s/%s", ctx.ns, name, exc_info=True)

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        finally:
            self._notify("db", getattr(fn, "__qualname__", repr(fn)), started)

    async def _write(self, ctx: TaskContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A write of the task's record, its row inserted first if it is not yet."""

        def write() -> T:
            self.contexts.ensure(ctx)
            return fn(*args, **kwargs)

        write.__qualname__ = getattr(fn, "__qualname__", repr(fn))  # what observers see
        return await self._db(write)

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Evidence-store calls (files, HTTP to an object store) off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)


def _attempt_task(task: TaskSpec, history: Sequence[AttemptResult], attempt: int) -> TaskSpec:
    """The task as attempt ``attempt`` ran it: on the integration branch's head when an
    earlier attempt was sent back by the integration (:func:`base_of`)."""
    rebased = base_of([a for a in history if a.attempt < attempt])
    if rebased is None:
        return task
    return task.model_copy(update={"base_commit": rebased.commit})

"""The operator's Integration controller: one run's integration branch per ``Integration``.

The Kubernetes driver of the integration worker (:mod:`core.engine.integration_worker`), a
:class:`~core.kube.loop_part.LoopPart` of the operator's control loop (its informers, work
queue and Lease). An ``Integration`` names a run of its namespace; level-triggered, one step
per key:

    run unknown / unfinished TaskExecutions  -> status Waiting (the TaskExecutions' watch
                                                events bring it back when they finish)
    every TaskExecution of the run finished  -> the worker runs, in a thread of its own:
        and not integrated in this state        the run's COMPLETED tasks (the operator's
                                                database and ledger) merged in queue order onto
                                                the branch in the operator's work dir
                                                (integration/<namespace>/<run>.git), each
                                                merged-tree gate run a Job
                                                (:mod:`core.kube.integration_gates`), the branch
                                                pushed to the tasks' repository
    done                                     -> status Succeeded: the results
                                                (``integration_results.json``'s fields), an
                                                Event; ``tasksDigest`` says for which finished
                                                TaskExecutions, so a later one (re-applied,
                                                added) integrates again, incrementally

Failures: a spec or a state the worker refuses (a base commit not in the repository, a branch
that differs from the one recorded) is ``Failed`` until the Integration or the run changes;
an infrastructure failure (git server unreachable, a gate pod that cannot start, the API,
a completed task's TaskExecution or Adapter that does not validate for this operator -- a
newer CRD's defaulted field) is shown in the status and the key is retried with backoff --
nothing already decided is decided again (the worker is idempotent per verdict), and nothing
is decided for a task whose plan cannot be read.

Send-back: a ``conflict`` or ``gate_failed`` task whose retry policy lists ``merge_conflict``
/ ``merge_gate_failed`` is reopened by the worker (the database, through the recorder), then
its TaskExecution's status is made PENDING again (:mod:`core.kube.integration_sendback`); the
Integration says ``Waiting`` (``TasksSentBack``) until the next attempt finishes, then merges
it. ``tasksDigest`` counts each TaskExecution's attempt, so an attempt that completes again is
a new state to integrate.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.db.integration_rows import IntegrationRows
from core.db.store import Store, TaskRecord
from core.engine.integration_worker import IntegrationConfig, IntegrationRun, IntegrationWorker
from core.engine.lifecycle import TaskPlan
from core.engine.merge_queue import BatchPolicy
from core.engine.monitoring.metrics import Metrics
from core.errors import ConflictError, InfrastructureError, KubeApiError, OrchestratorError
from core.integration_resources import IntegrationSpec, IntegrationStatus, status_of_results
from core.kube.api import Body, KubeApi
from core.kube.integration_gates import (
    CALL_TIMEOUT_SECONDS,
    LABEL_INTEGRATION,
    GateSettings,
    IntegrationInterrupted,
    JobTreeGate,
    JobWaiter,
)
from core.kube.integration_sendback import reopen_statuses
from core.kube.jobs import RunnerStorage
from core.kube.loop_part import PassivePart
from core.kube.status_writer import StatusWriter
from core.kube.task_context import problems_of
from core.kube.watch_cache import Key, WatchCache, newer, trim
from core.models import TaskState
from core.resources import (
    AdapterResourceSpec,
    TaskExecutionSpec,
    adapter_spec,
    task_spec,
)

log = logging.getLogger("orchestrator.operator")
INTEGRATIONS = "integrations"
KIND = "integration"


def _now() -> datetime:
    return datetime.now(UTC)


def integration_key(namespace: str, name: str) -> Key:
    return (KIND, namespace, name)


@dataclass(frozen=True)
class RunTask:
    """What the controller keeps of a TaskExecution: enough to know when its run is done."""

    name: str
    uid: str
    state: TaskState
    attempt: int = 0


def tasks_digest(tasks: dict[str, RunTask]) -> str:
    """Which finished TaskExecutions an integration state is about."""
    raw = "\n".join(sorted(f"{t.uid}:{t.state.value}:{t.attempt}" for t in tasks.values()))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class ResourcePlans:
    """The worker's plans from the run's TaskExecutions and their Adapters, by uid.

    ``unreadable``: why the plan of an existing TaskExecution cannot be built now (its spec
    or an Adapter's does not validate: most likely a CRD newer than this operator, which
    defaults a field the operator does not know). Asking for such a plan is a retryable
    error, not "the resource is gone": the worker would record a final ``skipped`` verdict
    for it, and the change would never be integrated once the resources read again.
    """

    def __init__(
        self, plans: dict[str, TaskPlan], unreadable: dict[str, str] | None = None
    ) -> None:
        self.plans = plans
        self.unreadable = unreadable or {}

    def plan(self, record: TaskRecord) -> TaskPlan:
        why = self.unreadable.get(record.key.uid)
        if why is not None:
            raise InfrastructureError(
                f"this operator cannot read the plan of task {record.key.task_id} ({why}): "
                "the CRDs are newer than the operator; nothing is decided for its change "
                "until they agree. Fix: upgrade the operator, or apply the CRDs of its version"
            )
        try:
            return self.plans[record.key.uid]
        except KeyError:
            raise KeyError(f"TaskExecution {record.key.display} (uid {record.key.uid})") from None


@dataclass(frozen=True)
class IntegrationSettings:
    workdir: Path
    runner_image: str
    image_pull_policy: str = "IfNotPresent"
    max_log_bytes: int = 2 * 1024 * 1024
    #: The safety net of the event-driven wait for gate Jobs.
    poll_seconds: float = 10.0
    #: Integrations worked on at once (each holds a thread while its gates run).
    concurrency: int = 2
    #: Gate pods' emptyDir size limits and ephemeral-storage (None: RunnerStorage's defaults).
    storage: RunnerStorage | None = None


class IntegrationController(PassivePart):
    extra_resources: tuple[str, ...] = (INTEGRATIONS,)

    def __init__(
        self,
        api: KubeApi,
        store: Store,
        cache: WatchCache,
        settings: IntegrationSettings,
        *,
        metrics: Metrics | None = None,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.api = api
        self.store = store
        self.cache = cache
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.now = now
        self.rows = IntegrationRows(store.engine, now)
        self.status = StatusWriter(api, cache, now)
        self.waiter = JobWaiter()
        self.integrations: dict[tuple[str, str], Body] = {}
        self.runs: dict[tuple[str, str], dict[str, RunTask]] = {}
        self._run_of: dict[tuple[str, str], str] = {}  # TaskExecution -> its run
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="integration"
        )

    # ------------------------------------------------------------------ watch events

    def observe(self, resource: str, type_: str, body: Body) -> list[Key]:
        if resource == INTEGRATIONS:
            return self._observe_integration(type_, body)
        if resource == "taskexecutions":
            return self._observe_task(type_, body)
        if resource == "jobs" and LABEL_INTEGRATION in (body["metadata"].get("labels") or {}):
            self.waiter.observe(type_, body)
        return []

    def _observe_integration(self, type_: str, body: Body) -> list[Key]:
        meta = body["metadata"]
        where = (str(meta.get("namespace", "")), str(meta["name"]))
        if type_ == "DELETED":
            self.integrations.pop(where, None)
            return []
        known = self.integrations.get(where)
        same = known is not None and known["metadata"].get("uid") == meta.get("uid")
        if same and known is not None and not newer(meta, known["metadata"]):
            return []  # an echo of our own status write
        self.integrations[where] = trim(body)
        return [integration_key(*where)]

    def _observe_task(self, type_: str, body: Body) -> list[Key]:
        meta = body["metadata"]
        where = (str(meta.get("namespace", "")), str(meta["name"]))
        before = self._run_of.get(where)
        if type_ == "DELETED":
            self._run_of.pop(where, None)
            if before is not None:
                self.runs.get((where[0], before), {}).pop(where[1], None)
            return self._keys_of(where[0], before)
        run_id = str((body.get("spec") or {}).get("runId") or "k8s")
        status = body.get("status") or {}
        state = TaskState(status.get("state", "PENDING"))
        attempt = int(status.get("attempt") or 0)
        tasks = self.runs.setdefault((where[0], run_id), {})
        old = tasks.get(where[1])
        tasks[where[1]] = RunTask(where[1], str(meta.get("uid", "")), state, attempt)
        self._run_of[where] = run_id
        if (
            old is not None
            and old.uid == meta.get("uid")
            and old.state.terminal == state.terminal
            and (old.attempt == attempt or not state.terminal)
        ):
            return []  # nothing an Integration looks at changed
        return self._keys_of(where[0], run_id)

    def _keys_of(self, namespace: str, run_id: str | None) -> list[Key]:
        return [
            integration_key(ns, name)
            for (ns, name), body in sorted(self.integrations.items())
            if ns == namespace and (body.get("spec") or {}).get("runId") == run_id
        ]

    def owns(self, key: Key) -> bool:
        return key[0] == KIND

    def resync_keys(self) -> list[Key]:
        return [integration_key(*where) for where in sorted(self.integrations)]

    async def follow(self) -> None:
        return None  # a running worker notices through its stop event (see _work)

    # ------------------------------------------------------------------ one step

    async def sync(self, key: Key) -> float | None:
        _, namespace, name = key
        itg = self.integrations.get((namespace, name))
        if itg is None or itg["metadata"].get("deletionTimestamp"):
            return None
        status = IntegrationStatus.model_validate(itg.get("status") or {})
        try:
            spec = IntegrationSpec.model_validate(itg["spec"])
        except ValidationError as exc:
            problems = " ".join(problems_of(exc))
            message = f"invalid Integration: {problems}"
            await self._park(itg, status, "Failed", "InvalidSpec", message)
            return None
        tasks = dict(self.runs.get((namespace, spec.run_id), {}))
        if not tasks:
            await self._park(
                itg,
                status,
                "Waiting",
                "NoTasks",
                f"no TaskExecution of run {spec.run_id} in namespace {namespace} yet",
            )
            return None
        unfinished = sorted(t.name for t in tasks.values() if not t.state.terminal)
        if unfinished:
            shown = ", ".join(unfinished[:5]) + (" ..." if len(unfinished) > 5 else "")
            await self._park(
                itg,
                status,
                "Waiting",
                "TasksUnfinished",
                f"{len(unfinished)} of {len(tasks)} TaskExecutions of run {spec.run_id} are "
                f"unfinished: {shown}",
            )
            return None
        digest = tasks_digest(tasks)
        generation = itg["metadata"].get("generation")
        settled = status.state in ("Succeeded", "Failed")
        if settled and (status.tasks_digest, status.observed_generation) == (digest, generation):
            return None  # integrated (or refused) in exactly this state
        lock = self._locks.setdefault((namespace, spec.run_id), asyncio.Lock())
        async with lock:
            return await self._integrate(itg, spec, digest, len(tasks))

    async def _integrate(
        self, itg: Body, spec: IntegrationSpec, digest: str, count: int
    ) -> float | None:
        status = IntegrationStatus.model_validate(itg.get("status") or {})
        await self._write(
            itg,
            {
                "state": "Running",
                "reason": "Integrating",
                "message": f"merging the completed tasks of {count} TaskExecutions of run "
                f"{spec.run_id}",
            },
        )
        try:
            done = await self._work(itg, spec)
            back = await self._send_back(itg["metadata"]["namespace"], spec.run_id)
        except (InfrastructureError, KubeApiError) as exc:
            # retried with backoff by the work queue; nothing decided is decided again
            await self._write(
                itg, {"state": "Running", "reason": "Retrying", "message": _message(exc)}
            )
            raise
        except IntegrationInterrupted:
            raise
        except OrchestratorError as exc:
            await self._write(
                itg,
                {
                    "state": "Failed",
                    "reason": "IntegrationFailed",
                    "message": _message(exc),
                    "tasksDigest": digest,
                },
            )
            await self.api.post_event(itg, "Warning", "INTEGRATION_FAILED", str(exc), "Integrate")
            return None
        results, st = done.results, done.results.stats
        summary = (
            f"{st.merged} merged, {st.conflict} conflict, {st.gate_failed} gate_failed, "
            f"{st.skipped} skipped; {st.gate_runs} gate run(s) in {st.batches} batch(es); "
            f"{results.branch} at {results.head_commit[:12]}"
        )
        if back:
            summary += f"; sent back: {', '.join(back)}"
        await self._write(
            itg,
            {
                # sent back: the next attempts are to be merged when they finish
                "state": "Waiting" if back else "Succeeded",
                "reason": "TasksSentBack" if back else "Integrated",
                "message": summary,
                "tasksDigest": digest,
                **status_of_results(results),
            },
        )
        if status.head_commit != results.head_commit or status.tasks_digest != digest:
            await self.api.post_event(itg, "Normal", "INTEGRATION_FINISHED", summary, "Integrate")
        return None

    async def _work(self, itg: Body, spec: IntegrationSpec) -> IntegrationRun:
        """Run the worker in a thread of the integration pool; its gates are Jobs."""
        namespace = itg["metadata"]["namespace"]
        plans = await self._plans(namespace, spec.run_id)
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        config = IntegrationConfig(
            run_id=spec.run_id,
            workdir=self.settings.workdir,
            branch=spec.branch,
            base_commit=spec.base_commit,
            batch=BatchPolicy(
                size=spec.batch.size, adaptive=spec.batch.adaptive, max_size=spec.batch.max_size
            ),
            push=True,
            scope=namespace,
            results_file=False,
        )
        recorded = await asyncio.to_thread(self.rows.state, spec.run_id, namespace)

        def source() -> str:
            state = self.rows.state(spec.run_id, namespace)
            assert state is not None  # the worker opened the integration before any gate
            return state.source

        def on_job(name: str | None) -> None:
            future = asyncio.run_coroutine_threadsafe(self._gate_job(itg, name), loop)
            try:
                future.result(CALL_TIMEOUT_SECONDS)
            except Exception:  # only a status nicety: never fail the gate run for it
                log.debug("could not show the gate Job in the status", exc_info=True)

        gate = JobTreeGate(
            self.api,
            loop,
            itg,
            source=source,
            branch=config.branch_name,
            first_number=recorded.gate_runs if recorded is not None else 0,
            resources=spec.resources,
            pending_timeout_seconds=spec.pending_timeout_seconds,
            settings=GateSettings(
                image=self.settings.runner_image,
                image_pull_policy=self.settings.image_pull_policy,
                workdir=self.settings.workdir,
                max_log_bytes=self.settings.max_log_bytes,
                poll_seconds=self.settings.poll_seconds,
                storage=self.settings.storage,
            ),
            waiter=self.waiter,
            stop=stop,
            now=self.now,
            on_job=on_job,
        )
        worker = IntegrationWorker(
            config, plans, self.store, gate=gate, metrics=self.metrics, clock=self.now
        )
        try:
            return await loop.run_in_executor(self._executor, worker.run)
        except asyncio.CancelledError:
            stop.set()  # no longer leading, or shutting down: the thread stops at its next look
            raise

    async def _send_back(self, namespace: str, run_id: str) -> list[str]:
        """Make the TaskExecutions of the tasks the worker sent back PENDING again (also those
        a crash left COMPLETED); the ids of the run's tasks that are unfinished in the
        database now (sent back, or already on their next attempt: the Integration waits)."""
        records = await asyncio.to_thread(self.store.tasks, run_id, namespace)
        names = {t.uid: t.name for t in self.runs.get((namespace, run_id), {}).values()}
        await reopen_statuses(self.api, self.status, namespace, records, names)
        return [r.key.task_id for r in records if not r.status.terminal]

    async def _plans(self, namespace: str, run_id: str) -> ResourcePlans:
        """Each TaskExecution of the run that still exists, with its Adapters, as a plan.

        A TaskExecution whose Adapter is gone has no plan (the worker skips its change with
        the reason); one whose spec or Adapter does not validate is ``unreadable`` (see
        :class:`ResourcePlans`): only the worker knows whether its plan is needed (a FAILED
        TaskExecution's never is)."""
        found: dict[str, TaskPlan] = {}
        unreadable: dict[str, str] = {}
        for te in await self.api.list_objects("taskexecutions", namespace):
            if (te.get("spec") or {}).get("runId", "k8s") != run_id:
                continue
            name, uid = te["metadata"]["name"], te["metadata"]["uid"]
            what = f"TaskExecution {namespace}/{name}"
            try:
                spec = TaskExecutionSpec.model_validate(te["spec"])
                task = task_spec(name, spec)
                names = [spec.adapter_ref.name, *(r.name for r in spec.fallback_adapter_refs)]
                engine = {}
                for adapter_name in names:
                    what = f"Adapter {namespace}/{adapter_name}"
                    body = self.cache.adapters.get((namespace, adapter_name))
                    if body is None:
                        body = await self.api.get_object("adapters", namespace, adapter_name)
                    if body is None:
                        raise KeyError(adapter_name)
                    resource = AdapterResourceSpec.model_validate(body["spec"])
                    engine[adapter_name] = adapter_spec(adapter_name, resource)
            except KeyError:
                continue  # its record is skipped by the worker with the reason
            except ValidationError as exc:
                unreadable[uid] = f"{what} does not validate: {'; '.join(problems_of(exc))}"
                continue
            found[uid] = TaskPlan.of(task, names, engine)
        return ResourcePlans(found, unreadable)

    # ------------------------------------------------------------------ status

    async def _park(
        self, itg: Body, status: IntegrationStatus, state: str, reason: str, message: str
    ) -> None:
        generation = itg["metadata"].get("generation")
        same = (status.state, status.reason, status.message) == (state, reason, message)
        if same and status.observed_generation == generation:
            return
        await self._write(itg, {"state": state, "reason": reason, "message": message})

    async def _gate_job(self, itg: Body, name: str | None) -> None:
        where = (itg["metadata"]["namespace"], itg["metadata"]["name"])
        current = self.integrations.get(where, itg)
        await self._write(current, {"gateJob": name})

    async def _write(self, itg: Body, fields: dict[str, Any]) -> None:
        """A status merge patch with a resourceVersion precondition (the cached version)."""
        meta = itg["metadata"]
        where = (str(meta["namespace"]), str(meta["name"]))
        current = self.integrations.get(where, itg)
        body: dict[str, Any] = {
            **fields,
            "observedGeneration": current["metadata"].get("generation"),
            "updatedAt": self.now().astimezone(UTC).isoformat(),
        }
        if fields.get("state") in ("Succeeded", "Failed", "Waiting"):
            body["gateJob"] = None  # a merge patch clears a field only when told
        try:
            updated = await self.api.patch_status(
                INTEGRATIONS,
                where[0],
                where[1],
                body,
                resource_version=current["metadata"].get("resourceVersion"),
            )
        except ConflictError:
            fresh = await self.api.get_object(INTEGRATIONS, *where)
            if fresh is not None:
                self.integrations[where] = trim(fresh)
            raise
        if updated is not None:
            self.integrations[where] = trim(updated)


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]

"""What a TaskExecution needs before a step: a valid spec, its Adapters, their egress
policies, and its rows in the database.

Every object gets an answer within one step: a spec the API server accepted but the operator
cannot use ends FAILED with the fields named, a missing or unusable Adapter is said in the
status naming the field that refers to it (and the TaskExecution starts by itself once the
Adapter is there or fixed: the Adapter's watch event re-queues it). The checks are
:mod:`core.kube.validation`'s.

A parked TaskExecution costs nothing until one of its inputs changes: its fingerprint (its
own resourceVersion and those of the Adapters it names, all from the watch cache) is kept
when it parks, and a step or a resync finding the same fingerprint does no work at all (no
API call, no parsing). 10,000 tasks waiting for a missing Adapter are an in-memory scan per
resync, not 10,000 reconciles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from core.db.store import Store, TaskRecord, TaskRow, fresh_record
from core.engine.lifecycle import TaskPlan
from core.identity import TaskKey
from core.kube.adapter_breakers import AdapterBreakers
from core.kube.api import Body, KubeApi
from core.kube.attempts import parse_time
from core.kube.egress import EgressPolicies
from core.kube.status_writer import StatusWriter
from core.kube.validation import describe, task_execution_problems
from core.kube.watch_cache import WatchCache, trim
from core.models import AdapterSpec, TaskSpec
from core.resources import (
    AdapterResourceSpec,
    TaskExecutionSpec,
    TaskExecutionStatus,
    adapter_spec,
    task_spec,
)

ADAPTERS = "adapters"
#: Problems that other objects cause: the TaskExecution waits, and starts once they are fixed.
WAIT_FOR_FIX = frozenset({"AdapterNotFound", "AdapterInvalid", "SecretNotFound"})


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
    #: the Adapters as the engine sees them, and their generations (what the rows hold)
    inputs: list[AdapterSpec] = field(init=False, default_factory=list)
    generations: tuple[tuple[str, object], ...] = field(init=False, default=())

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


@dataclass(frozen=True)
class _Adapter:
    """One version of an Adapter, parsed: shared by every task that names it."""

    version: tuple[object, object]  # uid, resourceVersion
    spec: AdapterResourceSpec
    engine: AdapterSpec


def _version(obj: Body) -> tuple[object, object]:
    return obj["metadata"].get("uid"), obj["metadata"].get("resourceVersion")


class TaskContexts:
    def __init__(
        self,
        api: KubeApi,
        store: Store,
        cache: WatchCache,
        status: StatusWriter,
        breakers: AdapterBreakers,
        evidence_egress: tuple[Body, ...] = (),
    ) -> None:
        self.api = api
        self.store = store
        self.cache = cache
        self.status = status
        self.breakers = breakers
        self.egress = EgressPolicies(api, evidence_egress)
        self._adapters_synced: set[tuple[str, tuple[tuple[str, object], ...]]] = set()
        self._tasks_synced: set[str] = set()  # uids of unfinished tasks with their row
        self._parked: dict[str, tuple[object, ...]] = {}  # uid -> inputs when it parked
        # A task's later steps (a Job event, a resync) skip its checks while its generation and
        # its Adapters' versions are those the checks passed for (uid -> them, ~300 bytes a
        # task), and all tasks share one parse per Adapter version: a step's parsing 145 -> 40 us
        self._checked: dict[str, tuple[object, ...]] = {}
        self._adapters: dict[tuple[str, str], _Adapter] = {}  # the last version of each, parsed

    def _fingerprint(self, where: tuple[str, str]) -> tuple[object, ...] | None:
        entry = self.cache.tasks.entry(where)
        if entry is None:
            return None
        adapters = []
        for n in entry.refs:
            adapter = self.cache.adapters.get((where[0], n)) or {}
            adapters.append((n, adapter.get("metadata", {}).get("resourceVersion")))
        return (entry.uid, entry.resource_version, tuple(adapters))

    def parked(self, where: tuple[str, str]) -> bool:
        """Whether the TaskExecution waits for a fix and none of its inputs changed since."""
        entry = self.cache.tasks.entry(where)
        return entry is not None and self._parked.get(entry.uid) == self._fingerprint(where)

    def _park(self, where: tuple[str, str], te: Body) -> None:
        fingerprint = self._fingerprint(where)
        if fingerprint is not None and fingerprint[0] == te["metadata"].get("uid"):
            self._parked[str(fingerprint[0])] = fingerprint

    async def build(self, te: Body) -> TaskContext | None:
        """The context of one step, or None after saying in the status why there is none."""
        name = te["metadata"]["name"]
        namespace = te["metadata"]["namespace"]
        if self.parked((namespace, name)):
            return None  # still waiting for the same fix: said in its status already
        status = TaskExecutionStatus.model_validate(te.get("status") or {})
        try:
            spec = TaskExecutionSpec.model_validate(te["spec"])
            task = task_spec(name, spec)
        except ValidationError as exc:
            if status.attempt > 0 or all(e["type"] == "extra_forbidden" for e in exc.errors()):
                await self.status.park(te, status, UNSUPPORTED, unsupported(exc, status.attempt))
                self._park((namespace, name), te)  # until it changes or the operator restarts
            else:
                await self.status.invalid(te, status, problems_of(exc))
            return None
        names = [spec.adapter_ref.name, *(r.name for r in spec.fallback_adapter_refs)]
        objects: dict[str, Body | None] = {}
        for adapter_name in names:
            obj = self.cache.adapters.get((namespace, adapter_name))
            if obj is None and not self.cache.adapters_listed(namespace):
                obj = await self.api.get_object(ADAPTERS, namespace, adapter_name)
                if obj is not None:
                    self.cache.adapters[(namespace, adapter_name)] = trim(obj)
            objects[adapter_name] = obj
        uid = te["metadata"]["uid"]
        inputs = (
            te["metadata"].get("generation"),
            *(o and _version(o) for o in objects.values()),
        )
        if self._checked.get(uid) != inputs:
            self._checked.pop(uid, None)
            problems = task_execution_problems(te, objects)
            if problems:
                message = describe(problems)
                if all(p.reason in WAIT_FOR_FIX for p in problems):
                    await self.status.park(te, status, problems[0].reason, message)
                    self._park((namespace, name), te)
                else:  # the spec is immutable: it will never run
                    await self.status.invalid(te, status, [message])
                return None
            if not status.state.terminal:  # forget() drops it when the task ends or goes
                self._checked[uid] = inputs
        adapters: dict[str, AdapterResourceSpec] = {}
        engine: dict[str, AdapterSpec] = {}
        for adapter_name, found in objects.items():
            assert found is not None  # task_execution_problems named every missing Adapter
            parsed = self._adapter(namespace, adapter_name, found)
            adapters[adapter_name], engine[adapter_name] = parsed.spec, parsed.engine
            await self.egress.ensure(found, parsed.spec)
        for adapter in engine.values():
            self.breakers.know(namespace, adapter)
        ctx = TaskContext(te, spec, status, task, adapters, TaskPlan.of(task, names, engine))
        ctx.inputs = list(engine.values())
        ctx.generations = self.cache.generations(namespace, names)
        return ctx

    def _adapter(self, namespace: str, name: str, obj: Body) -> _Adapter:
        version = _version(obj)
        parsed = self._adapters.get((namespace, name))
        if parsed is None or parsed.version != version:
            spec = AdapterResourceSpec.model_validate(obj["spec"])
            parsed = _Adapter(version, spec, adapter_spec(name, spec))
            self._adapters[(namespace, name)] = parsed
        return parsed

    def record(self, ctx: TaskContext) -> TaskRecord:
        """The task's database record (the Adapters' rows synced first, once per generation).

        A task the database does not know yet is not inserted here: its record is what the
        insert would make, and :meth:`ensure` writes the row before the first write of it
        (a start creates its Job first and records it after). Blocking: call it in a
        thread; one trip does both."""
        adapters = (ctx.ns, ctx.generations)
        if adapters not in self._adapters_synced:
            self.store.sync_adapters(ctx.ns, ctx.inputs)
            self._adapters_synced.add(adapters)
        if ctx.uid in self._tasks_synced:
            return self.store.task(ctx.key)
        found = self.store.find_task(ctx.key)
        if found is None:
            return fresh_record(*self.row(ctx))
        return self._sync(ctx)

    def ensure(self, ctx: TaskContext) -> None:
        """The task's row exists (inserted unless this process did already). Blocking."""
        if ctx.uid not in self._tasks_synced:
            self._sync(ctx)

    def row(self, ctx: TaskContext) -> TaskRow:
        """What the task's row is made of: key, queue order, spec, first Adapter."""
        seq = int(parse_time(ctx.te["metadata"].get("creationTimestamp")).timestamp())
        return ctx.key, seq, ctx.task, ctx.plan.chain.adapter_ids[0]

    def _sync(self, ctx: TaskContext) -> TaskRecord:
        record = self.store.synced_task(*self.row(ctx))
        self._tasks_synced.add(ctx.uid)
        return record

    def forget(self, uid: str) -> None:
        """The task is finished or gone: nothing of it stays in memory."""
        self._tasks_synced.discard(uid)
        self._parked.pop(uid, None)
        self._checked.pop(uid, None)


#: The reason of a task held because this operator cannot read its spec (a newer CRD).
UNSUPPORTED = "UnsupportedSpec"


def unsupported(exc: ValidationError, attempt: int) -> str:
    """Why a task is held rather than failed: the API server accepted its spec (its schema
    prunes every field it does not know), so a field this operator does not know comes from a
    CRD newer than the operator; and a started task's spec is immutable, so one that no longer
    validates changed under it the same way. Nothing is failed or recorded: the task is parked
    like one waiting for its Adapter, and goes on once operator and CRDs agree (an upgraded
    operator starts with nothing parked)."""
    fields = " ".join(problems_of(exc))
    held = "its attempt's Job runs on; " if attempt > 0 else ""
    return (
        f"this operator cannot read the spec ({fields}): the TaskExecution CRD is newer than "
        f"the operator; the task waits ({held}nothing is failed or recorded). Fix: upgrade the "
        "operator, or apply the CRDs of its version"
    )[:1000]


def problems_of(exc: ValidationError) -> list[str]:
    """Each problem as ``field: message`` (the field named as in the manifest)."""
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        out.append(f"spec.{where}: {err['msg']}" if where else str(err["msg"]))
    return out[:5]

"""The recording half of the operator's controller: finishing attempts and writing status.

Everything that turns a finished attempt into records lives here (classification already
done by the caller): the retry decision, the ledger entry, the database rows and events, the
circuit breaker (mirrored into the Adapter's status), and the one code path that writes a
TaskExecution's status. :class:`core.kube.reconciler.Controller` adds the state machine.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from core.db.breaker_store import SqlBreakerStore
from core.db.store import Event, Store
from core.db.test_history import record_gate_tests
from core.engine.events import EventLog
from core.engine.monitoring.metrics import Metrics
from core.engine.patch_ledger import PatchLedger
from core.engine.resilience.breaker_store import CircuitBreakers
from core.engine.resilience.circuit_breaker import BreakerTransition
from core.engine.resilience.classification import Classification, task_state
from core.engine.resilience.retry import (
    AdapterChain,
    BackoffSchedule,
    decide_retry,
)
from core.engine.resilience.retry import AttemptOutcome as HistoryItem
from core.engine.state_files import PATCH_LEDGER, STATE_DIR
from core.kube.api import KubeApi
from core.kube.attempts import (
    gate_summary,
    history_of,
    summary_from_status,
)
from core.kube.conditions import reason_for, set_conditions
from core.models import AdapterSpec, AttemptResult, DiffSummary, FailureClass, TaskSpec, TaskState
from core.resources import (
    AdapterResourceSpec,
    AdapterResourceStatus,
    TaskExecutionSpec,
    TaskExecutionStatus,
    diff_status,
)
from core.runner.protocol import RunnerResult

log = logging.getLogger("orchestrator.operator")
T = TypeVar("T")
TE = "taskexecutions"
ADAPTERS = "adapters"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ControllerSettings:
    workdir: Path
    runner_image: str
    namespace: str | None = None
    image_pull_policy: str = "IfNotPresent"
    max_log_bytes: int = 2 * 1024 * 1024
    max_diff_bytes: int = 512 * 1024  # the patch travels in a ConfigMap (1 MiB limit)
    resync_seconds: float = 30.0


@dataclass
class _Context:
    te: dict[str, Any]
    spec: TaskExecutionSpec
    status: TaskExecutionStatus
    task: TaskSpec
    adapters: dict[str, AdapterResourceSpec]
    engine_adapters: dict[str, AdapterSpec]

    @property
    def ns(self) -> str:
        return str(self.te["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.te["metadata"]["name"])

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def task_id(self) -> str:
        return self.task.task_id


class ControllerBase:
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
        wd = settings.workdir
        self.ledger = PatchLedger(wd / STATE_DIR / PATCH_LEDGER, wd / ".ledger" / "patches", now)
        # the database already de-duplicates events (keyed inserts): no key set in memory
        self.events = EventLog(wd / "logs" / "executor.jsonl", dedupe=False)
        self._policies: dict[str, AdapterSpec] = {}
        self.breakers = CircuitBreakers(
            SqlBreakerStore(store.engine),
            lambda adapter: self._policies[adapter].breaker,
            now,
            self._on_breaker,
        )
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._breaker_changes: list[BreakerTransition] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._egress_applied: set[tuple[str, str, int | None]] = set()
        # newest known body of each unfinished TaskExecution, and the Adapters by name
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._adapters: dict[tuple[str, str], dict[str, Any]] = {}
        self._synced: set[tuple[str, tuple[tuple[str, int | None], ...]]] = set()
        self._written: dict[tuple[str, str], str | None] = {}

    # ------------------------------------------------------------------ finishing an attempt

    async def _finish(
        self,
        ctx: _Context,
        classification: Classification,
        result: RunnerResult | None,
        gate: Any,
        patch: bytes | None,
        *,
        infra_message: str | None = None,
        adapter_diff: Any = None,
    ) -> None:
        status = ctx.status
        now = self.now()
        current = status.attempts[-1]
        chain = AdapterChain.of(
            ctx.spec.adapter_ref.name, [r.name for r in ctx.spec.fallback_adapter_refs]
        )
        primary = ctx.engine_adapters[chain.primary]
        policy = ctx.task.retry or primary.retry
        await self._db(self.breakers.record, current.adapter, classification, trial=current.trial)
        history = [
            *history_of(status, upto=len(status.attempts) - 1),
            HistoryItem(current.attempt, current.adapter, classification),
        ]
        started_at = status.started_at or now
        budget = ctx.task.timeout_seconds or primary.timeout_seconds
        admits = await self._db(self.breakers.admits_map, chain.adapter_ids)
        decision = decide_retry(
            policy,
            chain,
            history,
            remaining_seconds=budget - (now - started_at).total_seconds(),
            admits=admits,
            schedule=BackoffSchedule(policy, self.rng),
            min_attempt_seconds=policy.min_attempt_seconds,
        )
        final = not decision.retry
        diff: DiffSummary | None = None
        if result is not None and result.diff is not None and result.kind == "adapter":
            diff = result.diff
        state = task_state(classification)
        attempt_result = AttemptResult(
            attempt=current.attempt,
            adapter_id=current.adapter,
            state=state,
            failure_class=classification.failure_class,
            failure_message="" if classification.succeeded else classification.message,
            exit_code=result.exit_code
            if result and result.kind == "adapter"
            else current.exit_code,
            signal=result.signal if result and result.kind == "adapter" else None,
            timed_out=bool(result and result.timed_out and result.kind == "adapter"),
            started_at=current.started_at or now,
            finished_at=now,
            duration_seconds=round((now - (current.started_at or now)).total_seconds(), 3),
            log_path=f"logs/execution/{ctx.task_id}.jsonl",
            log_bytes=result.log_bytes if result else 0,
            log_truncated=bool(result and result.log_truncated),
            diff=diff or summary_from_status(adapter_diff),
            gate=gate,
            final=final,
        )
        entry = await self._db(
            self.ledger.append,
            run_id=ctx.run_id,
            task_id=ctx.task_id,
            base_commit=ctx.task.base_commit,
            result=attempt_result,
            patch=patch,
        )
        events: list[Event] = await self._db(
            self.store.finish_attempt,
            ctx.run_id,
            ctx.task_id,
            entry.result,
            final=final,
            entry=entry,
            patch=patch,
        )
        self.events.write(events)
        await self._db(
            record_gate_tests,
            self.store.engine,
            ctx.run_id,
            ctx.task_id,
            current.attempt,
            gate,
            self.metrics,
        )
        if gate is not None:
            self.metrics.gate_finished(gate.passed)
        summary = gate_summary(gate)
        attempts = list(status.attempts)
        attempts[-1] = current.model_copy(
            update={
                "state": state,
                "failure_class": classification.failure_class,
                "message": attempt_result.failure_message,
                "finished_at": now,
                "exit_code": attempt_result.exit_code,
                "diff": diff_status(attempt_result.diff),
                "gate": summary,
            }
        )
        message = (
            infra_message
            if (infra_message and not classification.succeeded)
            else classification.message
        )
        update: dict[str, Any] = {
            "attempts": attempts,
            "failure_class": classification.failure_class,
            "diff": diff_status(attempt_result.diff),
            "gate": summary,
        }
        if final:
            update |= {
                "state": state,
                "finished_at": now,
                "reason": reason_for(state, classification.failure_class),
                "message": message if not classification.succeeded else "completed",
            }
            new = status.model_copy(update=update)
            await self._write_status(ctx.te, new)
            ok = state is TaskState.COMPLETED
            await self.api.post_event(
                ctx.te,
                "Normal" if ok else "Warning",
                "TASK_COMPLETED" if ok else "TASK_FAILED",
                f"{state.value} after {current.attempt} attempt(s)"
                + ("" if ok else f": {classification.failure_class}: {message}"),
                "Finish",
            )
            duration = (now - started_at).total_seconds()
            self.metrics.task_finished(current.adapter, state, duration)
            return
        not_before = now + timedelta(seconds=decision.delay_seconds)
        update |= {
            "state": TaskState.PENDING,
            "not_before": not_before,
            "reason": "RetryScheduled",
            "message": decision.reason,
        }
        self.metrics.retry(current.adapter, str(classification.failure_class))
        await self._write_status(ctx.te, status.model_copy(update=update))
        self._schedule(ctx.ns, ctx.name, decision.delay_seconds)

    async def _give_up(self, ctx: _Context, reason: str) -> None:
        self.events.write(await self._db(self.store.give_up, ctx.run_id, ctx.task_id, reason))
        last = ctx.status.attempts[-1] if ctx.status.attempts else None
        timed_out = last is not None and last.failure_class is FailureClass.ADAPTER_TIMEOUT
        state = TaskState.TIMEOUT if timed_out or "budget" in reason else TaskState.FAILED
        new = ctx.status.model_copy(
            update={
                "state": state,
                "finished_at": self.now(),
                "reason": "BudgetExhausted"
                if "budget" in reason
                else reason_for(state, ctx.status.failure_class),
                "message": reason,
            }
        )
        await self._write_status(ctx.te, new)
        await self.api.post_event(ctx.te, "Warning", "TASK_FAILED", reason, "Finish")

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
        for field in ("notBefore", "gateJobName", "failureClass"):
            body.setdefault(field, None)
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

    def _on_breaker(self, transition: BreakerTransition) -> None:
        self.metrics.breaker(transition.adapter_id, transition.to_state.value)
        self._breaker_changes.append(transition)

    async def _mirror_breakers(self, namespace: str) -> None:
        """Copy breaker transitions into the Adapter resources' status (only on change)."""
        changes, self._breaker_changes = self._breaker_changes, []
        for adapter in {c.adapter_id for c in changes}:
            snap = await self._db(self.breakers.view, adapter)
            status = AdapterResourceStatus(
                breaker_state=snap.state.value,
                consecutive_failures=snap.consecutive_failures,
                opened_at=snap.opened_at,
                message=changes[-1].reason,
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

    async def reconcile(self, namespace: str, name: str) -> None:
        raise NotImplementedError  # the state machine (core.kube.reconciler.Controller)

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

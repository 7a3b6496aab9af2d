"""The operator's reconciler: drives each TaskExecution through its attempts with Jobs.

Level-triggered and idempotent: every call looks at the TaskExecution's status and the Jobs it
names, and takes the next step. State lives in ``status`` (the API server) and is mirrored to
the database, the ledger and the logs of the operator's work dir, with the same keyed writes
as the embedded executor; Job names are deterministic, so a replayed step after a crash finds
its Job (409) instead of making a second one.

    PENDING     -> choose an adapter (retry policy, breakers), create the adapter Job
    IN_PROGRESS -> adapter Job done: read the runner's report from the pod log, save logs;
                   a usable diff -> ConfigMap with the patch + gate Job; else finish
    VALIDATING  -> gate Job done: finish with the gate's result
    finish      -> classify, ledger, DB, breaker; retry later (PENDING, notBefore) or terminal

Each step runs under a per-TaskExecution asyncio lock and re-reads the object first.
Database and ledger calls are synchronous and run in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from pydantic import ValidationError

from core.engine.resilience.classification import FailureEvidence, classify
from core.engine.resilience.retry import (
    AdapterChain,
    BackoffSchedule,
    decide_retry,
    first_adapter,
    gate_feedback,
)
from core.kube.attempts import (
    gate_result,
    history_of,
    parse_time,
)
from core.kube.controller_base import (
    ADAPTERS,
    TE,
    ControllerBase,
    ControllerSettings,
    _Context,
    log,
)
from core.kube.jobs import (
    PATCH_DIR,
    egress_policy,
    job_failure_reason,
    job_finished,
    job_manifest,
    job_name,
)
from core.kube.jobs import patch_configmap as configmap_manifest
from core.models import TaskState
from core.resources import (
    AdapterResourceSpec,
    AttemptStatus,
    TaskExecutionSpec,
    TaskExecutionStatus,
    adapter_spec,
    diff_status,
    task_spec,
)
from core.runner.protocol import RunnerRequest, RunnerResult, parse_pod_log

__all__ = ["Controller", "ControllerSettings"]


class Controller(ControllerBase):
    """Reconciles TaskExecutions: the state machine of the module docstring."""

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
        self.forget(te["metadata"]["namespace"], te["metadata"]["name"])
        try:
            spec = TaskExecutionSpec.model_validate(te["spec"])
            status = TaskExecutionStatus.model_validate(te.get("status") or {})
        except ValidationError:
            return
        if status.state.terminal:
            return
        task_id = spec.task_id or te["metadata"]["name"]
        reason = "TaskExecution deleted while it was running"
        try:
            events = await self._db(self.store.cancel, spec.run_id, task_id, reason)
        except KeyError:
            return
        self.events.write(events)

    async def resync_forever(self) -> None:
        """The safety net of a level-triggered controller: re-reconcile unfinished objects."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            try:
                await self.resync()
            except Exception:
                log.exception("resync failed")

    async def resync(self) -> None:
        for te in await self.api.list_objects(TE, self.settings.namespace):
            state = (te.get("status") or {}).get("state", "PENDING")
            if not TaskState(state).terminal:
                await self.reconcile(te["metadata"]["namespace"], te["metadata"]["name"], te)

    # ------------------------------------------------------------------ the state machine

    async def _reconcile(self, te: dict[str, Any]) -> None:
        ctx = await self._context(te)
        if ctx is None or ctx.status.state.terminal:
            return
        match ctx.status.state:
            case TaskState.PENDING:
                await self._start(ctx)
            case TaskState.IN_PROGRESS:
                await self._after_adapter(ctx)
            case TaskState.VALIDATING:
                await self._after_gate(ctx)

    async def _context(self, te: dict[str, Any]) -> _Context | None:
        name = te["metadata"]["name"]
        status = TaskExecutionStatus.model_validate(te.get("status") or {})
        try:
            spec = TaskExecutionSpec.model_validate(te["spec"])
            task = task_spec(name, spec)
        except ValidationError as exc:
            await self._terminal_invalid(te, status, str(exc).splitlines()[0:3])
            return None
        names = [spec.adapter_ref.name, *(r.name for r in spec.fallback_adapter_refs)]
        adapters: dict[str, AdapterResourceSpec] = {}
        namespace = te["metadata"]["namespace"]
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
        self._policies.update(engine)
        synced = (te["metadata"]["uid"], tuple(_generations(self._adapters, namespace, names)))
        if synced not in self._synced:
            seq = int(parse_time(te["metadata"].get("creationTimestamp")).timestamp())
            await self._db(
                self.store.sync_inputs, spec.run_id, list(engine.values()), [(seq, task, names[0])]
            )
            self._synced.add(synced)
        return _Context(te, spec, status, task, adapters, engine)

    async def _ensure_egress(self, adapter: dict[str, Any], spec: AdapterResourceSpec) -> None:
        """Keep the Adapter's egress NetworkPolicy in line with its spec (once per change)."""
        meta = adapter["metadata"]
        key = (meta["namespace"], meta["name"], meta.get("generation"))
        if not spec.egress or key in self._egress_applied:
            return
        await self.api.apply_network_policy(meta["namespace"], egress_policy(adapter, spec))
        self._egress_applied.add(key)

    async def _start(self, ctx: _Context) -> None:
        now = self.now()
        status = ctx.status
        if status.not_before and status.not_before > now:
            self._schedule(ctx.ns, ctx.name, (status.not_before - now).total_seconds())
            return
        chain = AdapterChain.of(
            ctx.spec.adapter_ref.name, [r.name for r in ctx.spec.fallback_adapter_refs]
        )
        primary = ctx.engine_adapters[chain.primary]
        policy = ctx.task.retry or primary.retry
        budget = ctx.task.timeout_seconds or primary.timeout_seconds
        started_at = status.started_at or now
        remaining = budget - (now - started_at).total_seconds()
        history = history_of(status)
        admits = await self._db(self.breakers.admits_map, chain.adapter_ids)
        extra: str | None = None
        if history and not history[-1].classification.succeeded:
            decision = decide_retry(
                policy,
                chain,
                history,
                remaining_seconds=remaining,
                admits=admits,
                schedule=BackoffSchedule(policy, self.rng),
                min_attempt_seconds=policy.min_attempt_seconds,
            )
            if not decision.retry:
                await self._give_up(ctx, decision.reason)
                return
            if decision.waiting_for_breaker:
                await self._park(ctx.te, status, "WaitingForBreaker", decision.reason)
                self._schedule(ctx.ns, ctx.name, self.settings.resync_seconds)
                return
            assert decision.next_adapter_id is not None
            adapter_name = decision.next_adapter_id
            last_gate = status.attempts[-1].gate if status.attempts else None
            if decision.include_gate_feedback and last_gate is not None:
                extra = gate_feedback(gate_result(last_gate))
        else:
            selection = first_adapter(chain, admits)
            if selection.waiting_for_breaker:
                await self._park(ctx.te, status, "WaitingForBreaker", selection.reason)
                self._schedule(ctx.ns, ctx.name, self.settings.resync_seconds)
                return
            adapter_name = selection.adapter_id
        if remaining < policy.min_attempt_seconds:
            await self._give_up(ctx, f"task budget of {budget:g}s exhausted")
            return
        admission = await self._db(self.breakers.acquire, adapter_name)
        if not admission.admitted:
            await self._park(ctx.te, status, "WaitingForBreaker", admission.reason)
            self._schedule(
                ctx.ns, ctx.name, admission.retry_after_seconds or self.settings.resync_seconds
            )
            return
        attempt = status.attempt + 1
        adapter = ctx.engine_adapters[adapter_name]
        timeout = min(remaining, adapter.timeout_seconds)
        name = job_name(ctx.name, ctx.te["metadata"]["uid"], attempt, "adapter")
        request = RunnerRequest(
            kind="adapter",
            run_id=ctx.run_id,
            task=ctx.task,
            adapter=adapter,
            attempt=attempt,
            repo_url=ctx.task.repo,
            timeout_seconds=timeout,
            max_log_bytes=self.settings.max_log_bytes,
            max_diff_bytes=self.settings.max_diff_bytes,
            extra_input=extra,
            gate_checks=[],
            gate_baseline=False,
            patch_file=None,
        )
        await self.api.create_job(
            ctx.ns, self._job(ctx, name, "adapter", attempt, request, timeout, adapter_name)
        )
        self.events.write(
            await self._db(self.store.begin_attempt, ctx.run_id, ctx.task_id, attempt, adapter_name)
        )
        attempts = [
            *status.attempts,
            AttemptStatus(
                attempt=attempt,
                adapter=adapter_name,
                job_name=name,
                state=TaskState.IN_PROGRESS,
                started_at=now,
                trial=admission.trial,
            ),
        ]
        new = status.model_copy(
            update={
                "state": TaskState.IN_PROGRESS,
                "attempt": attempt,
                "adapter": adapter_name,
                "job_name": name,
                "gate_job_name": None,
                "started_at": started_at,
                "not_before": None,
                "reason": "AdapterRunning",
                "message": f"attempt {attempt} on adapter {adapter_name} (Job {name})",
                "attempts": attempts,
            }
        )
        await self._write_status(ctx.te, new)
        await self.api.post_event(ctx.te, "Normal", "TASK_STARTED", new.message, "Start")

    def _job(
        self,
        ctx: _Context,
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
            run_id=ctx.run_id,
            task_id=ctx.task_id,
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
        self, ctx: _Context, job: str, role: str, attempt: int
    ) -> RunnerResult | None:
        """Read the runner's report from the pod log and save the log in the task's log file."""
        pods = await self.api.job_pods(ctx.ns, job)
        text = await self.api.pod_log(ctx.ns, pods[-1]["metadata"]["name"]) if pods else None
        if text is None:
            return None
        parsed = parse_pod_log(text)
        await self._db(self._save_log, ctx.task_id, attempt, role, parsed.records)
        return parsed.result

    def _save_log(
        self, task_id: str, attempt: int, role: str, records: list[dict[str, Any]]
    ) -> None:
        path = self.settings.workdir / "logs" / "execution" / f"{task_id}.jsonl"
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
                fh.write(json.dumps({**rec, "task_id": task_id, "attempt": attempt}) + "\n")
            fh.write(
                json.dumps({"ts": self.now().isoformat(), "task_id": task_id, **marker}) + "\n"
            )

    async def _after_adapter(self, ctx: _Context) -> None:
        status = ctx.status
        assert status.job_name is not None
        job = await self.api.get_job(ctx.ns, status.job_name)
        if job is not None and job_finished(job) is None:
            return
        result = (
            await self._collect(ctx, status.job_name, "adapter", status.attempt) if job else None
        )
        infra = None
        if job is None:
            infra = f"adapter Job {status.job_name} was deleted before it reported"
        elif result is None:
            infra = job_failure_reason(job) or "the runner reported no result (pod lost)"
        deadline_hit = bool(infra and "DeadlineExceeded" in infra)
        adapter_ok = (
            result is not None
            and result.exit_code == 0
            and not (result.timed_out or result.cancelled or result.start_error)
        )
        diff = result.diff if result else None
        usable = diff is not None and (not diff.empty or ctx.task.allow_empty_diff)
        if adapter_ok and usable and result is not None:
            if result.patch_b64 is None and diff is not None and not diff.empty:
                evidence = self._evidence(
                    result, ctx, gate_passed=False, failed=("diff-too-large",)
                )
                await self._finish(ctx, classify(evidence), result, None, None)
                return
            await self._start_gate(ctx, result)
            return
        evidence = (
            self._evidence(result, ctx)
            if result is not None
            else FailureEvidence(
                timed_out=deadline_hit, infrastructure_reason=None if deadline_hit else infra
            )
        )
        patch = base64.b64decode(result.patch_b64) if result and result.patch_b64 else None
        await self._finish(ctx, classify(evidence), result, None, patch, infra_message=infra)

    def _evidence(
        self,
        result: RunnerResult,
        ctx: _Context,
        *,
        gate_passed: bool | None = None,
        failed: tuple[str, ...] = (),
    ) -> FailureEvidence:
        # The runner reports `cancelled` when its pod got SIGTERM. A TaskExecution that is
        # deleted is never reconciled again, so here that means the platform stopped the pod
        # (deleted, evicted, node drained): an infrastructure failure, retried by policy.
        stopped = "the pod was stopped (deleted or evicted) before the adapter finished"
        return FailureEvidence(
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
            infrastructure_reason=stopped if result.cancelled else None,
            start_error=result.start_error,
            diff_empty=result.diff.empty if result.diff else None,
            allow_empty_diff=ctx.task.allow_empty_diff,
            gate_passed=gate_passed,
            gate_failed_checks=failed,
            output_tail=result.output_tail,
        )

    async def _start_gate(self, ctx: _Context, result: RunnerResult) -> None:
        status = ctx.status
        adapter_name = status.adapter or ctx.spec.adapter_ref.name
        name = job_name(ctx.name, ctx.te["metadata"]["uid"], status.attempt, "gate")
        cm = f"{name}-patch"
        await self.api.create_configmap(
            ctx.ns, configmap_manifest(ctx.te, cm, result.patch_b64 or "")
        )
        checks = (
            ctx.task.gate if ctx.task.gate is not None else ctx.engine_adapters[adapter_name].gate
        )
        request = RunnerRequest(
            kind="gate",
            run_id=ctx.run_id,
            task=ctx.task,
            adapter=ctx.engine_adapters[adapter_name],
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
        await self._db(self.store.set_validating, ctx.run_id, ctx.task_id)
        attempts = list(status.attempts)
        attempts[-1] = attempts[-1].model_copy(
            update={
                "gate_job_name": name,
                "exit_code": result.exit_code,
                "diff": diff_status(result.diff),
            }
        )
        new = status.model_copy(
            update={
                "state": TaskState.VALIDATING,
                "gate_job_name": name,
                "diff": diff_status(result.diff),
                "reason": "Validating",
                "message": f"test gate Job {name}",
                "attempts": attempts,
            }
        )
        await self._write_status(ctx.te, new)

    async def _after_gate(self, ctx: _Context) -> None:
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
        current = status.attempts[-1]
        gate = result.gate if result else None
        if result is None or gate is None:
            reason = (
                job_failure_reason(job) if job else None
            ) or "gate Job lost before it reported"
            evidence = FailureEvidence(infrastructure_reason=f"test gate: {reason}")
        else:
            evidence = FailureEvidence(
                exit_code=current.exit_code if current.exit_code is not None else 0,
                diff_empty=current.diff.empty if current.diff else None,
                allow_empty_diff=ctx.task.allow_empty_diff,
                gate_passed=gate.passed,
                gate_failed_checks=tuple(gate.blamed),
            )
        await self._finish(ctx, classify(evidence), result, gate, patch, adapter_diff=current.diff)


def _generations(
    cache: dict[tuple[str, str], dict[str, Any]], namespace: str, names: list[str]
) -> list[tuple[str, int | None]]:
    return [(n, cache.get((namespace, n), {}).get("metadata", {}).get("generation")) for n in names]

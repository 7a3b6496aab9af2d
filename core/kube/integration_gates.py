"""The merged-tree gate of an Integration, run as Jobs: the Kubernetes ``TreeGate``.

The integration worker (:mod:`core.engine.integration_worker`) is synchronous and runs in a
thread of the operator's own; every gate run it asks for becomes one gate Job, made like a
TaskExecution's gate Job (the runner's ``gate`` mode: a fresh clone at ``baseCommit``, the
patch from a ConfigMap, the checks, the baseline), with:

* **base** = the branch's last good head, pushed to the tasks' repository as the integration
  branch before the Job is made, so the pod can clone it; the speculative tree never leaves
  the operator: the patch from the good head to it travels in the ConfigMap;
* a **deterministic name** ``<integration>-<uid hash>-<gate-run number>-<tree hash>g``: the
  number is the Integration's gate-run count (runs recorded before this worker run plus this
  run's), the tree hash (base, head, checks) guarantees that a Job of that name *is* this gate
  run. After a crash the worker asks for the same trees again (its commits are
  deterministic); the create answers 409 and the Job already running (or done) is waited for,
  not a second one; a different tree never gets an old Job's verdict;
* an **owner reference** to the Integration (Jobs and ConfigMaps are deleted with it) and the
  runner labels (``app.kubernetes.io/name=orchestrator-runner``, ``role=gate``), so the
  chart's runner NetworkPolicy applies, as to every gate pod;
* an **event-driven wait**: the Job informer's events wake the waiting thread
  (:class:`JobWaiter`), with a look every ``poll_seconds`` as the safety net. A pod that cannot
  start (pending triage, :mod:`core.kube.pods`) or a Job that ends without the runner's report
  is an infrastructure failure: the Job is deleted and the worker run fails, to be retried with
  backoff -- nothing is blamed on a change.

Every API call is made on the event loop (``asyncio.run_coroutine_threadsafe``): the client
lives there, and this thread only waits.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from core.engine.integration_gate import TreeGateRequest
from core.engine.integration_repo import IntegrationRepo
from core.errors import InfrastructureError, OrchestratorError
from core.kube.api import Body, KubeApi, is_owned_by
from core.kube.attempts import parse_time
from core.kube.jobs import (
    BACKSTOP_GRACE_SECONDS,
    INPUTS_DIR,
    LABEL_ROLE,
    LABEL_RUN,
    MANAGED_BY,
    RunnerStorage,
    job_failure_reason,
    job_finished,
    job_manifest,
    owner_reference,
)
from core.kube.pod_logs import read_report
from core.kube.pods import triage
from core.models import AdapterKind, AdapterSpec, GateResult, TaskSpec
from core.resources import AdapterKind as ResourceKind
from core.resources import AdapterResourceSpec, Resources
from core.runner.protocol import RunnerRequest

T = TypeVar("T")
LABEL_INTEGRATION = "orchestrator.dev/integration"
LABEL_GATE_RUN = "orchestrator.dev/gate-run"
ANNOTATION_TREE = "orchestrator.dev/tree"
#: Longest wait for one API call made on the event loop (the client's own timeout is 30 s).
CALL_TIMEOUT_SECONDS = 300.0
#: A ConfigMap holds at most 1 MiB; the patch is base64 in binaryData.
MAX_PATCH_BYTES = 700 * 1024


class IntegrationInterrupted(OrchestratorError):
    """The operator stopped leading (or shuts down) while a gate run was waited for."""


def tree_digest(request: TreeGateRequest) -> str:
    """What a gate run judges: its base, its head and its checks."""
    checks = json.dumps([c.model_dump(mode="json") for c in request.checks], sort_keys=True)
    raw = f"{request.base_commit}\n{request.head_commit}\n{request.baseline}\n{checks}"
    return hashlib.sha256(raw.encode()).hexdigest()


def gate_job_name(integration: str, uid: str, number: int, digest: str) -> str:
    """<= 63 characters, a label value; unique per Integration object, gate run and tree."""
    suffix = f"{hashlib.sha256(uid.encode()).hexdigest()[:6]}-{number}-{digest[:8]}g"
    head = integration[: 62 - len(suffix)].rstrip("-.")
    return f"{head}-{suffix}" if head else suffix


def gate_labels(integration: str, run_id: str, number: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "orchestrator-runner",
        LABEL_INTEGRATION: integration,
        LABEL_RUN: run_id,
        LABEL_ROLE: "gate",
        LABEL_GATE_RUN: str(number),
    }


def gate_request(request: TreeGateRequest, repo_url: str, max_log_bytes: int) -> RunnerRequest:
    """The runner's request for one merged-tree gate run (the runner's ``gate`` mode)."""
    task = TaskSpec(
        task_id="integration",
        title=f"merged-tree gate {request.number} of run {request.run_id}",
        prompt=f"Judge the merged tree of tasks {', '.join(request.task_ids)}.",
        repo=repo_url,
        base_commit=request.base_commit,
        gate_baseline=request.baseline,
        gate_policy=request.policy,
    )
    checks = list(request.checks)
    return RunnerRequest(
        kind="gate",
        run_id=request.run_id,
        task=task,
        adapter=AdapterSpec(id="integration", kind=AdapterKind.PATCH),
        attempt=request.number,
        repo_url=repo_url,
        timeout_seconds=sum(c.timeout_seconds for c in checks) or 60,
        max_log_bytes=max_log_bytes,
        gate_checks=checks,
        gate_baseline=request.baseline,
        patch_file=f"{INPUTS_DIR}/patch",
    )


def gate_job(
    integration: Body,
    *,
    name: str,
    number: int,
    digest: str,
    request: RunnerRequest,
    image: str,
    image_pull_policy: str,
    resources: Resources,
    pending_timeout_seconds: float,
    storage: RunnerStorage | None = None,
) -> Body:
    """The gate Job of one gate run (the manifest of an attempt's gate Job, relabelled)."""
    deadline = (
        request.timeout_seconds * (2 if request.gate_baseline else 1)
        + pending_timeout_seconds
        + BACKSTOP_GRACE_SECONDS
    )
    job = job_manifest(
        te=integration,
        name=name,
        role="gate",
        run_id=request.run_id,
        task_id="integration",
        attempt=number,
        image=image,
        deadline_seconds=deadline,
        adapter=AdapterResourceSpec(kind=ResourceKind.PATCH, resources=resources),
        inputs_configmap=f"{name}-patch",
        image_pull_policy=image_pull_policy,
        storage=storage,
    )
    labels = gate_labels(integration["metadata"]["name"], request.run_id, number)
    job["metadata"]["labels"] = labels
    job["metadata"]["annotations"] = {ANNOTATION_TREE: digest}
    job["spec"]["template"]["metadata"]["labels"] = dict(labels)
    return job


def patch_configmap(
    integration: Body, name: str, patch: bytes, number: int, request: RunnerRequest
) -> Body:
    """The gate run's inputs: the runner's request and the merged diff (the pod's inputs
    directory, :func:`core.kube.jobs.job_manifest` ``inputs_configmap``)."""
    meta = integration["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_INTEGRATION: meta["name"],
                LABEL_GATE_RUN: str(number),
            },
            "ownerReferences": [owner_reference(integration)],
        },
        "data": {"request.json": request.model_dump_json()},
        "binaryData": {"patch": base64.b64encode(patch).decode()},
    }


class JobWaiter:
    """Wakes threads waiting for a Job when its watch event says it finished or vanished."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def event(self, namespace: str, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault((namespace, name), threading.Event())

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._events.pop((namespace, name), None)

    def observe(self, type_: str, job: Body) -> None:
        """A Job watch event (event loop)."""
        if type_ != "DELETED" and job_finished(job) is None:
            return
        meta = job["metadata"]
        with self._lock:
            found = self._events.get((str(meta.get("namespace")), str(meta["name"])))
        if found is not None:
            found.set()


@dataclass(frozen=True)
class GateSettings:
    image: str
    image_pull_policy: str
    workdir: Path
    max_log_bytes: int = 2 * 1024 * 1024
    #: The safety net of the event-driven wait.
    poll_seconds: float = 10.0
    #: Gate pods' emptyDir size limits and ephemeral-storage (None: RunnerStorage's defaults).
    storage: RunnerStorage | None = None


class JobTreeGate:
    """:class:`~core.engine.integration_gate.TreeGate` on gate Jobs (see the module docstring).

    Called from the integration worker's thread; ``loop`` is the operator's event loop;
    ``source`` says the tasks' repository once the worker opened the integration.
    """

    def __init__(
        self,
        api: KubeApi,
        loop: asyncio.AbstractEventLoop,
        integration: Body,
        *,
        source: Callable[[], str],
        branch: str,
        first_number: int,
        resources: Resources,
        pending_timeout_seconds: float,
        settings: GateSettings,
        waiter: JobWaiter,
        stop: threading.Event,
        now: Callable[[], datetime],
        on_job: Callable[[str | None], None] = lambda name: None,
    ) -> None:
        self.api = api
        self.loop = loop
        self.integration = integration
        self.source = source
        self.branch = branch
        self.first_number = first_number
        self.resources = resources
        self.pending_timeout_seconds = pending_timeout_seconds
        self.settings = settings
        self.waiter = waiter
        self.stop = stop
        self.now = now
        self.on_job = on_job
        self._pushed: str | None = None
        self._repo_url: str | None = None
        meta = integration["metadata"]
        self.namespace = str(meta["namespace"])
        self.name = str(meta["name"])
        self.uid = str(meta["uid"])

    @property
    def repo_url(self) -> str:
        """The tasks' repository (where the branch is pushed and the gate pods clone from)."""
        if self._repo_url is None:
            self._repo_url = self.source()
        return self._repo_url

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.stop.is_set():
            coro.close()
            raise IntegrationInterrupted("the operator stopped leading")
        # bounded: a loop that stopped meanwhile must not hold this thread (or the process)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT_SECONDS)

    # ------------------------------------------------------------------ one gate run

    def run(self, request: TreeGateRequest) -> GateResult:
        number = self.first_number + request.number
        digest = tree_digest(request)
        name = gate_job_name(self.name, self.uid, number, digest)
        if len(request.patch) > MAX_PATCH_BYTES:
            raise OrchestratorError(
                f"gate run {number}: the merged diff ({len(request.patch)} bytes) exceeds "
                f"{MAX_PATCH_BYTES} bytes, more than a ConfigMap carries; integrate with a "
                "smaller batch size"
            )
        self._push(request)
        runner = gate_request(request, self.repo_url, self.settings.max_log_bytes)
        self._configmap(name, request.patch, number, runner)
        job = gate_job(
            self.integration,
            name=name,
            number=number,
            digest=digest,
            request=runner,
            image=self.settings.image,
            image_pull_policy=self.settings.image_pull_policy,
            resources=self.resources,
            pending_timeout_seconds=self.pending_timeout_seconds,
            storage=self.settings.storage,
        )
        done = self.waiter.event(self.namespace, name)
        try:
            created = self._call(self.api.create_job(self.namespace, job))
            existing = created.object
            if not created.created and not (
                is_owned_by(existing, self.uid)
                and (existing["metadata"].get("annotations") or {}).get(ANNOTATION_TREE) == digest
            ):
                raise OrchestratorError(
                    f"Job {self.namespace}/{name} exists and is not this gate run's: it is "
                    "never used; delete it to go on"
                )
            self.on_job(name)
            finished = self._wait(name, existing, done)
            return self._verdict(name, number, finished)
        finally:
            self.waiter.forget(self.namespace, name)
            self.on_job(None)

    def _push(self, request: TreeGateRequest) -> None:
        """The good head onto the integration branch of the tasks' repository (fast-forward
        only), so the gate pod can clone it."""
        if self._pushed == request.base_commit:
            return
        repo = IntegrationRepo(Path(request.repository))
        repo.push(self.repo_url, self.branch, request.base_commit)
        self._pushed = request.base_commit

    def _configmap(self, name: str, patch: bytes, number: int, request: RunnerRequest) -> None:
        cm_name = f"{name}-patch"
        body = patch_configmap(self.integration, cm_name, patch, number, request)
        made = self._call(self.api.create_configmap(self.namespace, body))
        if made.created:
            return
        raw = (made.object.get("binaryData") or {}).get("patch") or ""
        if not is_owned_by(made.object, self.uid) or base64.b64decode(raw) != patch:
            raise OrchestratorError(
                f"ConfigMap {self.namespace}/{cm_name} exists and is not this gate run's: it "
                "is never used; delete it to go on"
            )

    def _wait(self, name: str, job: Body, done: threading.Event) -> Body:
        """The finished Job; raises on an infrastructure failure (the Job is deleted)."""
        while True:
            if self.stop.is_set():
                raise IntegrationInterrupted(f"stopped while waiting for gate Job {name}")
            if job_finished(job) is not None:
                return job
            pods = self._call(self.api.job_pods(self.namespace, name))
            created = parse_time(job["metadata"].get("creationTimestamp"))
            verdict = triage(
                pods,
                created_at=created,
                now=self.now(),
                pending_timeout_seconds=self.pending_timeout_seconds,
            )
            if verdict.problem is not None and verdict.started_at is None:
                self._give_up(job, f"gate pod of {name} cannot start: {verdict.problem}")
            done.wait(self.settings.poll_seconds)
            done.clear()
            fresh = self._call(self.api.get_job(self.namespace, name))
            if fresh is None:
                raise InfrastructureError(f"gate Job {name} was deleted before it finished")
            job = fresh

    def _verdict(self, name: str, number: int, job: Body) -> GateResult:
        report = self._call(read_report(self.api, self.namespace, name))
        if report is not None:
            self._save_log(number, report.records)
        if report is None or report.result is None or report.result.gate is None:
            runner = report.runner_error if report is not None else None
            why = (
                (f"the runner failed: {runner}" if runner else None)
                or job_failure_reason(job)
                or "the runner reported no result (pod lost)"
            )
            self._give_up(job, f"gate Job {name}: {why}")
        assert report is not None and report.result is not None and report.result.gate
        return report.result.gate

    def _give_up(self, job: Body, why: str) -> None:
        """Delete the Job (its name is free for the retry) and fail the worker run."""
        meta = job["metadata"]
        self._call(self.api.delete_job(self.namespace, meta["name"], uid=meta.get("uid")))
        raise InfrastructureError(why)

    def _save_log(self, number: int, records: list[dict[str, Any]]) -> None:
        """``logs/integration/<namespace>.<run>.jsonl``: the gate run's records, once."""
        run_id = self.integration["spec"]["runId"]
        path = self.settings.workdir / "logs" / "integration" / f"{self.namespace}.{run_id}.jsonl"
        marker = {"event": "gate_log_saved", "gate_run": number}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("event") == marker["event"] and rec.get("gate_run") == number:
                    return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps({**rec, "gate_run": number}) + "\n")
            fh.write(json.dumps({"ts": self.now().isoformat(), **marker}) + "\n")

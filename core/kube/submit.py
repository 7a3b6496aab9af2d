"""``orchestrator execute --backend kubernetes``: a phase-4 run as TaskExecution resources.

Reads the same state files as the embedded backend (same entry contract), applies one Adapter
per routed adapter and creates one TaskExecution per task (deterministic names, labelled with
the run id, so submitting twice creates nothing new), then follows them until they are
terminal and writes the local outputs from what the cluster reports: the results file, the
ledger (one entry per attempt) and ``logs/execution/<task>.jsonl`` from the pods' logs.

Synchronous on purpose: a CLI, not the operator. It uses the kubernetes client with plain
dicts (no typed models) and polls one LIST per interval.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from core.engine.evidence import local_store
from core.engine.inputs import RoutedTask, RunInputs, load_inputs
from core.engine.monitoring.progress import ProgressReporter
from core.engine.patch_ledger import PatchLedger
from core.engine.state_files import EXECUTION_RESULTS, PATCH_LEDGER, STATE_DIR, write_model
from core.errors import EntryContractError
from core.identity import TaskKey
from core.kube.attempts import gate_result, summary_from_status
from core.kube.kubeconfig import api_client_from
from core.models import AdapterSpec, AttemptResult, ExecutionResults, TaskResult, TaskState
from core.resources import API_VERSION, GROUP, VERSION, TaskExecutionStatus
from core.runner.protocol import parse_pod_log

LABEL_RUN = "orchestrator.dev/run"


def resource_name(run_id: str, task_id: str) -> str:
    name = f"{run_id}-{task_id}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54]}-{digest}"


def adapter_resource(spec: AdapterSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": spec.kind.value,
        "description": spec.description,
        "stdin": spec.stdin,
        "timeoutSeconds": spec.timeout_seconds,
        "env": [{"name": k, "value": v} for k, v in spec.env.items()],
        "gate": [c.model_dump(mode="json") for c in spec.gate],
        "retry": _camel(spec.retry.model_dump(mode="json")),
        "breaker": _camel(spec.breaker.model_dump(mode="json")),
    }
    body["gate"] = [_camel(c) for c in body["gate"]]
    if spec.template is not None:
        body["template"] = spec.template.value
    if spec.command is not None:
        body["command"] = spec.command
    if spec.health_check is not None:
        body["healthCheck"] = _camel(spec.health_check.model_dump(mode="json"))
    if spec.api is not None:
        body["api"] = _camel(spec.api.model_dump(mode="json", exclude_none=True))
    return {
        "apiVersion": API_VERSION,
        "kind": "Adapter",
        "metadata": {"name": spec.id},
        "spec": body,
    }


def task_resource(run_id: str, task: RoutedTask) -> dict[str, Any]:
    spec = task.spec
    body: dict[str, Any] = {
        "runId": run_id,
        "taskId": spec.task_id,
        "source": {"repo": spec.repo, "baseCommit": spec.base_commit},
        "task": {"title": spec.title, "prompt": spec.prompt, "targetPaths": spec.target_paths},
        "adapterRef": {"name": task.decision.adapter_id},
        "fallbackAdapterRefs": [{"name": a} for a in task.decision.fallback_adapter_ids],
        "gate": {
            "baseline": spec.gate_baseline,
            **_camel(spec.gate_policy.model_dump(mode="json")),
        },
        "allowEmptyDiff": spec.allow_empty_diff,
    }
    if spec.patch is not None:
        body["task"]["patch"] = spec.patch
    if spec.timeout_seconds is not None:
        body["timeoutSeconds"] = spec.timeout_seconds
    if spec.gate is not None:
        body["gate"]["checks"] = [_camel(c.model_dump(mode="json")) for c in spec.gate]
    if spec.retry is not None:
        body["retry"] = _camel(spec.retry.model_dump(mode="json"))
    return {
        "apiVersion": API_VERSION,
        "kind": "TaskExecution",
        "metadata": {
            "name": resource_name(run_id, spec.task_id),
            "labels": {LABEL_RUN: run_id, "orchestrator.dev/task": spec.task_id},
        },
        "spec": body,
    }


def _camel(data: dict[str, Any]) -> dict[str, Any]:
    def camel(key: str) -> str:
        head, *rest = key.split("_")
        return head + "".join(p.title() for p in rest)

    return {camel(k): v for k, v in data.items()}


def check_remote_repos(inputs: RunInputs) -> None:
    for i, task in enumerate(inputs.tasks):
        if "://" not in task.spec.repo:
            raise EntryContractError(
                f"{inputs.workdir / STATE_DIR / 'task_queue.json'}: field `tasks.{i}.repo`",
                f"{task.spec.repo!r} is a local path; pods in the cluster cannot clone it",
                "use a URL the cluster can reach (git://, https://) with --backend kubernetes",
            )


class KubernetesSubmitter:
    def __init__(
        self,
        workdir: Path,
        run_id: str,
        namespace: str,
        *,
        kubeconfig: str | None = None,
        progress: ProgressReporter,
        poll_seconds: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.workdir = workdir
        self.run_id = run_id
        self.namespace = namespace
        self.progress = progress
        self.poll_seconds = poll_seconds
        self.sleep = sleep
        self.inputs = load_inputs(workdir, run_id)
        check_remote_repos(self.inputs)
        api_client = api_client_from(kubeconfig)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def submit(self) -> int:
        """Apply Adapters and create TaskExecutions; returns how many were new."""
        for spec in self.inputs.adapters.values():
            body = adapter_resource(spec)
            try:
                self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, "adapters", body
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, "adapters", spec.id, {"spec": body["spec"]}
                )
        created = 0
        for task in self.inputs.tasks:
            try:
                self.custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    "taskexecutions",
                    task_resource(self.run_id, task),
                )
                created += 1
            except ApiException as exc:
                if exc.status != 409:
                    raise
        return created

    def follow(self, timeout: float | None = None) -> ExecutionResults:
        start = time.monotonic()
        reported: set[str] = set()
        self.progress.start(self.run_id, len(self.inputs.tasks), 0)
        try:
            while True:
                items = self._list()
                for item in items:
                    status = TaskExecutionStatus.model_validate(item.get("status") or {})
                    task_id = item["spec"].get("taskId") or item["metadata"]["name"]
                    if status.state.terminal and task_id not in reported:
                        reported.add(task_id)
                        self.progress.task_done(self._task_result(item, status))
                done = len(items) == len(self.inputs.tasks) and all(
                    TaskState((i.get("status") or {}).get("state", "PENDING")).terminal
                    for i in items
                )
                if done or (timeout is not None and time.monotonic() - start > timeout):
                    return self.write_outputs(items)
                self.sleep(self.poll_seconds)
        finally:
            self.progress.stop()

    def _list(self) -> list[dict[str, Any]]:
        out: dict[str, Any] = self.custom.list_namespaced_custom_object(  # type: ignore[assignment]
            GROUP,
            VERSION,
            self.namespace,
            "taskexecutions",
            label_selector=f"{LABEL_RUN}={self.run_id}",
        )
        items: list[dict[str, Any]] = out.get("items", [])
        return items

    def _task_result(self, item: dict[str, Any], status: TaskExecutionStatus) -> TaskResult:
        spec = item["spec"]
        attempts = [
            AttemptResult(
                attempt=a.attempt,
                adapter_id=a.adapter,
                state=a.state,
                failure_class=a.failure_class,
                failure_message=a.message,
                exit_code=a.exit_code,
                timed_out=a.state is TaskState.TIMEOUT,
                started_at=a.started_at or datetime.now(UTC),
                finished_at=a.finished_at or a.started_at or datetime.now(UTC),
                duration_seconds=round(
                    (
                        (a.finished_at or a.started_at or datetime.now(UTC))
                        - (a.started_at or datetime.now(UTC))
                    ).total_seconds(),
                    3,
                ),
                log_path=f"logs/execution/{spec.get('taskId') or item['metadata']['name']}.jsonl",
                diff=summary_from_status(a.diff),
                gate=gate_result(a.gate) if a.gate else None,
                final=i == len(status.attempts) - 1 and status.state.terminal,
            )
            for i, a in enumerate(status.attempts)
            if a.state.terminal
        ]
        duration = None
        if status.started_at and status.finished_at:
            duration = round((status.finished_at - status.started_at).total_seconds(), 3)
        return TaskResult(
            task_id=spec.get("taskId") or item["metadata"]["name"],
            state=status.state,
            adapter_id=spec["adapterRef"]["name"],
            final_adapter_id=status.adapter,
            attempts=attempts,
            failure_class=status.failure_class,
            failure_message="" if status.state is TaskState.COMPLETED else status.message,
            wait_reason=None if status.state.terminal else status.message or None,
            started_at=status.started_at,
            finished_at=status.finished_at,
            duration_seconds=duration,
        )

    def write_outputs(self, items: list[dict[str, Any]]) -> ExecutionResults:
        by_task = {(i["spec"].get("taskId") or i["metadata"]["name"]): i for i in items}
        ledger = PatchLedger(self.workdir / STATE_DIR / PATCH_LEDGER, local_store(self.workdir))
        results = []
        for task in self.inputs.tasks:
            item = by_task.get(task.task_id)
            if item is None:
                results.append(
                    TaskResult(
                        task_id=task.task_id,
                        state=TaskState.PENDING,
                        adapter_id=task.decision.adapter_id,
                        wait_reason="not created",
                    )
                )
                continue
            status = TaskExecutionStatus.model_validate(item.get("status") or {})
            result = self._task_result(item, status)
            results.append(result)
            for attempt, raw in zip(result.attempts, status.attempts, strict=False):
                meta = item["metadata"]
                key = TaskKey(self.run_id, task.task_id, meta["uid"], meta["namespace"])
                if ledger.find(key, attempt.attempt) is None:
                    self._save_logs(
                        task.task_id, attempt.attempt, [raw.job_name, raw.gate_job_name]
                    )
                    ledger.append(
                        key=key,
                        base_commit=task.spec.base_commit,
                        result=attempt,
                        patch=None,
                    )
        summary = {s.value: 0 for s in TaskState}
        for r in results:
            summary[r.state.value] += 1
        summary["total"] = len(results)
        out = ExecutionResults(
            run_id=self.run_id,
            backend="kubernetes",
            generated_at=datetime.now(UTC),
            finished=all(r.state.terminal for r in results),
            summary=summary,
            tasks=results,
        )
        write_model(self.workdir / STATE_DIR / EXECUTION_RESULTS, out)
        return out

    def _save_logs(self, task_id: str, attempt: int, jobs: list[str | None]) -> None:
        path = self.workdir / "logs" / "execution" / f"{task_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            for job in jobs:
                if not job:
                    continue
                pods = self.core.list_namespaced_pod(
                    self.namespace, label_selector=f"job-name={job}"
                )
                for pod in pods.items:
                    if pod.metadata is None or pod.metadata.name is None:
                        continue
                    try:
                        text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace)
                    except ApiException:
                        continue
                    for rec in parse_pod_log(text).records:
                        fh.write(json.dumps({**rec, "task_id": task_id, "attempt": attempt}) + "\n")

"""``orchestrator integrate --backend kubernetes``: a run's Integration resource, from a client.

The integration itself runs in the operator (:mod:`core.kube.integration_controller`); this
applies the run's ``Integration`` (named after the run, so applying twice changes nothing),
follows its status until it settles, and writes the local projection
``.state/integration_results.json`` from it, as ``execute --backend kubernetes`` writes the
results file from the TaskExecutions. Synchronous on purpose (a CLI), plain dicts, one GET
per poll interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from core.engine.integration_results import write_results
from core.engine.integration_worker import default_branch
from core.errors import OrchestratorError
from core.integration_models import IntegrationStats, IntegrationTaskResult
from core.integration_resources import IntegrationStatus
from core.kube.kubeconfig import api_client_from
from core.models import IntegrationOutcome, IntegrationResults
from core.resources import API_VERSION, GROUP, VERSION

PLURAL = "integrations"
SETTLED = ("Succeeded", "Failed")


def integration_resource(
    run_id: str,
    *,
    branch: str | None = None,
    base_commit: str | None = None,
    batch_size: int = 4,
    adaptive: bool = True,
    max_batch_size: int = 32,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "runId": run_id,
        "batch": {"size": batch_size, "adaptive": adaptive, "maxSize": max_batch_size},
    }
    if branch is not None:
        spec["branch"] = branch
    if base_commit is not None:
        spec["baseCommit"] = base_commit
    return {
        "apiVersion": API_VERSION,
        "kind": "Integration",
        "metadata": {"name": run_id, "labels": {"orchestrator.dev/run": run_id}},
        "spec": spec,
    }


def results_of(run_id: str, namespace: str, status: IntegrationStatus) -> IntegrationResults:
    """``integration_results.json`` as the Integration's status tells it (its first tasks)."""
    if status.head_commit is None or status.base_commit is None or status.stats is None:
        raise OrchestratorError(f"Integration {namespace}/{run_id} has no results yet")
    st = status.stats
    tasks = [
        IntegrationTaskResult(
            task_id=t.task_id,
            outcome=IntegrationOutcome(t.outcome),
            commit=t.commit,
            attempt=t.attempt,
            adapter_id=t.adapter,
            task_state=t.task_state,
            reason=t.reason,
        )
        for t in status.tasks
    ]
    return IntegrationResults(
        run_id=run_id,
        repository=status.repository or "",
        local_repository=f"the operator's work dir: integration/{namespace}/{run_id}.git",
        pushed=status.pushed,
        branch=status.branch or default_branch(run_id),
        base_commit=status.base_commit,
        head_commit=status.head_commit,
        generated_at=datetime.now(UTC),
        stats=IntegrationStats(
            merged=st.merged,
            conflict=st.conflict,
            gate_failed=st.gate_failed,
            skipped=st.skipped,
            batches=st.batches,
            gate_runs=st.gate_runs,
            one_by_one_gate_runs=st.one_by_one_gate_runs,
            gate_runs_per_merge=round(st.gate_runs / st.merged, 3) if st.merged else None,
            one_by_one_gate_runs_per_merge=(
                round(st.one_by_one_gate_runs / st.merged, 3) if st.merged else None
            ),
        ),
        tasks=tasks,
    )


class IntegrationSubmitter:
    def __init__(
        self,
        workdir: Path,
        run_id: str,
        namespace: str,
        *,
        kubeconfig: str | None = None,
        poll_seconds: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.workdir = workdir
        self.run_id = run_id
        self.namespace = namespace
        self.poll_seconds = poll_seconds
        self.sleep = sleep
        api_client = api_client_from(kubeconfig)
        self.custom = client.CustomObjectsApi(api_client)

    def submit(self, body: dict[str, Any]) -> bool:
        """Create the Integration; False when it exists (its spec is immutable: kept)."""
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body
            )
        except ApiException as exc:
            if exc.status != 409:
                raise OrchestratorError(f"cannot create the Integration: {exc.reason}") from exc
            return False
        return True

    def status(self) -> IntegrationStatus:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, self.namespace, PLURAL, self.run_id
        )
        return IntegrationStatus.model_validate(obj.get("status") or {})

    def follow(self, timeout: float | None = None) -> IntegrationStatus:
        """Until the Integration settles (Succeeded or Failed) or ``timeout`` passes."""
        start = time.monotonic()
        while True:
            status = self.status()
            if status.state in SETTLED:
                return status
            if timeout is not None and time.monotonic() - start > timeout:
                return status
            self.sleep(self.poll_seconds)

    def write(self, status: IntegrationStatus) -> IntegrationResults:
        results = results_of(self.run_id, self.namespace, status)
        write_results(self.workdir, results)
        return results

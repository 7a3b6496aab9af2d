"""kopf wiring of the orchestrator operator (run as ``kopf run operator/handlers.py``).

Thin on purpose: every handler hands over to ``core.kube.reconciler.Controller`` kept in
kopf's ``memo``. Only low-level ``on.event`` handlers are used, so kopf stores no handler
progress and adds no finalizers: each TaskExecution costs only the writes the controller
makes itself (Jobs, status, Events). Jobs are watched (not Pods) and mapped to their
TaskExecution through the owner reference. Settings: ``ORCHESTRATOR_*`` environment variables
(see core/kube/runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from core.kube.jobs import MANAGED_BY, job_finished
from core.kube.runtime import OperatorSettings, build_controller


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.enabled = False  # Kubernetes Events are posted by the controller only
    settings.watching.server_timeout = 300
    settings.persistence.finalizer = "orchestrator.dev/kopf-finalizer"
    memo.controller = await build_controller(OperatorSettings())
    memo.resync = asyncio.create_task(memo.controller.resync_forever())
    memo.started = time.time()
    logging.getLogger("orchestrator.operator").info("controller ready")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    await memo.controller.api.close()


@kopf.on.event("orchestrator.dev", "v1alpha1", "taskexecutions")
async def task_execution_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    if type == "DELETED":
        await memo.controller.deleted(dict(body))
        return
    await memo.controller.reconcile(body.metadata.namespace, body.metadata.name, dict(body))


@kopf.on.event("orchestrator.dev", "v1alpha1", "adapters")
async def adapter_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.adapter_event(type, dict(body))


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
async def job_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type != "DELETED" and job_finished(dict(body)) is None:
        return  # still running: nothing to do until it finishes (or disappears)
    for owner in body.metadata.get("ownerReferences", []):
        if owner.get("kind") == "TaskExecution":
            await memo.controller.reconcile(body.metadata.namespace, owner["name"])


@kopf.on.probe(id="executor_heartbeat")
def executor_heartbeat(memo: kopf.Memo, **_: Any) -> float:
    return float(memo.controller.metrics.last_heartbeat)


@kopf.on.probe(id="circuit_breaker_status")
def circuit_breaker_status(memo: kopf.Memo, **_: Any) -> dict[str, str]:
    return memo.controller.breaker_states()

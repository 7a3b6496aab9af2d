"""kopf wiring of the orchestrator operator (run as ``kopf run operator/handlers.py``).

Thin on purpose: kopf runs the process (startup, cleanup, health probes, liveness) and
everything else lives in ``core``: :func:`core.kube.runtime.build_control_loop` assembles the
controller and its control loop, kept in kopf's ``memo``. The watches are the control loop's
own informers, not kopf's ``on.event`` handlers: kopf never retries such a handler (an
exception loses the event), sends no server-side label selector and cannot say when its
first listing is complete; and kopf's peering pauses only kopf's own watches, so leader
election is a Lease held by the control loop (the standby does nothing). kopf's cluster
scanning is off: with no resource handlers it has nothing to discover, and scanning would
list and watch every namespace and CRD of the cluster (a ClusterRole the operator does not
need; its API calls are core/kube/permissions.py). Settings: ``ORCHESTRATOR_*`` environment
variables (see core/kube/runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import kopf

from core.errors import UnrecoverableError
from core.kube.client_api import ClientKubeApi
from core.kube.runtime import build_control_loop, build_controller, load_settings, start_evidence

log = logging.getLogger("orchestrator.operator")


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.enabled = False  # Kubernetes Events are posted by the controller only
    settings.scanning.disabled = True  # no cluster-wide list/watch of namespaces and CRDs
    try:
        operator = load_settings()
        api = await ClientKubeApi.connect(operator.kubeconfig)
        try:
            memo.evidence = await start_evidence(operator, api)
        finally:
            await api.close()
        memo.controller = await build_controller(operator, memo.evidence)
    except UnrecoverableError as exc:
        # bad settings, kubeconfig or schema: retrying cannot help; the process exits with the
        # error and the fix (a pod restarts into CrashLoopBackOff showing it)
        raise kopf.PermanentError(str(exc)) from exc
    memo.loop = build_control_loop(operator, memo.controller)
    memo.task = asyncio.create_task(memo.loop.run())
    memo.task.add_done_callback(_loop_ended)
    log.info("controller ready")


def _loop_ended(task: asyncio.Task[None]) -> None:
    """The control loop runs until cleanup cancels it; ending otherwise leaves a process that
    looks alive and does nothing: stop it (SIGTERM: kopf's cleanup) so that it is restarted."""
    if task.cancelled():
        return
    log.critical("the control loop ended; stopping the operator", exc_info=task.exception())
    os.kill(os.getpid(), signal.SIGTERM)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.loop.release()  # a standby takes over at once
    memo.task.cancel()
    await asyncio.gather(memo.task, return_exceptions=True)
    await memo.controller.api.close()
    await memo.evidence.close()


@kopf.on.probe(id="executor_heartbeat")
def executor_heartbeat(memo: kopf.Memo, **_: Any) -> float:
    return float(memo.controller.metrics.last_heartbeat)


@kopf.on.probe(id="leader")
def leader(memo: kopf.Memo, **_: Any) -> bool:
    return bool(memo.loop.leading)


@kopf.on.probe(id="circuit_breaker_status")
def circuit_breaker_status(memo: kopf.Memo, **_: Any) -> dict[str, str]:
    return dict(memo.controller.breaker_states())

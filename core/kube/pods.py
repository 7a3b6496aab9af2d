"""What an attempt's pods say before its Job finishes: started, still coming, or stuck.

Why: a pod that never starts (an image that cannot be pulled, a missing Secret, no node
that fits) would otherwise wait for the Job's whole deadline and then look like an adapter
that ran out of time, feeding the adapter's circuit breaker for a platform problem. Here
those cases end the attempt early as ``infrastructure`` (retried, never counted against the
adapter) with the kubelet's or the scheduler's own words in the message, and the adapter's
budget counts from the moment its container started, not from the Job's creation.

Pure functions over pod bodies (plain dicts as the API server sends them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Waiting reasons that will not clear by themselves: the attempt ends at once. Any other
#: (ErrImagePull after a registry blip, ContainerCreating) ends it once the pending time is up.
FATAL_WAITING = frozenset(
    {"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}
)


@dataclass(frozen=True, slots=True)
class PodTriage:
    """``problem``: end the attempt as infrastructure with this message. ``started_at``: when
    the attempt's container started (None: not yet). ``waiting``: why it has not started."""

    problem: str | None = None
    started_at: datetime | None = None
    waiting: str | None = None


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def container_started(pod: dict[str, Any]) -> datetime | None:
    """When the pod's (first) container started, running or already terminated."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        for phase in ("running", "terminated"):
            started = _time((state.get(phase) or {}).get("startedAt"))
            if started is not None:
                return started
    return None


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        pending = cond.get("type") == "PodScheduled" and cond.get("status") == "False"
        if pending and cond.get("reason") == "Unschedulable":
            return str(cond.get("message") or "no node fits the pod")
    return None


def _waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """The first waiting reason: the init containers' (the runner's fetch of its inputs comes
    first, from the same image) before the main containers'."""
    status_of = pod.get("status") or {}
    statuses = [
        *(status_of.get("initContainerStatuses") or []),
        *(status_of.get("containerStatuses") or []),
    ]
    for status in statuses:
        waiting = (status.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"]), str(waiting.get("message") or "")
    return None


def job_counts_pods(job: dict[str, Any]) -> bool:
    """Whether the Job's status counts any pod of it: active, ready, terminating or finished.

    The Job controller writes these counts when it makes or loses a pod, so a Job whose
    status counts none has no pod to look at yet, or has one whose count is a moment behind;
    that count's write is a Job event, which brings its task back to look. The reconciler
    lists a pending Job's pods only when this says there are some (or the pending time is up):
    a burst of 1,000 new Jobs costs no pod lists before their pods exist.
    """
    status = job.get("status") or {}
    if any(status.get(k) for k in ("active", "ready", "terminating", "succeeded", "failed")):
        return True
    uncounted = status.get("uncountedTerminatedPods") or {}
    return any(uncounted.get(k) for k in ("succeeded", "failed"))


def triage(
    pods: list[dict[str, Any]],
    *,
    created_at: datetime,
    now: datetime,
    pending_timeout_seconds: float,
) -> PodTriage:
    """Judge the newest pod of an attempt's Job created at ``created_at``."""
    if not pods:
        if (now - created_at).total_seconds() > pending_timeout_seconds:
            return PodTriage(
                problem=f"no pod was created within {pending_timeout_seconds:g}s "
                "(quota, admission or the Job controller refused it)"
            )
        return PodTriage(waiting="waiting for the Job's pod to be created")
    pod = max(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    started = container_started(pod)
    if started is not None:
        return PodTriage(started_at=started)
    late = (now - created_at).total_seconds() > pending_timeout_seconds
    waiting = _waiting(pod)
    if waiting is not None:
        reason, message = waiting
        said = f"{reason}: {message}" if message else reason
        if reason in FATAL_WAITING or late:
            return PodTriage(problem=f"the adapter's container could not start: {said}")
        return PodTriage(waiting=said)
    unschedulable = _unschedulable(pod)
    if unschedulable is not None:
        if late:
            return PodTriage(
                problem=f"the pod could not be scheduled within {pending_timeout_seconds:g}s: "
                f"{unschedulable}"
            )
        return PodTriage(waiting=f"Unschedulable: {unschedulable}")
    if late:
        return PodTriage(
            problem=f"the pod did not start within {pending_timeout_seconds:g}s "
            f"(phase {(pod.get('status') or {}).get('phase', 'unknown')})"
        )
    return PodTriage(waiting="the pod is starting")


#: The kubelet's words when it evicts a pod for going over its *own* local-storage limits
#: (pkg/kubelet/eviction/helpers.go: an emptyDir's sizeLimit, the pod's summed
#: ephemeral-storage limit, one container's). A node under disk pressure says "The node was
#: low on resource: ephemeral-storage" instead: that one is the platform's problem.
_OWN_LIMIT_EVICTIONS = (
    re.compile(r"Usage of EmptyDir volume .* exceeds the limit"),
    re.compile(r"Pod ephemeral local storage usage exceeds the total limit of containers"),
    re.compile(r"Container .* exceeded its local ephemeral storage limit"),
)


def storage_eviction(pods: list[dict[str, Any]]) -> str | None:
    """The kubelet's message when a pod of the Job was evicted for exceeding its own disk
    limits (see :class:`core.kube.jobs.RunnerStorage`), else None.

    Why apart from other evictions: what filled the disk is the task's doing (a log flood, a
    build that writes without end). Treated as ``infrastructure`` it would be retried on the
    same adapter, never feed its breaker, and fill the disk again; the caller classifies it
    as the adapter's (or, in a gate, the checks') failure instead. Node-pressure evictions
    and every other pod failure stay infrastructure.
    """
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("reason") != "Evicted":
            continue
        message = str(status.get("message") or "").strip()
        if any(p.search(message) for p in _OWN_LIMIT_EVICTIONS):
            return message
    return None

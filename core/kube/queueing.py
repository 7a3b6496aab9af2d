"""Jobs that wait in a Kueue queue: their shape, and how long they may wait (pure).

Why: with ``spec.queueName`` a TaskExecution's Jobs are admitted by Kueue, which holds them
suspended until their ClusterQueue has quota. That wait is neither the pod failing to start
(:mod:`core.kube.pods` would end the attempt after ``pendingTimeoutSeconds``) nor the
adapter's time (its budget counts from its container's start): a suspended Job waits, with
status reason ``Queued``, for at most ``queueTimeoutSeconds``. Once Kueue resumes it, the Job
controller sets ``status.startTime`` (and resets it on every resume), and the pending clock
counts from there.

The operator speaks to Kueue only through the Job: the queue label and ``spec.suspend`` at
creation (what Kueue's own Job webhook would set), nothing else; it never creates Workloads
or queues. Without ``queueName`` Jobs are created exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: Kueue's label naming the LocalQueue of a Job (``constants.QueueLabel``).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Status reason of a task whose Job waits for admission.
QUEUED_REASON = "Queued"


def queue_name(job: dict[str, Any]) -> str | None:
    """The LocalQueue a Job was created for (None: not queued)."""
    value = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
    return str(value) if value else None


def queued(job: dict[str, Any]) -> bool:
    """A queued Job Kueue has not admitted (yet, or again after an eviction): suspended."""
    return queue_name(job) is not None and bool((job.get("spec") or {}).get("suspend"))


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pending_since(job: dict[str, Any], *, created_at: datetime, now: datetime) -> datetime:
    """Whence the pending timeout of a Job's pod counts.

    A Job without a queue: its creation, as before. An admitted queued Job: its
    ``status.startTime`` (the Job controller sets it when the Job resumes); ``now`` while
    the Job controller has not got to it yet, so the queue's wait is never charged.
    """
    if queue_name(job) is None:
        return created_at
    started = _time((job.get("status") or {}).get("startTime"))
    return started if started is not None else now


def queue_wait_seconds(job: dict[str, Any]) -> float:
    """How long an admitted queued Job waited for its (last) admission: from its creation to
    its ``status.startTime``; 0 for a Job without a queue or not started."""
    if queue_name(job) is None:
        return 0.0
    created = _time((job.get("metadata") or {}).get("creationTimestamp"))
    started = _time((job.get("status") or {}).get("startTime"))
    if created is None or started is None:
        return 0.0
    return max(0.0, (started - created).total_seconds())


@dataclass(frozen=True, slots=True)
class QueueWait:
    """A suspended queued Job: ``problem`` ends the attempt (infrastructure) with this
    message; else it waits, ``message`` says for what, ``recheck_seconds`` until its limit."""

    message: str
    recheck_seconds: float
    problem: str | None = None


def queue_wait(
    job: dict[str, Any], *, role: str, created_at: datetime, now: datetime, timeout_seconds: float
) -> QueueWait:
    """Judge a suspended queued Job (:func:`queued`) created at ``created_at``."""
    name = queue_name(job)
    waited = max(0.0, (now - created_at).total_seconds())
    if waited > timeout_seconds:
        return QueueWait(
            message="",
            recheck_seconds=0.0,
            problem=f"the {role} Job was not admitted by Kueue LocalQueue {name!r} within "
            f"{timeout_seconds:g}s (queueTimeoutSeconds)",
        )
    return QueueWait(
        message=f"{role} Job waits for admission by Kueue LocalQueue {name!r} "
        f"(suspended since {created_at.isoformat(timespec='seconds')}; not charged to the budget)",
        recheck_seconds=timeout_seconds - waited,
    )

"""``status.conditions`` of a TaskExecution, in the ``metav1.Condition`` shape.

Merge patches replace lists whole, so exactly one function computes the conditions from the
state, keeping ``lastTransitionTime`` when a condition's status did not change:

- ``Running``: True while an adapter or gate Job runs; False with reason ``Queued`` while
  the attempt's Job waits for a Kueue queue's admission (:mod:`core.kube.queueing`).
- ``Succeeded``: True when COMPLETED, False when FAILED/TIMEOUT/CANCELLED, Unknown before.
"""

from __future__ import annotations

from datetime import datetime

from core.kube.queueing import QUEUED_REASON
from core.models import FailureClass, TaskState
from core.resources import Condition, TaskExecutionStatus

_REASONS = {
    FailureClass.INFRASTRUCTURE: "Infrastructure",
    FailureClass.ADAPTER_ERROR: "AdapterError",
    FailureClass.ADAPTER_TIMEOUT: "AdapterTimeout",
    FailureClass.EMPTY_DIFF: "EmptyDiff",
    FailureClass.GATE_FAILED: "GateFailed",
    FailureClass.CANCELLED: "Cancelled",
    FailureClass.DIFF_TOO_LARGE: "DiffTooLarge",
}


def reason_for(state: TaskState, failure_class: FailureClass | None) -> str:
    if state is TaskState.COMPLETED:
        return "Completed"
    if failure_class is not None:
        return _REASONS[failure_class]
    return state.value.title().replace("_", "")


def set_conditions(
    status: TaskExecutionStatus, now: datetime, generation: int | None
) -> TaskExecutionStatus:
    running = status.state in (TaskState.IN_PROGRESS, TaskState.VALIDATING)
    running = running and status.reason != QUEUED_REASON
    if status.state is TaskState.COMPLETED:
        succeeded = "True"
    elif status.state.terminal:
        succeeded = "False"
    else:
        succeeded = "Unknown"
    reason = status.reason or "Pending"
    wanted = {
        "Running": ("True" if running else "False", reason),
        "Succeeded": (succeeded, reason),
    }
    old = {c.type: c for c in status.conditions}
    conditions = []
    for ctype, (value, why) in wanted.items():
        prev = old.get(ctype)
        changed = prev is None or prev.status != value
        conditions.append(
            Condition(
                type=ctype,
                status=value,
                observed_generation=generation,
                last_transition_time=now if changed or prev is None else prev.last_transition_time,
                reason=why,
                message=status.message[:1000],
            )
        )
    return status.model_copy(update={"conditions": conditions})

"""The Kubernetes half of an integration send-back: a reopened task's TaskExecution made
PENDING again, so the TaskExecution controller starts its next attempt.

The integration worker decides (:func:`core.engine.lifecycle.reopen`) and records
(:meth:`core.engine.recorder.Recorder.reopen`: the task row PENDING again with its completed
attempt amended -- the verdict, the feedback, the rebase commit -- and TASK_REOPENED, once).
What is left is the projection: the TaskExecution's status, which says COMPLETED and which the
TaskExecution controller no longer looks at. It is written here, from the database record, by
the one status write path (:class:`~core.kube.status_writer.StatusWriter`: a resourceVersion
precondition on a fresh read): state PENDING, ``RetryScheduled`` after the verdict's backoff,
the attempt's failure class ``merge_conflict`` / ``merge_gate_failed``. Its watch event brings
the TaskExecution back to the controller, which asks the lifecycle for the next step: attempt
N+1 on the same adapter, the verdict's feedback in its prompt, from the integration branch's
head (pushed to the task's repository).

Level-triggered and idempotent: it looks at every record of the run that the database says
is sent back and writes only a status that still says the attempt completed, so a crash
between the database and the status (or a replay) is repaired by the Integration's next step
and never counts a retry twice (the recorder's reopen is a no-op for a recorded verdict). A
``TASK_REOPENED`` Event, named for the TaskExecution and the attempt, goes out before the
status (see :mod:`core.kube.status_writer` for why that order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core.db.store import TaskRecord
from core.engine.lifecycle import failure_of
from core.kube.api import KubeApi
from core.kube.attempts import attempt_recorded
from core.kube.status_writer import TE, StatusWriter, event_name
from core.models import TaskState
from core.resources import TaskExecutionStatus


def sent_back(records: Sequence[TaskRecord]) -> list[TaskRecord]:
    """The records whose last attempt the integration sent back and which wait for the next."""
    return [
        r
        for r in records
        if r.status is TaskState.PENDING
        and r.attempt_results
        and r.attempt_results[-1].integration is not None
        and not r.attempt_results[-1].final
    ]


async def reopen_statuses(
    api: KubeApi,
    writer: StatusWriter,
    namespace: str,
    records: Sequence[TaskRecord],
    names: Mapping[str, str],
) -> list[str]:
    """Write PENDING to the TaskExecution of each sent-back record whose status still says its
    attempt completed. ``names``: TaskExecution name by uid. Returns the names written."""
    written: list[str] = []
    for record in sent_back(records):
        name = names.get(record.key.uid)
        if name is None:
            continue  # the TaskExecution is gone: the controller's sweep ends the task
        te = await api.get_object(TE, namespace, name)
        if te is None or te["metadata"].get("uid") != record.key.uid:
            continue
        status = TaskExecutionStatus.model_validate(te.get("status") or {})
        last = record.attempt_results[-1]
        if status.state is not TaskState.COMPLETED or status.attempt != last.attempt:
            continue  # written already (the controller has taken it from there)
        verdict = last.integration
        assert verdict is not None  # sent_back
        projected = last.model_copy(
            update={"failure_class": failure_of(last), "failure_message": verdict.message}
        )
        why = (
            f"sent back by the integration: {verdict.message}; attempt {last.attempt + 1} "
            f"gets the {verdict.outcome.value} summary in its prompt"
        )
        new = attempt_recorded(status, projected, None, why[:1000]).model_copy(
            update={"finished_at": None}
        )
        await api.post_event(
            te,
            "Warning",
            "TASK_REOPENED",
            why[:1000],
            "Integrate",
            name=event_name(te, f"reopened-{last.attempt}"),
        )
        await writer.write(te, new)
        written.append(name)
    return written

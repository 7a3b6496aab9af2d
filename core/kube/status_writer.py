"""The one code path that writes a TaskExecution's status, and the Events that go with it.

Merge patches replace lists whole and the last writer wins, so exactly one place computes
``status.conditions`` (:func:`core.kube.conditions.set_conditions`) and every write carries
the resourceVersion its decision was made on: if the object changed since (a second writer, a
stale cache), the API server refuses with 409, the cache is refreshed, and the caller decides
again instead of overwriting what it did not see.

The Events of a task's start and end go out *before* the status write that reports them, each
under a name of its own (:func:`event_name`): a crash or a failed write after the Event leaves
a status that the next reconcile writes again, and posting the Event again then meets 409 and
adds nothing. The other order lost the Event for good: once the status is terminal nothing
reconciles the task any more.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from core.engine.lifecycle import Finish
from core.errors import ConflictError
from core.kube.api import Body, KubeApi
from core.kube.conditions import set_conditions
from core.kube.watch_cache import WatchCache
from core.models import TaskState
from core.resources import TaskExecutionStatus

TE = "taskexecutions"
#: Status fields a merge patch must clear explicitly when they become unset.
CLEARED = ("notBefore", "gateJobName", "failureClass", "finishedAt")
#: The longest object name the API server accepts (a DNS subdomain).
MAX_NAME = 253


def event_name(te: Body, what: str) -> str:
    """The name of a task's ``what`` Event (``started-<attempt>``, ``finished``): one per
    TaskExecution object (its uid) and fact, a DNS subdomain like every Event name: a long
    TaskExecution name is cut so the whole stays within 253 characters (the uid keeps it unique)."""
    meta = te["metadata"]
    tail = f".{meta['uid']}.{what}"
    head = meta["name"][: MAX_NAME - len(tail)].rstrip("-.")
    return f"{head}{tail}"


class StatusWriter:
    def __init__(self, api: KubeApi, cache: WatchCache, now: Callable[[], datetime]) -> None:
        self.api = api
        self.cache = cache
        self.now = now

    async def write(self, te: Body, status: TaskExecutionStatus) -> None:
        meta = te["metadata"]
        generation = meta.get("generation")
        status = set_conditions(status, self.now(), generation)
        body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["observedGeneration"] = generation
        for name in CLEARED:
            body.setdefault(name, None)
        try:
            updated = await self.api.patch_status(
                TE,
                meta["namespace"],
                meta["name"],
                body,
                resource_version=meta.get("resourceVersion"),
            )
        except ConflictError:
            fresh = await self.api.get_object(TE, meta["namespace"], meta["name"])
            if fresh is not None:
                self.cache.observe_task("MODIFIED", fresh)
            raise
        if updated is None:  # deleted meanwhile: its DELETED event does the rest
            self.cache.forget((meta["namespace"], meta["name"]))
            return
        te["status"] = updated.get("status", body)
        te["metadata"] = {**meta, "resourceVersion": updated["metadata"]["resourceVersion"]}
        self.cache.written(te)

    async def park(self, te: Body, status: TaskExecutionStatus, reason: str, message: str) -> None:
        """Say why the task waits (or what is wrong); no write when nothing changed."""
        if status.reason == reason and status.message == message:
            return
        await self.write(te, status.model_copy(update={"reason": reason, "message": message}))

    async def invalid(self, te: Body, status: TaskExecutionStatus, problems: list[str]) -> None:
        """A spec the operator can never run: FAILED with the fields named, and an Event."""
        if status.state.terminal:
            return
        message = "invalid TaskExecution: " + " ".join(problems)
        new = status.model_copy(
            update={"state": TaskState.FAILED, "reason": "InvalidSpec", "message": message[:1000]}
        )
        name = event_name(te, "finished")
        await self.api.post_event(te, "Warning", "TASK_FAILED", message, "Validate", name=name)
        await self.write(te, new)

    async def started(self, te: Body, attempt: int, message: str) -> None:
        """The Event of an attempt's start (post it before the status that shows the attempt)."""
        name = event_name(te, f"started-{attempt}")
        await self.api.post_event(te, "Normal", "TASK_STARTED", message, "Start", name=name)

    async def finished(self, te: Body, finish: Finish, attempts: int) -> None:
        """The Event of a task's end (post it before the status that shows the end)."""
        ok = finish.succeeded
        message = f"{finish.state.value} after {attempts} attempt(s)"
        if not ok:
            message += f": {finish.failure_class}: {finish.message}"
        await self.api.post_event(
            te,
            "Normal" if ok else "Warning",
            "TASK_COMPLETED" if ok else "TASK_FAILED",
            message,
            "Finish",
            name=event_name(te, "finished"),
        )

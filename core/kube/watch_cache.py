"""The operator's watch cache: what the informers delivered, and the keys it affects.

Kept apart from the reconciler so the mapping from watch events to work-queue keys is one
small, tested thing: a TaskExecution event asks for that TaskExecution, an Adapter event for
the TaskExecutions that use it, a Job event (finished or vanished) for its owner, and a
deletion for the "gone" handling of that uid. Echoes of the operator's own writes (a
resourceVersion already known) ask for nothing. Only unfinished TaskExecutions are kept, and
without the API server's field bookkeeping (``managedFields``).
"""

from __future__ import annotations

from typing import Any

from core.kube.api import Body
from core.kube.jobs import job_finished
from core.models import TaskState

#: Work-queue keys: ("task", namespace, name) or ("gone", namespace, name, run, task, uid).
Key = tuple[str, ...]
Where = tuple[str, str]


def task_key(namespace: str, name: str) -> Key:
    return ("task", namespace, name)


def _where(body: Body) -> Where:
    meta = body["metadata"]
    return str(meta.get("namespace", "")), str(meta["name"])


def _state(body: Body) -> TaskState:
    return TaskState((body.get("status") or {}).get("state", "PENDING"))


def trim(body: Body) -> Body:
    """What the cache keeps of an object: everything but the server's field bookkeeping."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return {**body, "metadata": meta}


def slim_job(job: Body) -> Body:
    """What the reconciler reads of a Job: identity, owners and status."""
    meta = job["metadata"]
    keep = ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp")
    return {
        "apiVersion": job.get("apiVersion", "batch/v1"),
        "kind": "Job",
        "metadata": {k: meta[k] for k in keep if k in meta},
        "status": job.get("status") or {},
    }


def newer(meta: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether ``meta`` is a newer version than ``than`` (resourceVersions are etcd revisions
    in practice; anything unparsable counts as newer)."""
    try:
        return int(meta.get("resourceVersion", 0)) > int(than.get("resourceVersion", 0))
    except ValueError:
        return meta.get("resourceVersion") != than.get("resourceVersion")


class WatchCache:
    def __init__(self) -> None:
        self.tasks: dict[Where, Body] = {}
        self.adapters: dict[Where, Body] = {}
        self.jobs: dict[Where, Body] = {}
        self._users: dict[Where, set[str]] = {}  # Adapter -> TaskExecution names
        #: scopes (a namespace, None for all) whose Adapters were listed: there the cache is
        #: complete, an Adapter it does not hold does not exist (its ADDED event will come)
        self.listed: set[str | None] = set()

    def adapters_listed(self, namespace: str) -> bool:
        return None in self.listed or namespace in self.listed

    def observe_task(self, type_: str, body: Body) -> list[Key]:
        """A TaskExecution watch event: update the cache; the keys to (re)consider."""
        where = _where(body)
        meta = body["metadata"]
        known = self.tasks.get(where)
        if type_ == "DELETED":
            self.tasks.pop(where, None)
            spec = body.get("spec")
            if spec is None or _state(body).terminal:
                return []
            run_id = str(spec.get("runId") or "k8s")
            task_id = str(spec.get("taskId") or meta["name"])
            return [("gone", *where, run_id, task_id, str(meta.get("uid", "")))]
        if _state(body).terminal:
            self.tasks.pop(where, None)
            return []
        same = known is not None and known["metadata"].get("uid") == meta.get("uid")
        if same and known is not None and not newer(meta, known["metadata"]):
            return []  # an echo of our own write, or older: already known
        self.tasks[where] = trim(body)
        spec = body.get("spec") or {}
        for ref in [spec.get("adapterRef") or {}, *(spec.get("fallbackAdapterRefs") or [])]:
            if ref.get("name"):
                self._users.setdefault((where[0], str(ref["name"])), set()).add(where[1])
        return [task_key(*where)]

    def observe_adapter(self, type_: str, body: Body) -> list[Key]:
        """An Adapter watch event: the TaskExecutions that use it look again."""
        where = _where(body)
        if type_ == "DELETED":
            self.adapters.pop(where, None)
        else:
            self.adapters[where] = trim(body)
        users = self._users.get(where, set())
        return [
            task_key(where[0], name) for name in sorted(users) if (where[0], name) in self.tasks
        ]

    def observe_job(self, type_: str, body: Body) -> list[Key]:
        """A Job watch event: its TaskExecution looks again when it finished or vanished."""
        where = _where(body)
        if type_ == "DELETED":
            self.jobs.pop(where, None)
        else:
            self.jobs[where] = slim_job(body)
        if type_ != "DELETED" and job_finished(body) is None:
            return []
        return [
            task_key(where[0], str(ref["name"]))
            for ref in body["metadata"].get("ownerReferences") or []
            if ref.get("kind") == "TaskExecution"
        ]

    def written(self, te: Body) -> None:
        """Our own status write succeeded: keep the new version (its echo then asks nothing)."""
        where = _where(te)
        if _state(te).terminal:
            self.tasks.pop(where, None)
        elif where in self.tasks:
            self.tasks[where] = te

    def unfinished_keys(self) -> list[Key]:
        """Every cached TaskExecution that is not terminal (the resync set)."""
        return [task_key(*where) for where in sorted(self.tasks)]

    def live_uids(self) -> set[str]:
        return {str(te["metadata"].get("uid")) for te in self.tasks.values()}

    def generations(self, namespace: str, names: list[str]) -> tuple[tuple[str, Any], ...]:
        return tuple(
            (n, self.adapters.get((namespace, n), {}).get("metadata", {}).get("generation"))
            for n in names
        )

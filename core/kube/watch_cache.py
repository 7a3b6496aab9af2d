"""The operator's watch cache: what the informers delivered, and the keys it affects.

Kept apart from the reconciler so the mapping from watch events to work-queue keys is one
small, tested thing: a TaskExecution event asks for that TaskExecution, an Adapter event for
the TaskExecutions that use it, a Job event (finished or vanished) for its owner, and a
deletion for the "gone" handling of that uid. Echoes of the operator's own writes (a
resourceVersion already known) ask for nothing.

Memory is what the cache costs at scale (10,000 TaskExecutions present): only unfinished
TaskExecutions are kept, without what the operator never reads (``managedFields``,
annotations such as kubectl's copy of the whole object), each as one compact JSON string
(:class:`Bodies`: a third of the dicts' size; a read decodes a fresh copy, ~30 us) next to
its uid and resourceVersion, so a scan over all of them (resync, sweep) decodes nothing.
Jobs are kept as the few fields the reconciler reads (:func:`slim_job`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from typing import Any, NamedTuple

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


#: Metadata the operator never reads: the server's field bookkeeping, and annotations
#: (``kubectl apply`` keeps a copy of the whole object in one).
UNREAD_METADATA = frozenset({"managedFields", "annotations"})


def trim(body: Body) -> Body:
    """What the cache keeps of an object: everything the operator reads."""
    meta = {k: v for k, v in body["metadata"].items() if k not in UNREAD_METADATA}
    return {**body, "metadata": meta}


class Entry(NamedTuple):
    uid: str
    resource_version: str
    refs: tuple[str, ...]  # the Adapters it names (spec.adapterRef, fallbackAdapterRefs)
    body: bytes  # compact JSON of the trimmed object


def adapter_refs(body: Body) -> tuple[str, ...]:
    spec = body.get("spec") or {}
    refs = [spec.get("adapterRef") or {}, *(spec.get("fallbackAdapterRefs") or [])]
    return tuple(str(r["name"]) for r in refs if isinstance(r, dict) and r.get("name"))


class Bodies(MutableMapping[tuple[str, str], Body]):
    """Objects by (namespace, name), stored as compact JSON; ``get`` decodes a fresh copy
    (change it freely; store it back to keep a change)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}

    def __getitem__(self, where: tuple[str, str]) -> Body:
        body: Body = json.loads(self._entries[where].body)
        return body

    def __setitem__(self, where: tuple[str, str], body: Body) -> None:
        meta = trim(body)["metadata"]
        self._entries[where] = Entry(
            str(meta.get("uid", "")),
            str(meta.get("resourceVersion", "")),
            adapter_refs(body),
            json.dumps({**body, "metadata": meta}, separators=(",", ":")).encode(),
        )

    def __delitem__(self, where: tuple[str, str]) -> None:
        del self._entries[where]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, where: object) -> bool:
        return bool(where in self._entries)

    def entry(self, where: tuple[str, str]) -> Entry | None:
        """uid, resourceVersion and Adapter names without decoding the body."""
        return self._entries.get(where)

    def entries(self) -> Iterator[tuple[tuple[str, str], Entry]]:
        return iter(self._entries.items())


def slim_job(job: Body) -> Body:
    """What the reconciler reads of a Job: identity, owners, whether it is suspended (waiting
    for a queue's admission) and status."""
    meta = job["metadata"]
    keep = ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp")
    slim: Body = {
        "apiVersion": job.get("apiVersion", "batch/v1"),
        "kind": "Job",
        "metadata": {k: meta[k] for k in keep if k in meta},
        "status": job.get("status") or {},
    }
    if "suspend" in (job.get("spec") or {}):
        slim["spec"] = {"suspend": job["spec"]["suspend"]}
    return slim


def newer(meta: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether ``meta`` is a newer version than ``than`` (resourceVersions are etcd revisions
    in practice; anything unparsable counts as newer)."""
    return _newer(meta.get("resourceVersion", 0), than.get("resourceVersion", 0))


def _newer(version: Any, than: Any) -> bool:
    try:
        return int(version) > int(than)
    except ValueError:
        return bool(version != than)


class WatchCache:
    def __init__(self) -> None:
        self.tasks = Bodies()
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
        known = self.tasks.entry(where)
        if type_ == "DELETED" or _state(body).terminal:
            self.forget(where)
            spec = body.get("spec")
            if type_ != "DELETED" or spec is None or _state(body).terminal:
                return []
            run_id = str(spec.get("runId") or "k8s")
            task_id = str(spec.get("taskId") or meta["name"])
            return [("gone", *where, run_id, task_id, str(meta.get("uid", "")))]
        same = known is not None and known.uid == meta.get("uid")
        if same and known is not None and not _newer(meta.get("resourceVersion", 0), known[1]):
            return []  # an echo of our own write, or older: already known
        self.tasks[where] = body
        for name in adapter_refs(body):
            self._users.setdefault((where[0], name), set()).add(where[1])
        return [task_key(*where)]

    def forget(self, where: Where) -> None:
        """Drop a TaskExecution (finished or gone) and its place among its Adapters' users."""
        entry = self.tasks.entry(where)
        if entry is None:
            return
        del self.tasks[where]
        for name in entry.refs:
            users = self._users.get((where[0], name))
            if users is not None:
                users.discard(where[1])
                if not users:
                    del self._users[(where[0], name)]

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
            self.forget(where)
        elif where in self.tasks:
            self.tasks[where] = te

    def unfinished_keys(self) -> list[Key]:
        """Every cached TaskExecution that is not terminal (the resync set)."""
        return [task_key(*where) for where in sorted(self.tasks)]

    def live_uids(self) -> set[str]:
        return {entry.uid for _, entry in self.tasks.entries()}

    def generations(self, namespace: str, names: list[str]) -> tuple[tuple[str, Any], ...]:
        return tuple(
            (n, self.adapters.get((namespace, n), {}).get("metadata", {}).get("generation"))
            for n in names
        )

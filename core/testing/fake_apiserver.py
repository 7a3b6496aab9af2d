"""The in-memory API server behind :class:`core.testing.fake_kube.FakeKubeApi`.

It keeps what the operator can observe of a real API server, and nothing it cannot:

* one resourceVersion counter for every kind (an etcd revision), bumped by every write that
  changes something; a write that changes nothing is not stored and keeps the version;
* ``uid``, ``creationTimestamp`` and ``generation`` assigned on create; ``generation`` bumped
  by spec changes (anything but metadata and status) and when deletion starts, never by a
  status write; a status subresource ignores everything but status, the main resource
  ignores status;
* 409 AlreadyExists, 404 NotFound, 409 Conflict on a stale resourceVersion or uid
  precondition, 422 for invalid names and labels (the API server's wording), 404 for an
  unknown namespace;
* Jobs get the selector and pod-template labels the API server adds (``job-name``,
  ``controller-uid``); pods bound to a node are deleted gracefully (deletionTimestamp until
  their kubelet confirms), others at once; finalizers hold an object in deletion;
* watches: every change is an event carrying the object's new resourceVersion (a DELETED
  event carries the deletion's); a watch from a version replays what came after it, a version
  older than the kept history is 410 Gone; label-selected watches see ADDED/DELETED when an
  object's labels start or stop matching;
* garbage collection by owner reference uid: an object none of whose owners exists any more
  is deleted. ``cascade="immediate"`` (default) collects right after each deletion, in the
  same call; the real collector runs moments later, so a test that needs that window uses
  ``cascade="manual"`` and calls :meth:`FakeApiServer.collect_garbage`;
* custom resources are pruned and defaulted by their structural schema, and a
  ``self == oldSelf`` rule (the TaskExecution's immutable spec) is enforced
  (:mod:`core.testing.crd_schema`).

Not simulated: type, enum and other CEL validation of custom resources; validation and
defaulting of built-in objects beyond names, labels and the 1 MiB of ConfigMaps and Secrets
(Job immutability, pod spec defaults ...); managedFields; field selectors; pagination;
admission (quotas, RBAC); partial owner-reference clean-up; foreground/orphan propagation.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from core.errors import (
    ConflictError,
    ExpiredError,
    NotFoundError,
    RejectedError,
)
from core.kube.api import (
    RESOURCES,
    Body,
    ResourceType,
    WatchEvent,
    WatchType,
    resource_type,
)
from core.testing.crd_schema import Schema, immutable_violations, project_schemas, structural
from core.testing.kube_semantics import (
    Requirement,
    invalid,
    label_problems,
    merge_patch,
    name_problems,
    parse_selector,
    selector_matches,
    size_problems,
    timestamp,
)

Key = tuple[str, str, str]  # plural, namespace, name
_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's SimpleNameGenerator
_IMMUTABLE_META = ("uid", "creationTimestamp", "namespace", "name", "generation")
_TRANSIENT_META = ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion")


def _now() -> datetime:
    return datetime.now(UTC)


def _copy(body: Body) -> Body:
    """A deep copy through JSON: what a client gets is what went over the wire."""
    copied: Body = json.loads(json.dumps(body))
    return copied


@dataclass(frozen=True)
class Change:
    """One stored change: what a watch (and a listener) sees."""

    revision: int
    plural: str
    type: WatchType
    old: Body | None
    new: Body  # for DELETED: the last state, with the deletion's resourceVersion


class FakeApiServer:
    """Objects of several kinds in several namespaces, with a real API server's semantics."""

    def __init__(
        self,
        *,
        namespaces: tuple[str, ...] = ("default",),
        now: Callable[[], datetime] = _now,
        rng: random.Random | None = None,
        history_limit: int = 10_000,
        cascade: Literal["immediate", "manual"] = "immediate",
        schemas: dict[str, Schema] | None = None,
    ) -> None:
        self.namespaces = set(namespaces)
        #: structural schemas of custom resources, by plural (default: the project's CRDs)
        self.schemas = project_schemas() if schemas is None else schemas
        self.now = now
        self.rng = rng or random.Random()
        self.cascade = cascade
        self.history_limit = history_limit
        self.revision = 0
        self._objects: dict[Key, Body] = {}
        self._history: dict[str, deque[Change]] = defaultdict(deque)
        self._compacted: dict[str, int] = defaultdict(int)
        self._watchers: dict[str, set[asyncio.Queue[Change]]] = defaultdict(set)
        #: called synchronously with every change (the fake kubelet listens here)
        self.listeners: list[Callable[[Change], None]] = []
        #: pod logs, served by whoever runs the pod: (namespace, pod) -> reader
        self.pod_logs: dict[tuple[str, str], Callable[[], str]] = {}

    def add_namespace(self, name: str) -> None:
        self.namespaces.add(name)

    # ------------------------------------------------------------------ reads

    def get(self, plural: str, namespace: str, name: str) -> Body:
        rt = resource_type(plural)
        obj = self._objects.get((plural, namespace, name))
        if obj is None:
            raise self._not_found(rt, namespace, name, "get")
        copied: Body = _copy(obj)
        return copied

    def list_objects(
        self, plural: str, namespace: str | None, selector: str | None = None
    ) -> list[Body]:
        resource_type(plural)
        reqs = parse_selector(selector)
        found = [
            obj
            for (p, ns, _), obj in self._objects.items()
            if p == plural and namespace in (None, ns) and selector_matches(reqs, obj)
        ]
        found.sort(key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))
        return [_copy(o) for o in found]

    def read_log(self, namespace: str, pod: str) -> str:
        if ("pods", namespace, pod) not in self._objects:
            raise self._not_found(resource_type("pods"), namespace, pod, "get")
        reader = self.pod_logs.get((namespace, pod))
        if reader is None:
            obj = self._objects[("pods", namespace, pod)]
            container = obj["spec"]["containers"][0]["name"]
            raise RejectedError(
                f'container "{container}" in pod "{pod}" is waiting to start: ContainerCreating',
                status=400,
                reason="BadRequest",
                verb="get",
                resource="pods/log",
                namespace=namespace,
                name=pod,
            )
        return reader()

    # ------------------------------------------------------------------ writes

    def create(self, plural: str, namespace: str, body: Body) -> Body:
        rt = resource_type(plural)
        obj: Body = _copy(body)
        meta = obj.setdefault("metadata", {})
        if namespace not in self.namespaces:
            raise NotFoundError(
                f'namespaces "{namespace}" not found',
                status=404,
                reason="NotFound",
                verb="create",
                resource=plural,
                namespace=namespace,
            )
        if meta.get("namespace") not in (None, namespace):
            raise RejectedError(
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
                status=400,
                reason="BadRequest",
                verb="create",
                resource=plural,
                namespace=namespace,
            )
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            suffix = "".join(self.rng.choice(_GENERATE_CHARS) for _ in range(5))
            name = meta["generateName"] + suffix
        if not name:
            raise invalid(
                rt,
                "",
                ["metadata.name: Required value: name or generateName is required"],
                "create",
            )
        problems = [
            f'metadata.name: Invalid value: "{name}": {p}'
            for p in name_problems(name, 63 if plural == "jobs" else 253)
        ]
        problems += label_problems(meta.get("labels"), "metadata.labels")
        if plural == "jobs":
            template = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
            problems += label_problems(template.get("labels"), "spec.template.labels")
        problems += size_problems(plural, obj)
        if problems:
            raise invalid(rt, name, problems, "create")
        key = (plural, namespace, name)
        if key in self._objects:
            raise ConflictError(
                f'{rt.qualified} "{name}" already exists',
                status=409,
                reason="AlreadyExists",
                verb="create",
                resource=plural,
                namespace=namespace,
                name=name,
            )
        for field in (*_TRANSIENT_META, "managedFields", "selfLink"):
            meta.pop(field, None)
        meta.update(
            name=name,
            namespace=namespace,
            uid=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            creationTimestamp=timestamp(self.now()),
        )
        if rt.generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if rt.status_subresource:
            obj.pop("status", None)
        if plural == "jobs":
            _job_defaults(obj)
        if plural in self.schemas:
            obj = structural(self.schemas[plural], obj)
        return self._commit(key, "ADDED", None, obj)

    def update(
        self, plural: str, namespace: str, name: str, body: Body, *, status: bool = False
    ) -> Body:
        """PUT: replace the object (or only its status); ``metadata.resourceVersion`` in
        ``body``, when set, is a precondition."""
        rt = resource_type(plural)
        old = self._current(rt, namespace, name, "update")
        new: Body = _copy(body)
        self._precondition(rt, old, new.get("metadata") or {}, "update")
        return self._store_update(rt, old, new, status, "update")

    def patch(
        self, plural: str, namespace: str, name: str, patch: Body, *, status: bool = False
    ) -> Body:
        """JSON merge patch; ``metadata.resourceVersion`` in the patch is a precondition."""
        rt = resource_type(plural)
        old = self._current(rt, namespace, name, "patch")
        self._precondition(rt, old, patch.get("metadata") or {}, "patch")
        new = merge_patch(_copy(old), _copy(patch))
        return self._store_update(rt, old, new, status, "patch")

    def delete(
        self, plural: str, namespace: str, name: str, *, uid: str | None = None, force: bool = False
    ) -> Body:
        """Delete (background propagation). Returns the object as the deletion left it: with a
        deletionTimestamp while finalizers or a kubelet still hold it, else the last state.
        ``force``: grace period 0 (how a kubelet confirms a pod has stopped)."""
        rt = resource_type(plural)
        old = self._current(rt, namespace, name, "delete")
        if uid is not None and old["metadata"]["uid"] != uid:
            raise ConflictError(
                f'Operation cannot be fulfilled on {rt.kind} "{name}": the UID in the '
                f"precondition ({uid}) does not match the UID in record "
                f"({old['metadata']['uid']}). The object might have been deleted and then "
                "recreated",
                status=409,
                reason="Conflict",
                verb="delete",
                resource=plural,
                namespace=namespace,
                name=name,
            )
        graceful = plural == "pods" and bool(old["spec"].get("nodeName")) and not force
        if old["metadata"].get("finalizers") or graceful:
            if old["metadata"].get("deletionTimestamp"):
                return _copy(old)  # deletion already under way
            new = _copy(old)
            new["metadata"]["deletionTimestamp"] = timestamp(self.now())
            grace = new["spec"].get("terminationGracePeriodSeconds", 30) if graceful else 0
            new["metadata"]["deletionGracePeriodSeconds"] = grace
            if rt.generation:
                new["metadata"]["generation"] += 1
            return self._commit((plural, namespace, name), "MODIFIED", old, new)
        return self._remove(rt, old)

    def collect_garbage(self) -> int:
        """Delete every object none of whose owners (by uid) exists; returns how many."""
        deleted = 0
        while True:
            uids = {o["metadata"]["uid"] for o in self._objects.values()}
            orphans = [
                o
                for o in self._objects.values()
                if (refs := o["metadata"].get("ownerReferences"))
                and not any(r.get("uid") in uids for r in refs)
                and not o["metadata"].get("deletionTimestamp")
            ]
            if not orphans:
                return deleted
            for obj in orphans:
                meta = obj["metadata"]
                cascade, self.cascade = self.cascade, "manual"
                try:
                    self.delete(_plural_of(obj), meta["namespace"], meta["name"])
                finally:
                    self.cascade = cascade
                deleted += 1

    # ------------------------------------------------------------------ watch

    async def watch(
        self,
        plural: str,
        namespace: str | None,
        *,
        resource_version: str | None = None,
        selector: str | None = None,
        timeout_seconds: float = 60,
    ) -> AsyncIterator[WatchEvent]:
        resource_type(plural)
        reqs = parse_selector(selector)
        if resource_version in (None, "", "0"):
            backlog = [
                WatchEvent("ADDED", _copy(o))
                for o in sorted(
                    (o for o in self._objects_of(plural, namespace) if selector_matches(reqs, o)),
                    key=lambda o: int(o["metadata"]["resourceVersion"]),
                )
            ]
        else:
            since = self._version(resource_version, plural)
            backlog = [
                ev
                for c in self._history[plural]
                if c.revision > since and (ev := _event_for(c, namespace, reqs)) is not None
            ]
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._watchers[plural].add(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        try:
            for replayed in backlog:
                yield replayed
            while (remaining := deadline - loop.time()) > 0:
                try:
                    change = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if (event := _event_for(change, namespace, reqs)) is not None:
                    yield event
        finally:
            self._watchers[plural].discard(queue)

    # ------------------------------------------------------------------ internals

    def _objects_of(self, plural: str, namespace: str | None) -> list[Body]:
        return [
            o for (p, ns, _), o in self._objects.items() if p == plural and namespace in (None, ns)
        ]

    def _version(self, resource_version: str, plural: str) -> int:
        try:
            since = int(resource_version)
        except ValueError:
            raise RejectedError(
                f'invalid resource version "{resource_version}"',
                status=400,
                reason="BadRequest",
                verb="watch",
                resource=plural,
            ) from None
        if since < self._compacted[plural]:
            raise ExpiredError(
                f"too old resource version: {since} ({self._compacted[plural]})",
                status=410,
                reason="Expired",
                verb="watch",
                resource=plural,
            )
        return since

    def _current(self, rt: ResourceType, namespace: str, name: str, verb: str) -> Body:
        obj = self._objects.get((rt.plural, namespace, name))
        if obj is None:
            raise self._not_found(rt, namespace, name, verb)
        return obj

    @staticmethod
    def _not_found(rt: ResourceType, namespace: str, name: str, verb: str) -> NotFoundError:
        return NotFoundError(
            f'{rt.qualified} "{name}" not found',
            status=404,
            reason="NotFound",
            verb=verb,
            resource=rt.plural,
            namespace=namespace,
            name=name,
        )

    @staticmethod
    def _precondition(rt: ResourceType, old: Body, meta: Body, verb: str) -> None:
        wanted = meta.get("resourceVersion")
        uid = meta.get("uid")
        stale = wanted not in (None, "") and wanted != old["metadata"]["resourceVersion"]
        if stale or (uid not in (None, "") and uid != old["metadata"]["uid"]):
            name = old["metadata"]["name"]
            raise ConflictError(
                f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                status=409,
                reason="Conflict",
                verb=verb,
                resource=rt.plural,
                namespace=old["metadata"]["namespace"],
                name=name,
            )

    def _store_update(
        self, rt: ResourceType, old: Body, new: Body, status: bool, verb: str
    ) -> Body:
        if status:
            result: Body = _copy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            if rt.plural in self.schemas:
                result = structural(self.schemas[rt.plural], result)
        else:
            result = new
            meta = result.setdefault("metadata", {})
            for field in (*_IMMUTABLE_META, *_TRANSIENT_META):
                meta.pop(field, None)
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
            result["apiVersion"], result["kind"] = old["apiVersion"], old["kind"]
            if rt.status_subresource:
                result.pop("status", None)
                if "status" in old:
                    result["status"] = _copy(old["status"])
            problems = label_problems(meta.get("labels"), "metadata.labels")
            problems += size_problems(rt.plural, result)
            if rt.plural in self.schemas:
                result = structural(self.schemas[rt.plural], result)
                problems += immutable_violations(self.schemas[rt.plural], old, result)
            if problems:
                raise invalid(rt, meta["name"], problems, verb)
            if rt.generation and _spec_part(result) != _spec_part(old):
                result["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if result == old:
            return _copy(old)  # nothing changed: nothing stored, same resourceVersion
        key = (rt.plural, old["metadata"]["namespace"], old["metadata"]["name"])
        meta = result["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(rt, result)  # the last finalizer is gone
        return self._commit(key, "MODIFIED", old, result)

    def _remove(self, rt: ResourceType, obj: Body) -> Body:
        meta = obj["metadata"]
        key = (rt.plural, meta["namespace"], meta["name"])
        old = self._objects.pop(key)
        if rt.plural == "pods":
            self.pod_logs.pop((meta["namespace"], meta["name"]), None)
        self.revision += 1
        gone: Body = _copy(obj)
        gone["metadata"]["resourceVersion"] = str(self.revision)
        self._record(Change(self.revision, rt.plural, "DELETED", old, gone))
        if self.cascade == "immediate":
            self.collect_garbage()
        return _copy(gone)

    def _commit(self, key: Key, type_: WatchType, old: Body | None, new: Body) -> Body:
        self.revision += 1
        new["metadata"]["resourceVersion"] = str(self.revision)
        self._objects[key] = new
        self._record(Change(self.revision, key[0], type_, old, new))
        copied: Body = _copy(new)
        return copied

    def _record(self, change: Change) -> None:
        history = self._history[change.plural]
        history.append(change)
        while len(history) > self.history_limit:
            self._compacted[change.plural] = history.popleft().revision
        for queue in list(self._watchers[change.plural]):
            queue.put_nowait(change)
        for listener in list(self.listeners):
            listener(change)


def _spec_part(obj: Body) -> Body:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _plural_of(obj: Body) -> str:
    for rt in RESOURCES.values():
        if rt.kind == obj["kind"] and rt.api_version == obj["apiVersion"]:
            return rt.plural
    raise ValueError(f"unknown kind {obj['apiVersion']}/{obj['kind']}")


def _job_defaults(job: Body) -> None:
    """What the API server adds to a Job on create: its selector and the pod labels."""
    uid, name = job["metadata"]["uid"], job["metadata"]["name"]
    spec = job.setdefault("spec", {})
    template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
    if not spec.get("manualSelector"):
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        labels = template_meta.setdefault("labels", {})
        labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": name,
                "controller-uid": uid,
                "job-name": name,
            }
        )


def _event_for(change: Change, namespace: str | None, reqs: list[Requirement]) -> WatchEvent | None:
    """What a watch on ``namespace`` with a label selector sees of ``change``."""
    if namespace is not None and change.new["metadata"]["namespace"] != namespace:
        return None
    now = selector_matches(reqs, change.new)
    old = change.old
    before = old is not None and selector_matches(reqs, old)
    if change.type == "MODIFIED" and old is not None and before != now:
        if now:
            return WatchEvent("ADDED", _copy(change.new))
        gone = _copy(old)
        gone["metadata"]["resourceVersion"] = str(change.revision)
        return WatchEvent("DELETED", gone)
    return WatchEvent(change.type, _copy(change.new)) if now else None

"""The Kubernetes API as the operator uses it: one Protocol, the values it speaks, its rules.

The operator takes a :class:`KubeApi` the way httpx takes a transport. The real one is
:class:`core.kube.client_api.ClientKubeApi` (``kubernetes.aio``, raw JSON), the in-memory one
:class:`core.testing.fake_kube.FakeKubeApi`; ``tests/e2e/test_kube_api_contract.py`` runs the
same assertions against both, so the fake cannot drift from the API server.

Bodies are plain dicts, the JSON the API server sent: the hot path never builds typed models.
The rules every implementation keeps (errors are :mod:`core.errors` types):

* ``get_*`` return None only for a confirmed 404. Every other failure raises:
  :class:`~core.errors.TransientApiError` for 5xx, 429 and no answer (timeout, connection),
  :class:`~core.errors.RejectedError` for other 4xx (422 carries the server's message).
* ``create_*`` never raise on 409 AlreadyExists: the :class:`Created` they return says whether
  this call created the object and holds the object that has the name now, ours or not (check
  :func:`is_owned_by` before adopting it).
* A write with a ``resource_version`` precondition raises :class:`~core.errors.ConflictError`
  when the object changed since; ``patch_*`` return None when the object is gone (404).
* ``delete_*`` return False when the object was already gone, delete in the background
  (dependents follow through the garbage collector) and, given ``uid``, refuse (409) to delete
  another object that took the name since.
* Every HTTP call is reported to the observers (:meth:`KubeApi.add_observer`) as one
  :class:`ApiCall`, so benchmarks and tests count what the API server saw.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from core.errors import (
    ConflictError,
    ExpiredError,
    ForeignObjectError,
    KubeApiError,
    NotFoundError,
    RejectedError,
    TransientApiError,
)
from core.resources import GROUP, VERSION

Body = dict[str, Any]
Observer = Callable[["ApiCall"], None]
#: ``BOOKMARK`` carries only a resourceVersion (the API server's progress, no object change):
#: a watch resumed from it needs no relist after the version it started from is compacted.
WatchType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]

#: Verbs that change state on the server (the ``write`` flag of an :class:`ApiCall`).
WRITE_VERBS = frozenset({"create", "update", "patch", "delete"})

log = logging.getLogger("orchestrator.kube.api")


@dataclass(frozen=True)
class ResourceType:
    """One kind of object the operator touches, and how the API server treats it."""

    plural: str
    group: str  # "" for the core group
    version: str
    kind: str
    #: ``metadata.generation`` is kept (bumped by spec changes, never by status writes)
    generation: bool
    #: status lives in a ``/status`` subresource (the main resource ignores status changes)
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The name the API server uses in messages: ``jobs.batch``, ``pods``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        """The URL path of the collection (no ``name``), an object, or its subresource."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if sub is not None:
                base += f"/{sub}"
        return base


RESOURCES: dict[str, ResourceType] = {
    r.plural: r
    for r in (
        ResourceType("jobs", "batch", "v1", "Job", generation=True, status_subresource=True),
        ResourceType("pods", "", "v1", "Pod", generation=True, status_subresource=True),
        ResourceType("configmaps", "", "v1", "ConfigMap", generation=False),
        ResourceType("secrets", "", "v1", "Secret", generation=False),
        ResourceType("services", "", "v1", "Service", generation=False),
        ResourceType("events", "", "v1", "Event", generation=False),
        ResourceType("leases", "coordination.k8s.io", "v1", "Lease", generation=False),
        ResourceType("networkpolicies", "networking.k8s.io", "v1", "NetworkPolicy", True),
        ResourceType("taskexecutions", GROUP, VERSION, "TaskExecution", True, True),
        ResourceType("adapters", GROUP, VERSION, "Adapter", True, True),
        ResourceType("integrations", GROUP, VERSION, "Integration", True, True),
    )
}
#: The custom resources (``plural`` arguments of the ``*_object`` methods).
CUSTOM_PLURALS = frozenset({"taskexecutions", "adapters", "integrations"})


def resource_type(plural: str) -> ResourceType:
    try:
        return RESOURCES[plural]
    except KeyError:
        raise ValueError(f"unknown resource {plural!r}; known: {sorted(RESOURCES)}") from None


@dataclass(frozen=True)
class Created:
    """What a create did: ``created`` False means 409 AlreadyExists, and ``object`` is then
    the object that already has the name (read back), which may not be ours."""

    created: bool
    object: Body


@dataclass(frozen=True)
class Listing:
    """A list answer: the items and the collection's resourceVersion to watch from."""

    items: list[Body]
    resource_version: str


@dataclass(frozen=True)
class ApiCall:
    """One HTTP call to the API server, as observers see it."""

    verb: str  # create, get, list, watch, patch, update, delete
    resource: str  # plural, with the subresource: "jobs", "pods/log", "taskexecutions/status"
    namespace: str | None
    name: str | None
    status: int | None  # HTTP status; None when no answer came (timeout, connection)
    duration_seconds: float
    write: bool


@dataclass(frozen=True)
class WatchEvent:
    type: WatchType
    object: Body

    @property
    def resource_version(self) -> str:
        return str(self.object["metadata"]["resourceVersion"])


def is_owned_by(obj: Body, owner_uid: str) -> bool:
    """Whether ``obj`` carries an owner reference to the object with ``owner_uid``."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in refs)


def error_for_status(
    status: int | None,
    message: str,
    *,
    reason: str = "",
    verb: str = "",
    resource: str = "",
    namespace: str | None = None,
    name: str | None = None,
) -> KubeApiError:
    """The :mod:`core.errors` type for an error answer (``status`` None: no answer)."""
    cls: type[KubeApiError]
    if status is None or status >= 500 or status == 429:
        cls = TransientApiError
    elif status == 404:
        cls = NotFoundError
    elif status == 409:
        cls = ConflictError
    elif status == 410:
        cls = ExpiredError
    else:
        cls = RejectedError
    return cls(
        message,
        status=status,
        reason=reason,
        verb=verb,
        resource=resource,
        namespace=namespace,
        name=name,
    )


def check_owned(existing: Body, body: Body) -> None:
    """Raise :class:`~core.errors.ForeignObjectError` unless ``existing`` (which holds the name
    ``body`` wants) is owned by one of ``body``'s owners."""
    owners = [r["uid"] for r in body["metadata"].get("ownerReferences") or []]
    if not owners:
        raise ValueError("an object we replace must name its owner (metadata.ownerReferences)")
    if not any(is_owned_by(existing, uid) for uid in owners):
        meta = existing.get("metadata") or {}
        raise ForeignObjectError(
            f"{existing.get('kind', 'object')} {meta.get('namespace')}/{meta.get('name')} "
            f"exists and is not owned by {owners}: left alone",
            existing,
        )


def event_body(
    obj: Body,
    type_: str,
    reason: str,
    message: str,
    action: str,
    now: datetime,
    name: str | None = None,
) -> Body:
    """The ``core/v1`` Event that ``post_event`` creates (the same body in every implementation):
    named ``name`` (posting it again meets 409 and adds nothing), else ``<object name>.<random
    suffix>`` (``generateName``: every post is a new Event)."""
    meta = obj["metadata"]
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    naming = {"name": name} if name else {"generateName": f"{meta['name'][:200]}."}
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {**naming, "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "action": action,
        "reportingComponent": "orchestrator.dev/operator",
        "reportingInstance": "orchestrator-operator",
        "source": {"component": "orchestrator-operator"},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class Observers:
    """The observer list both implementations share; a failing observer never fails a call."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> Callable[[], None]:
        self._observers.append(observer)

        def remove() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return remove

    def notify(self, call: ApiCall) -> None:
        for observer in list(self._observers):
            try:
                observer(call)
            except Exception:
                log.exception("API call observer %r failed", observer)


class KubeApi(Protocol):
    """The API calls of the operator (see the module docstring for the shared rules)."""

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer`` after every HTTP call; returns a function that removes it."""
        ...

    async def close(self) -> None: ...

    # ------------------------------------------------------------------ Jobs and their pods

    async def create_job(self, namespace: str, body: Body) -> Created: ...

    async def get_job(self, namespace: str, name: str) -> Body | None: ...

    async def list_jobs(self, namespace: str, label_selector: str | None = None) -> list[Body]: ...

    async def delete_job(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete a Job and (in the background) its pods."""
        ...

    async def list_pods(self, namespace: str, label_selector: str | None = None) -> list[Body]: ...

    async def job_pods(self, namespace: str, job: str) -> list[Body]:
        """The pods of a Job (label ``job-name``), oldest first."""
        ...

    async def pod_log(
        self, namespace: str, pod: str, *, container: str | None = None
    ) -> str | None:
        """The pod's log; None only when the pod is gone (404). A container that never
        started is a :class:`~core.errors.RejectedError` (400) with the kubelet's reason."""
        ...

    # ------------------------------------------------------------------ ConfigMaps

    async def create_configmap(self, namespace: str, body: Body) -> Created: ...

    async def get_configmap(self, namespace: str, name: str) -> Body | None: ...

    async def delete_configmap(
        self, namespace: str, name: str, *, uid: str | None = None
    ) -> bool: ...

    # ------------------------------------------------------------------ TaskExecutions, Adapters

    async def create_object(self, plural: str, namespace: str, body: Body) -> Created: ...

    async def get_object(self, plural: str, namespace: str, name: str) -> Body | None: ...

    async def list_objects(
        self, plural: str, namespace: str | None, label_selector: str | None = None
    ) -> list[Body]:
        """``namespace`` None: every namespace."""
        ...

    async def patch_object(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: Body,
        *,
        resource_version: str | None = None,
    ) -> Body | None:
        """JSON merge patch of the main resource (spec, metadata: labels, finalizers ...);
        status in ``patch`` is ignored by the API server."""
        ...

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: Body,
        *,
        resource_version: str | None = None,
    ) -> Body | None:
        """JSON merge patch of the ``status`` subresource (``status`` is the new status, not
        a whole object); with ``resource_version``, only if the object is still that version."""
        ...

    async def delete_object(
        self, plural: str, namespace: str, name: str, *, uid: str | None = None
    ) -> bool: ...

    # ------------------------------------------------------------------ the rest

    async def apply_network_policy(self, namespace: str, body: Body) -> Body:
        """Create the policy, or bring the spec of ours up to date; a policy with the name
        that ``body``'s owner does not own raises :class:`~core.errors.ForeignObjectError`."""
        ...

    async def post_event(
        self,
        obj: Body,
        type_: str,
        reason: str,
        message: str,
        action: str,
        *,
        name: str | None = None,
    ) -> bool:
        """A ``core/v1`` Event about ``obj`` (one POST). With a deterministic ``name`` a
        replay posts nothing: False when an Event of that name exists already (409; nothing
        is read back, so no ``get events`` permission is needed)."""
        ...

    async def get_lease(self, namespace: str, name: str) -> Body | None: ...

    async def create_lease(self, namespace: str, body: Body) -> Created: ...

    async def replace_lease(self, namespace: str, body: Body) -> Body:
        """PUT the Lease. ``body.metadata.resourceVersion`` is the precondition (409 when the
        Lease changed since): leader election must always send it, the API server would
        otherwise accept an unconditional update."""
        ...

    async def list_resource(
        self, resource: str, namespace: str | None, *, label_selector: str | None = None
    ) -> Listing:
        """Every object of ``resource`` (any plural of the resource table) and the list's
        resourceVersion: a watch from it sees exactly the changes after this list."""
        ...

    def watch(
        self,
        resource: str,
        namespace: str | None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int = 60,
    ) -> AsyncIterator[WatchEvent]:
        """Changes after ``resource_version``; without one, first an ADDED event per existing
        object. Ends after ``timeout_seconds``; a version the server no longer keeps raises
        :class:`~core.errors.ExpiredError` (410). An object whose labels start (stop) matching
        ``label_selector`` arrives as ADDED (DELETED). Leaving the loop early keeps the stream
        open until the generator is collected: wrap it in ``contextlib.aclosing`` to close it
        at once."""
        ...

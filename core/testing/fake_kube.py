"""An in-memory :class:`~core.kube.api.KubeApi` for tests without a cluster (the pattern of
httpx's ``MockTransport``): the operator's code runs unchanged against it.

Each method makes the same HTTP calls the real client makes (a create that meets 409 reads
the object back, an apply reads then replaces), each against a
:class:`~core.testing.fake_apiserver.FakeApiServer` that keeps the API server's semantics.
Every call yields to the event loop once, as a network round trip would, can be failed or
delayed by a :class:`FaultRule`, and is reported to the observers with the status the API
server would have answered. ``tests/e2e/test_kube_api_contract.py`` runs one set of
assertions against this fake and a real API server.

    api = FakeKubeApi(namespaces=("ns",))
    api.fail("get", "pods/log", status=503)          # the next pod-log read: 503, once
    api.fail("patch", "taskexecutions/status", status=None, after=True)  # applied, no answer
    FakeKubelet(api.server, tmp_path).start()        # Jobs really run (core.testing.fake_kubelet)

Several ``FakeKubeApi`` may share one server (``FakeKubeApi(server)``): two operator replicas,
or a test acting as a user next to the operator, each with its own faults and observers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from core.errors import ConflictError, KubeApiError, NotFoundError
from core.kube.api import (
    WRITE_VERBS,
    ApiCall,
    Body,
    Created,
    Listing,
    Observer,
    Observers,
    WatchEvent,
    check_owned,
    error_for_status,
    event_body,
)
from core.testing.fake_apiserver import FakeApiServer

T = TypeVar("T")
_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class FaultRule:
    """Fail (or delay) the ``nth`` and the following ``times - 1`` matching calls.

    A call matches when each of ``verb``, ``resource`` (with subresource: ``pods/log``),
    ``namespace`` and ``name`` that is set equals the call's. ``status`` None means no answer
    (a timeout). ``after``: the call takes effect on the server, then the answer is lost (the
    ambiguous outcome a client must survive). ``error`` False: only ``delay_seconds``.
    """

    verb: str | None = None
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    nth: int = 1
    times: int | None = 1  # None: every matching call from the nth on
    status: int | None = 503
    message: str = "injected fault"
    after: bool = False
    error: bool = True
    delay_seconds: float = 0.0
    seen: int = 0  # matching calls so far
    fired: int = 0  # calls this rule failed or delayed

    def applies(self, verb: str, resource: str, namespace: str | None, name: str | None) -> bool:
        wanted = (self.verb, self.resource, self.namespace, self.name)
        if any(
            w is not None and w != got
            for w, got in zip(wanted, (verb, resource, namespace, name), strict=True)
        ):
            return False
        self.seen += 1
        last = None if self.times is None else self.nth + self.times
        if self.seen >= self.nth and (last is None or self.seen < last):
            self.fired += 1
            return True
        return False

    def raise_for(self, verb: str, resource: str, namespace: str | None, name: str | None) -> None:
        if not self.error:
            return
        message = self.message if self.status is not None else f"{self.message}: timed out"
        raise error_for_status(
            self.status,
            message,
            reason=_REASONS.get(self.status or 0, ""),
            verb=verb,
            resource=resource,
            namespace=namespace,
            name=name,
        )


class FakeKubeApi:
    """:class:`~core.kube.api.KubeApi` on a :class:`FakeApiServer`."""

    def __init__(
        self,
        server: FakeApiServer | None = None,
        *,
        namespaces: tuple[str, ...] = ("default",),
        now: Callable[[], datetime] = _now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.server = server or FakeApiServer(namespaces=namespaces, now=now)
        self.now = now
        self.faults: list[FaultRule] = []
        self.closed = False
        self._sleep = sleep
        self._observers = Observers()

    # ------------------------------------------------------------------ test controls

    def fail(
        self,
        verb: str | None = None,
        resource: str | None = None,
        *,
        namespace: str | None = None,
        name: str | None = None,
        nth: int = 1,
        times: int | None = 1,
        status: int | None = 503,
        message: str = "injected fault",
        after: bool = False,
    ) -> FaultRule:
        """Fail matching calls with ``status`` (None: a timeout); see :class:`FaultRule`."""
        rule = FaultRule(verb, resource, namespace, name, nth, times, status, message, after)
        self.faults.append(rule)
        return rule

    def delay(
        self,
        verb: str | None = None,
        resource: str | None = None,
        *,
        seconds: float,
        nth: int = 1,
        times: int | None = None,
    ) -> FaultRule:
        """Add ``seconds`` of latency to matching calls (through the injected ``sleep``)."""
        rule = FaultRule(verb, resource, nth=nth, times=times, error=False, delay_seconds=seconds)
        self.faults.append(rule)
        return rule

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        return self._observers.add(observer)

    async def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------------ one "HTTP call"

    def _faults_for(
        self, verb: str, resource: str, namespace: str | None, name: str | None
    ) -> tuple[float, FaultRule | None]:
        """The latency to add and the first failing rule, for one call (every rule counts
        the call, whether or not an earlier one fires)."""
        fired = [r for r in self.faults if r.applies(verb, resource, namespace, name)]
        failing = [r for r in fired if r.error]
        return sum(r.delay_seconds for r in fired), (failing[0] if failing else None)

    async def _call(
        self,
        verb: str,
        resource: str,
        namespace: str | None,
        name: str | None,
        fn: Callable[[], T],
        ok: int = 200,
    ) -> T:
        started = time.perf_counter()
        status: int | None = None
        delay, rule = self._faults_for(verb, resource, namespace, name)
        try:
            if delay:
                await self._sleep(delay)
            else:
                await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
            if rule is not None and not rule.after:
                rule.raise_for(verb, resource, namespace, name)
            result = fn()
            status = ok
            if rule is not None and rule.after:
                rule.raise_for(verb, resource, namespace, name)
            return result
        except KubeApiError as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.perf_counter() - started
            write = verb in WRITE_VERBS
            self._observers.notify(ApiCall(verb, resource, namespace, name, status, elapsed, write))

    async def _create(self, plural: str, namespace: str, body: Body) -> Created:
        name = (body.get("metadata") or {}).get("name")
        for _ in range(3):
            try:
                obj = await self._call(
                    "create",
                    plural,
                    namespace,
                    name,
                    lambda: self.server.create(plural, namespace, body),
                    ok=201,
                )
                return Created(True, obj)
            except ConflictError as exc:
                if name is None:
                    raise
                conflict = exc
            existing = await self._get(plural, namespace, name)
            if existing is not None:
                return Created(False, existing)
        raise conflict

    async def _get(self, plural: str, namespace: str, name: str) -> Body | None:
        try:
            return await self._call(
                "get", plural, namespace, name, lambda: self.server.get(plural, namespace, name)
            )
        except NotFoundError:
            return None

    async def _list(
        self, plural: str, namespace: str | None, label_selector: str | None
    ) -> list[Body]:
        return await self._call(
            "list",
            plural,
            namespace,
            None,
            lambda: self.server.list_objects(plural, namespace, label_selector),
        )

    async def _patch(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: Body,
        *,
        status: bool,
        resource_version: str | None,
    ) -> Body | None:
        if resource_version is not None:
            patch = {
                **patch,
                "metadata": {**(patch.get("metadata") or {}), "resourceVersion": resource_version},
            }
        resource = f"{plural}/status" if status else plural
        try:
            return await self._call(
                "patch",
                resource,
                namespace,
                name,
                lambda: self.server.patch(plural, namespace, name, patch, status=status),
            )
        except NotFoundError:
            return None

    async def _delete(self, plural: str, namespace: str, name: str, uid: str | None) -> bool:
        try:
            await self._call(
                "delete",
                plural,
                namespace,
                name,
                lambda: self.server.delete(plural, namespace, name, uid=uid),
            )
        except NotFoundError:
            return False
        return True

    async def _replace(self, plural: str, namespace: str, body: Body) -> Body:
        name = body["metadata"]["name"]
        return await self._call(
            "update",
            plural,
            namespace,
            name,
            lambda: self.server.update(plural, namespace, name, body),
        )

    # ------------------------------------------------------------------ Jobs and pods

    async def create_job(self, namespace: str, body: Body) -> Created:
        return await self._create("jobs", namespace, body)

    async def get_job(self, namespace: str, name: str) -> Body | None:
        return await self._get("jobs", namespace, name)

    async def list_jobs(self, namespace: str, label_selector: str | None = None) -> list[Body]:
        return await self._list("jobs", namespace, label_selector)

    async def delete_job(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        return await self._delete("jobs", namespace, name, uid)

    async def list_pods(self, namespace: str, label_selector: str | None = None) -> list[Body]:
        return await self._list("pods", namespace, label_selector)

    async def job_pods(self, namespace: str, job: str) -> list[Body]:
        pods = await self.list_pods(namespace, f"job-name={job}")
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))

    async def pod_log(
        self, namespace: str, pod: str, *, container: str | None = None
    ) -> str | None:
        try:
            return await self._call(
                "get", "pods/log", namespace, pod, lambda: self.server.read_log(namespace, pod)
            )
        except NotFoundError:
            return None

    # ------------------------------------------------------------------ ConfigMaps

    async def create_configmap(self, namespace: str, body: Body) -> Created:
        return await self._create("configmaps", namespace, body)

    async def get_configmap(self, namespace: str, name: str) -> Body | None:
        return await self._get("configmaps", namespace, name)

    async def delete_configmap(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        return await self._delete("configmaps", namespace, name, uid)

    # ------------------------------------------------------------------ custom resources

    async def create_object(self, plural: str, namespace: str, body: Body) -> Created:
        return await self._create(plural, namespace, body)

    async def get_object(self, plural: str, namespace: str, name: str) -> Body | None:
        return await self._get(plural, namespace, name)

    async def list_resource(
        self, resource: str, namespace: str | None, *, label_selector: str | None = None
    ) -> Listing:
        def listing() -> Listing:
            items = self.server.list_objects(resource, namespace, label_selector)
            return Listing(items, str(self.server.revision))

        return await self._call("list", resource, namespace, None, listing)

    async def list_objects(
        self, plural: str, namespace: str | None, label_selector: str | None = None
    ) -> list[Body]:
        return await self._list(plural, namespace, label_selector)

    async def patch_object(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: Body,
        *,
        resource_version: str | None = None,
    ) -> Body | None:
        return await self._patch(
            plural, namespace, name, patch, status=False, resource_version=resource_version
        )

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: Body,
        *,
        resource_version: str | None = None,
    ) -> Body | None:
        return await self._patch(
            plural,
            namespace,
            name,
            {"status": status},
            status=True,
            resource_version=resource_version,
        )

    async def delete_object(
        self, plural: str, namespace: str, name: str, *, uid: str | None = None
    ) -> bool:
        return await self._delete(plural, namespace, name, uid)

    # ------------------------------------------------------------------ the rest

    async def apply_network_policy(self, namespace: str, body: Body) -> Body:
        created = await self._create("networkpolicies", namespace, body)
        if created.created:
            return created.object
        existing = created.object
        check_owned(existing, body)
        if existing.get("spec") == body["spec"]:
            return existing
        return await self._replace("networkpolicies", namespace, {**existing, "spec": body["spec"]})

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
        body = event_body(obj, type_, reason, message, action, self.now(), name)
        created = await self._create("events", obj["metadata"]["namespace"], body)
        return created.created

    async def get_lease(self, namespace: str, name: str) -> Body | None:
        return await self._get("leases", namespace, name)

    async def create_lease(self, namespace: str, body: Body) -> Created:
        return await self._create("leases", namespace, body)

    async def replace_lease(self, namespace: str, body: Body) -> Body:
        return await self._replace("leases", namespace, body)

    async def watch(
        self,
        resource: str,
        namespace: str | None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int = 60,
    ) -> AsyncIterator[WatchEvent]:
        started = time.perf_counter()
        status: int | None = None
        delay, rule = self._faults_for("watch", resource, namespace, None)
        try:
            if delay:
                await self._sleep(delay)
            else:
                await asyncio.sleep(0)
            if rule is not None:
                try:
                    rule.raise_for("watch", resource, namespace, None)
                except KubeApiError as exc:
                    status = exc.status
                    raise
            status = 200  # errors inside the stream arrive as ERROR events of a 200 answer
            async for event in self.server.watch(
                resource,
                namespace,
                resource_version=resource_version,
                selector=label_selector,
                timeout_seconds=timeout_seconds,
            ):
                yield event
        finally:
            self._observers.notify(
                ApiCall(
                    "watch", resource, namespace, None, status, time.perf_counter() - started, False
                )
            )


if TYPE_CHECKING:
    from core.kube.api import KubeApi

    _satisfies_protocol: KubeApi = FakeKubeApi()

"""The real :class:`~core.kube.api.KubeApi`: ``kubernetes.aio`` on raw JSON.

The official client's asyncio API means no call blocks the event loop. Its generated
per-resource methods are not used: they validate every body into typed pydantic models
(the ~250 us per object the hot path avoids). Every call goes through the client's public
``param_serialize``/``call_api`` (its auth, TLS and proxy handling) with a path built from
:data:`core.kube.api.RESOURCES`, so one code path maps status codes onto :mod:`core.errors`,
reports every call to the observers, and turns timeouts and connection errors into
:class:`~core.errors.TransientApiError`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
import yaml
from kubernetes.aio import client, config
from kubernetes.aio.config import ConfigException

from core.errors import KubeConfigError
from core.kube.api import (
    RESOURCES,
    WRITE_VERBS,
    ApiCall,
    Body,
    Created,
    Listing,
    Observer,
    Observers,
    ResourceType,
    WatchEvent,
    check_owned,
    error_for_status,
    event_body,
    resource_type,
)

log = logging.getLogger("orchestrator.operator")

MERGE_PATCH = "application/merge-patch+json"
_PROXY_SCHEMES = frozenset({"http", "https", "ws", "wss"})  # those aiohttp's trust_env uses
JSON = "application/json"
DELETE_BACKGROUND = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}


def _now() -> datetime:
    return datetime.now(UTC)


def env_proxy(server: str) -> str | None:
    """The proxy the environment names for ``server`` as aiohttp's ``trust_env`` picks it:
    the variable of the URL's scheme, ``NO_PROXY`` honoured (host names and suffixes, as
    urllib reads it), an ``https://`` proxy ignored with a warning (aiohttp speaks plain HTTP
    to a proxy). Credentials in its URL are sent to the proxy only."""
    parts = urlsplit(server)
    if not parts.hostname or parts.scheme not in _PROXY_SCHEMES or proxy_bypass(parts.hostname):
        return None
    proxy = getproxies().get(parts.scheme)
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"  # host:port, as curl reads it
    if urlsplit(proxy).scheme != "http":
        log.warning("ignoring the %s proxy for %s: only http:// proxies work", parts.scheme, server)
        return None
    return proxy


class ClientKubeApi:
    """:class:`~core.kube.api.KubeApi` over a ``kubernetes.aio`` ApiClient."""

    def __init__(
        self,
        api_client: Any,
        *,
        request_timeout: float = 30.0,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.api_client = api_client
        self.request_timeout = request_timeout
        self.now = now
        self._observers = Observers()

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, **kwargs: Any) -> ClientKubeApi:
        """In a pod (and no kubeconfig named): the service account; else the kubeconfig."""
        in_pod = "KUBERNETES_SERVICE_HOST" in os.environ
        try:
            if in_pod and kubeconfig is None and not os.environ.get("KUBECONFIG"):
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            else:
                await config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError, yaml.YAMLError, ValueError, KeyError, TypeError) as exc:
            # all local: the file, its YAML, its fields (a network auth plugin's error passes)
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            if in_pod and kubeconfig is None and not os.environ.get("KUBECONFIG"):
                where = "the pod's service account"
            raise KubeConfigError(
                f"no usable Kubernetes configuration in {where}: {exc}\n"
                "  fix: set ORCHESTRATOR_KUBECONFIG or KUBECONFIG to a readable kubeconfig whose "
                "current context names the cluster (in a pod: mount the service account token)"
            ) from exc
        configuration = client.Configuration.get_default_copy()
        # aiohttp's trust_env looks for proxy variables and reads ~/.netrc on every request
        # (~4% of the operator's CPU in a burst), and sends a .netrc password it finds for
        # the API server's host: off. The kubeconfig's proxy-url, else the one the
        # environment names, is passed explicitly.
        configuration.client_session_kwargs = {"trust_env": False}
        configuration.proxy = configuration.proxy or env_proxy(configuration.host)
        return cls(client.ApiClient(configuration), **kwargs)

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        return self._observers.add(observer)

    async def close(self) -> None:
        await self.api_client.close()

    # ------------------------------------------------------------------ one HTTP call

    async def _send(
        self,
        method: str,
        verb: str,
        rt: ResourceType,
        namespace: str | None,
        name: str | None = None,
        *,
        sub: str | None = None,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = JSON,
        collection: bool = False,
    ) -> tuple[int, bytes]:
        """One call; ``name`` is reported to observers, and is in the path unless
        ``collection`` (a POST goes to the collection)."""
        resource = f"{rt.plural}/{sub}" if sub else rt.plural
        path = rt.path(namespace, None if collection else name, sub)
        started = time.perf_counter()
        status: int | None = None
        try:
            resp = await self._open(method, path, query, body, content_type)
            try:
                status = int(resp.status)
                raw: bytes = await resp.read()
            finally:
                resp.response.release()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise error_for_status(
                None,
                str(exc) or type(exc).__name__,
                verb=verb,
                resource=resource,
                namespace=namespace,
                name=name,
            ) from exc
        finally:
            self._observers.notify(
                ApiCall(
                    verb,
                    resource,
                    namespace,
                    name,
                    status,
                    time.perf_counter() - started,
                    verb in WRITE_VERBS,
                )
            )
        return status, raw

    async def _open(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None,
        body: Any,
        content_type: str,
        timeout: float | None = None,
    ) -> Any:
        # the body is left out of param_serialize: its sanitize_for_serialization walks every
        # node of a body that is plain JSON already (~80 us for a Job); json.dumps in the
        # client's REST layer encodes it (and refuses anything that is not JSON)
        params = list(
            await self.api_client.param_serialize(
                method=method,
                resource_path=path,
                query_params=query or [],
                header_params={"Accept": JSON, "Content-Type": content_type},
                body=None,
                auth_settings=["BearerToken"],
            )
        )
        params[3] = body  # (method, url, headers, body, post_params)
        return await self.api_client.call_api(
            *params, _request_timeout=timeout or self.request_timeout, _preload_content=False
        )

    @staticmethod
    async def _lines(resp: Any, resource: str) -> AsyncIterator[bytes]:
        """The stream's lines; the connection lost mid-stream (an API server restarting, a
        proxy between) is a transient API error like one lost before the answer, not an
        aiohttp exception that would end a watcher's task."""
        lines = aiter(resp.response.content)
        while True:
            try:
                line = await anext(lines)
            except StopAsyncIteration:
                return
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise error_for_status(
                    None, str(exc) or type(exc).__name__, verb="watch", resource=resource
                ) from exc
            yield line

    @staticmethod
    def _fail(
        status: int, raw: bytes, verb: str, resource: str, namespace: str | None, name: str | None
    ) -> Exception:
        reason, message = "", raw[:1000].decode(errors="replace")
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            reason, message = str(doc.get("reason", "")), str(doc.get("message", message))
        return error_for_status(
            status,
            message,
            reason=reason,
            verb=verb,
            resource=resource,
            namespace=namespace,
            name=name,
        )

    # ------------------------------------------------------------------ generic verbs

    async def _get(self, rt: ResourceType, namespace: str, name: str) -> Body | None:
        status, raw = await self._send("GET", "get", rt, namespace, name)
        if status == 404:
            return None
        if status >= 300:
            raise self._fail(status, raw, "get", rt.plural, namespace, name)
        return _with_kind(json.loads(raw), rt)

    async def _list(
        self, rt: ResourceType, namespace: str | None, label_selector: str | None
    ) -> list[Body]:
        return (await self._listing(rt, namespace, label_selector)).items

    async def _listing(
        self, rt: ResourceType, namespace: str | None, label_selector: str | None
    ) -> Listing:
        query = [("labelSelector", label_selector)] if label_selector else []
        status, raw = await self._send("GET", "list", rt, namespace, query=query)
        if status >= 300:
            raise self._fail(status, raw, "list", rt.plural, namespace, None)
        answer = json.loads(raw)
        items: list[Body] = answer.get("items") or []
        version = str((answer.get("metadata") or {}).get("resourceVersion") or "")
        return Listing([_with_kind(item, rt) for item in items], version)

    async def list_resource(
        self, resource: str, namespace: str | None, *, label_selector: str | None = None
    ) -> Listing:
        return await self._listing(resource_type(resource), namespace, label_selector)

    async def _create(self, rt: ResourceType, namespace: str, body: Body) -> Created:
        name = (body.get("metadata") or {}).get("name")
        for _ in range(3):
            status, raw = await self._send(
                "POST", "create", rt, namespace, name, body=body, collection=True
            )
            if status < 300:
                return Created(True, _with_kind(json.loads(raw), rt))
            if status != 409 or name is None:
                raise self._fail(status, raw, "create", rt.plural, namespace, name)
            existing = await self._get(rt, namespace, name)
            if existing is not None:
                return Created(False, existing)
            # deleted between our POST and GET: try the create again
        raise self._fail(status, raw, "create", rt.plural, namespace, name)

    async def _patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        patch: Body,
        *,
        sub: str | None = None,
        resource_version: str | None = None,
    ) -> Body | None:
        if resource_version is not None:
            meta = {**(patch.get("metadata") or {}), "resourceVersion": resource_version}
            patch = {**patch, "metadata": meta}
        status, raw = await self._send(
            "PATCH", "patch", rt, namespace, name, sub=sub, body=patch, content_type=MERGE_PATCH
        )
        if status == 404:
            return None
        if status >= 300:
            resource = f"{rt.plural}/{sub}" if sub else rt.plural
            raise self._fail(status, raw, "patch", resource, namespace, name)
        return _with_kind(json.loads(raw), rt)

    async def _replace(self, rt: ResourceType, namespace: str, body: Body) -> Body:
        name = body["metadata"]["name"]
        status, raw = await self._send("PUT", "update", rt, namespace, name, body=body)
        if status >= 300:
            raise self._fail(status, raw, "update", rt.plural, namespace, name)
        return _with_kind(json.loads(raw), rt)

    async def _delete(self, rt: ResourceType, namespace: str, name: str, uid: str | None) -> bool:
        options: Body = dict(DELETE_BACKGROUND)
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        status, raw = await self._send("DELETE", "delete", rt, namespace, name, body=options)
        if status == 404:
            return False
        if status >= 300:
            raise self._fail(status, raw, "delete", rt.plural, namespace, name)
        return True

    # ------------------------------------------------------------------ Jobs and pods

    async def create_job(self, namespace: str, body: Body) -> Created:
        return await self._create(RESOURCES["jobs"], namespace, body)

    async def get_job(self, namespace: str, name: str) -> Body | None:
        return await self._get(RESOURCES["jobs"], namespace, name)

    async def list_jobs(self, namespace: str, label_selector: str | None = None) -> list[Body]:
        return await self._list(RESOURCES["jobs"], namespace, label_selector)

    async def delete_job(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        return await self._delete(RESOURCES["jobs"], namespace, name, uid)

    async def list_pods(self, namespace: str, label_selector: str | None = None) -> list[Body]:
        return await self._list(RESOURCES["pods"], namespace, label_selector)

    async def job_pods(self, namespace: str, job: str) -> list[Body]:
        pods = await self.list_pods(namespace, f"job-name={job}")
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))

    async def pod_log(
        self, namespace: str, pod: str, *, container: str | None = None
    ) -> str | None:
        query = [("container", container)] if container else []
        rt = RESOURCES["pods"]
        status, raw = await self._send("GET", "get", rt, namespace, pod, sub="log", query=query)
        if status == 404:
            return None
        if status >= 300:
            raise self._fail(status, raw, "get", "pods/log", namespace, pod)
        return raw.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ ConfigMaps

    async def create_configmap(self, namespace: str, body: Body) -> Created:
        return await self._create(RESOURCES["configmaps"], namespace, body)

    async def get_configmap(self, namespace: str, name: str) -> Body | None:
        return await self._get(RESOURCES["configmaps"], namespace, name)

    async def delete_configmap(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        return await self._delete(RESOURCES["configmaps"], namespace, name, uid)

    # ------------------------------------------------------------------ custom resources

    async def create_object(self, plural: str, namespace: str, body: Body) -> Created:
        return await self._create(resource_type(plural), namespace, body)

    async def get_object(self, plural: str, namespace: str, name: str) -> Body | None:
        return await self._get(resource_type(plural), namespace, name)

    async def list_objects(
        self, plural: str, namespace: str | None, label_selector: str | None = None
    ) -> list[Body]:
        return await self._list(resource_type(plural), namespace, label_selector)

    async def patch_object(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: Body,
        *,
        resource_version: str | None = None,
    ) -> Body | None:
        rt = resource_type(plural)
        return await self._patch(rt, namespace, name, patch, resource_version=resource_version)

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: Body,
        *,
        resource_version: str | None = None,
    ) -> Body | None:
        rt = resource_type(plural)
        return await self._patch(
            rt, namespace, name, {"status": status}, sub="status", resource_version=resource_version
        )

    async def delete_object(
        self, plural: str, namespace: str, name: str, *, uid: str | None = None
    ) -> bool:
        return await self._delete(resource_type(plural), namespace, name, uid)

    # ------------------------------------------------------------------ the rest

    async def apply_network_policy(self, namespace: str, body: Body) -> Body:
        rt = RESOURCES["networkpolicies"]
        created = await self._create(rt, namespace, body)
        if created.created:
            return created.object
        existing = created.object
        check_owned(existing, body)
        if existing.get("spec") == body["spec"]:
            return existing  # already as wanted: no write
        return await self._replace(rt, namespace, {**existing, "spec": body["spec"]})

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
        rt, namespace = RESOURCES["events"], obj["metadata"]["namespace"]
        # not _create: a 409 means the Event is there, nothing to read back (and no
        # ``get events`` permission needed)
        status, raw = await self._send(
            "POST", "create", rt, namespace, name, body=body, collection=True
        )
        if status == 409 and name is not None:
            return False
        if status >= 300:
            raise self._fail(status, raw, "create", rt.plural, namespace, name)
        return True

    async def get_lease(self, namespace: str, name: str) -> Body | None:
        return await self._get(RESOURCES["leases"], namespace, name)

    async def create_lease(self, namespace: str, body: Body) -> Created:
        return await self._create(RESOURCES["leases"], namespace, body)

    async def replace_lease(self, namespace: str, body: Body) -> Body:
        return await self._replace(RESOURCES["leases"], namespace, body)

    async def watch(
        self,
        resource: str,
        namespace: str | None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int = 60,
    ) -> AsyncIterator[WatchEvent]:
        rt = resource_type(resource)
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("timeoutSeconds", timeout_seconds),
            ("allowWatchBookmarks", "true"),
        ]
        if resource_version is not None:
            query.append(("resourceVersion", resource_version))
        if label_selector:
            query.append(("labelSelector", label_selector))
        started = time.perf_counter()
        status: int | None = None
        try:
            try:
                resp = await self._open(
                    "GET", rt.path(namespace), query, None, JSON, timeout=timeout_seconds + 30
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise error_for_status(
                    None, str(exc) or type(exc).__name__, verb="watch", resource=rt.plural
                ) from exc
            status = int(resp.status)
            try:
                if status >= 300:
                    raw = await resp.read()
                    raise self._fail(status, raw, "watch", rt.plural, namespace, None)
                async for line in self._lines(resp, rt.plural):
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        err = event["object"]
                        raise error_for_status(
                            int(err.get("code", 500)),
                            str(err.get("message", "")),
                            reason=str(err.get("reason", "")),
                            verb="watch",
                            resource=rt.plural,
                            namespace=namespace,
                        )
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                        yield WatchEvent(event["type"], _with_kind(event["object"], rt))
            finally:
                resp.response.release()
        finally:
            self._observers.notify(
                ApiCall(
                    "watch",
                    rt.plural,
                    namespace,
                    None,
                    status,
                    time.perf_counter() - started,
                    False,
                )
            )


def _with_kind(obj: Body, rt: ResourceType) -> Body:
    """Items of a list of built-in objects come without apiVersion and kind: add them."""
    obj.setdefault("apiVersion", rt.api_version)
    obj.setdefault("kind", rt.kind)
    return obj


if TYPE_CHECKING:
    from core.kube.api import KubeApi

    _satisfies_protocol: KubeApi = ClientKubeApi(None)

"""The few Kubernetes API calls the operator makes, async and on raw JSON.

Built on ``kubernetes.aio`` (the official client's asyncio API, so no call blocks the event
loop) but with ``*_without_preload_content`` variants: bodies stay plain dicts, which is
both what the reconciler works with and ~20x cheaper than deserialising typed models. Every
create treats 409 AlreadyExists as success (deterministic names make creates idempotent).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from kubernetes.aio import client, config

from core.errors import InfrastructureError
from core.resources import GROUP, VERSION

MERGE_PATCH = "application/merge-patch+json"


class KubeApi:
    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.writes = 0  # API write calls made (benchmarks count them)

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> KubeApi:
        """In a pod (and no kubeconfig named): the service account; else the kubeconfig."""
        in_pod = "KUBERNETES_SERVICE_HOST" in os.environ
        if in_pod and kubeconfig is None and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        return cls(client.ApiClient())

    async def close(self) -> None:
        await self.api_client.close()

    async def _call(self, coro: Any, *, ok_missing: bool = False, write: bool = False) -> Any:
        resp = await coro
        try:
            status, raw = resp.status, await resp.read()
        finally:
            resp.release()
        if write:
            self.writes += 1
        if status == 404 and ok_missing:
            return None
        if status == 409 and write:
            return {"alreadyExists": True}
        if status >= 400:
            raise InfrastructureError(
                f"Kubernetes API {status}: {raw[:500].decode(errors='replace')}"
            )
        return json.loads(raw) if raw else {}

    # ------------------------------------------------------------------ jobs, pods, configmaps

    async def create_job(self, namespace: str, body: dict[str, Any]) -> bool:
        """True if created, False if it already existed."""
        out = await self._call(
            self.batch.create_namespaced_job_without_preload_content(namespace, body),  # type: ignore[arg-type]
            write=True,
        )
        return not out.get("alreadyExists")

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call(
            self.batch.read_namespaced_job_without_preload_content(name, namespace), ok_missing=True
        )
        return result

    async def create_configmap(self, namespace: str, body: dict[str, Any]) -> bool:
        out = await self._call(
            self.core.create_namespaced_config_map_without_preload_content(namespace, body),  # type: ignore[arg-type]
            write=True,
        )
        return not out.get("alreadyExists")

    async def apply_network_policy(self, namespace: str, body: dict[str, Any]) -> None:
        """Create, or replace the spec of, a NetworkPolicy (idempotent)."""
        net = client.NetworkingV1Api(self.api_client)
        out = await self._call(
            net.create_namespaced_network_policy_without_preload_content(namespace, body),  # type: ignore[arg-type]
            write=True,
        )
        if out.get("alreadyExists"):
            await self._call(
                net.patch_namespaced_network_policy_without_preload_content(
                    body["metadata"]["name"],
                    namespace,
                    {"spec": body["spec"]},
                    _content_type=MERGE_PATCH,
                ),
                write=True,
            )

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call(
            self.core.read_namespaced_config_map_without_preload_content(name, namespace),
            ok_missing=True,
        )
        return result

    async def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        out = await self._call(
            self.core.list_namespaced_pod_without_preload_content(
                namespace, label_selector=f"job-name={job}"
            )
        )
        pods: list[dict[str, Any]] = out.get("items", [])
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))

    async def pod_log(self, namespace: str, pod: str) -> str | None:
        resp = await self.core.read_namespaced_pod_log_without_preload_content(pod, namespace)
        try:
            status, raw = resp.status, await resp.read()
        finally:
            resp.release()
        if status >= 400:
            return None
        return raw.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ custom resources

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call(
            self.custom.get_namespaced_custom_object_without_preload_content(
                GROUP, VERSION, namespace, plural, name
            ),
            ok_missing=True,
        )
        return result

    async def list_objects(self, plural: str, namespace: str | None) -> list[dict[str, Any]]:
        if namespace is None:
            call = self.custom.list_cluster_custom_object_without_preload_content(
                GROUP, VERSION, plural
            )
        else:
            call = self.custom.list_namespaced_custom_object_without_preload_content(
                GROUP, VERSION, namespace, plural
            )
        out = await self._call(call)
        items: list[dict[str, Any]] = out.get("items", [])
        return items

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call(
            self.custom.patch_namespaced_custom_object_status_without_preload_content(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
            ),
            ok_missing=True,
            write=True,
        )
        return result

    async def post_event(
        self, obj: dict[str, Any], type_: str, reason: str, message: str, action: str
    ) -> None:
        meta = obj["metadata"]
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
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
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(
            self.core.create_namespaced_event_without_preload_content(meta["namespace"], body),  # type: ignore[arg-type]
            write=True,
        )

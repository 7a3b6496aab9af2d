"""Smoke tests of the cluster itself (issue 3, "What it must show").

They run against the local hack/cluster cluster, or against any cluster in $KUBECONFIG
(then with $ORCHESTRATOR_IMAGE). Real API calls only; every wait is bounded.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

RESTRICTED_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _container(name: str, image: str, pull_policy: str, command: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": command,
        "securityContext": RESTRICTED_SECURITY_CONTEXT,
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        },
    }


def _job(name: str, container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 600,
            **spec,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    # `sleep` as PID 1 ignores SIGTERM; since 1.31 a Job turns Failed only
                    # after its pods are gone, so a 30 s grace period would pad every run.
                    "terminationGracePeriodSeconds": 2,
                    "containers": [container],
                }
            },
        },
    }


def _wait_job_finished(batch: Any, namespace: str, name: str, timeout: float) -> Any:
    """Wait until the Job has a Complete or Failed condition; return the Job."""
    deadline = time.monotonic() + timeout
    while True:
        job = batch.read_namespaced_job_status(name, namespace)
        for cond in job.status.conditions or []:
            if cond.type in ("Complete", "Failed") and cond.status == "True":
                return job
        if time.monotonic() > deadline:
            pytest.fail(f"Job {namespace}/{name} did not finish in {timeout}s: {job.status}")
        time.sleep(1)


def _pod_diagnostics(core: Any, namespace: str) -> str:
    pods = core.list_namespaced_pod(namespace).items
    lines = []
    for pod in pods:
        lines.append(f"{pod.metadata.name}: phase={pod.status.phase}")
        for cs in pod.status.container_statuses or []:
            lines.append(f"  {cs.name}: {cs.state}")
    events = core.list_namespaced_event(namespace).items
    lines += [f"event {e.reason}: {e.message}" for e in events]
    return "\n".join(lines)


def test_one_ready_node(kube_cluster: Any, kube_api: Any) -> None:
    from kubernetes import client

    nodes = client.CoreV1Api(kube_api).list_node().items
    ready = [
        n.metadata.name
        for n in nodes
        if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
    ]
    if kube_cluster.local:
        assert len(nodes) == 1, [n.metadata.name for n in nodes]
        assert len(ready) == 1, f"node not Ready: {nodes[0].status.conditions}"
    else:
        assert ready, "no Ready node in the $KUBECONFIG cluster"
    # And kubectl agrees (the issue's own check).
    out = kube_cluster.kubectl("get", "nodes", "--no-headers").stdout
    assert " Ready " in out, out


def test_job_runs_project_image_and_logs_come_back(
    kube_api: Any,
    kube_namespace: str,
    project_image: str,
    image_pull_policy: str,
    kubectl: Callable[..., Any],
) -> None:
    from kubernetes import client, utils

    marker = f"smoke-{uuid.uuid4().hex[:8]}"
    # The line proves the project itself is installed in the image, not just Python.
    script = f"import core; print('{marker} core', core.__version__, flush=True)"
    job = _job(
        "hello", _container("hello", project_image, image_pull_policy, ["python3", "-c", script])
    )
    utils.create_from_dict(kube_api, job, namespace=kube_namespace)

    batch = client.BatchV1Api(kube_api)
    done = _wait_job_finished(batch, kube_namespace, "hello", timeout=180)
    conds = {c.type: c for c in done.status.conditions}
    assert "Complete" in conds, (
        f"Job failed: {conds}\n{_pod_diagnostics(client.CoreV1Api(kube_api), kube_namespace)}"
    )
    assert done.status.succeeded == 1

    logs = kubectl("logs", "-n", kube_namespace, "job/hello").stdout
    assert logs.startswith(f"{marker} core "), logs


# Runs inside the pod with the pod's own service-account token, through the
# `kubernetes` Service (KUBERNETES_SERVICE_HOST/PORT, injected by the kubelet).
IN_POD_PROBE = r"""
import json, os, ssl, urllib.request, urllib.error
SA = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
token = open(SA + "/token").read().strip()
ns = open(SA + "/namespace").read().strip()
ctx = ssl.create_default_context(cafile=SA + "/ca.crt")
def call(method, path, body=None):
    req = urllib.request.Request(f"https://{host}:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)
out = {"host": host, "port": port, "namespace": ns}
status, review = call("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
out["whoami"] = [status, review.get("status", {}).get("userInfo", {}).get("username")]
out["list_configmaps"] = call("GET", f"/api/v1/namespaces/{ns}/configmaps")[0]
out["list_secrets"] = call("GET", f"/api/v1/namespaces/{ns}/secrets")[0]
out["list_nodes"] = call("GET", "/api/v1/nodes")[0]
out["list_pods_kube_system"] = call("GET", "/api/v1/namespaces/kube-system/pods")[0]
out["create_configmap"] = call("POST", f"/api/v1/namespaces/{ns}/configmaps",
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "forbidden"}})[0]
print("PROBE " + json.dumps(out), flush=True)
"""


def test_pod_reaches_api_server_with_its_own_token_and_rbac_applies(
    kube_api: Any,
    kube_namespace: str,
    project_image: str,
    image_pull_policy: str,
    kubectl: Callable[..., Any],
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    ns = kube_namespace
    core.create_namespaced_service_account(ns, {"metadata": {"name": "smoke-reader"}})
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "smoke-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "configmap-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "smoke-reader", "namespace": ns}],
        },
    )
    container = _container(
        "probe", project_image, image_pull_policy, ["python3", "-c", IN_POD_PROBE]
    )
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "probe"},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": "smoke-reader",
                "automountServiceAccountToken": True,
                "containers": [container],
            },
        },
    )
    deadline = time.monotonic() + 180
    while True:
        pod = core.read_namespaced_pod_status("probe", ns)
        if pod.status.phase in ("Succeeded", "Failed"):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"probe pod did not finish:\n{_pod_diagnostics(core, ns)}")
        time.sleep(1)
    logs = kubectl("logs", "-n", ns, "probe").stdout
    assert pod.status.phase == "Succeeded", f"{logs}\n{_pod_diagnostics(core, ns)}"
    probe_line = [line for line in logs.splitlines() if line.startswith("PROBE ")]
    assert probe_line, logs
    result = json.loads(probe_line[-1][len("PROBE ") :])

    # It went through the `kubernetes` Service.
    svc = core.read_namespaced_service("kubernetes", "default")
    assert result["host"] == svc.spec.cluster_ip
    assert int(result["port"]) == svc.spec.ports[0].port
    # As itself, not as an admin.
    assert result["whoami"] == [201, f"system:serviceaccount:{ns}:smoke-reader"]
    # Allowed what its Role grants, denied the rest.
    assert result["list_configmaps"] == 200
    assert result["list_secrets"] == 403
    assert result["list_nodes"] == 403
    assert result["list_pods_kube_system"] == 403
    assert result["create_configmap"] == 403


def test_active_deadline_ends_job_with_deadline_exceeded(
    kube_api: Any, kube_namespace: str, project_image: str, image_pull_policy: str
) -> None:
    from kubernetes import client, utils

    job = _job(
        "deadline",
        _container("sleeper", project_image, image_pull_policy, ["sleep", "60"]),
        activeDeadlineSeconds=5,
    )
    started = time.monotonic()
    utils.create_from_dict(kube_api, job, namespace=kube_namespace)
    done = _wait_job_finished(client.BatchV1Api(kube_api), kube_namespace, "deadline", timeout=60)
    elapsed = time.monotonic() - started
    failed = [c for c in done.status.conditions if c.type == "Failed" and c.status == "True"]
    assert failed, done.status.conditions
    assert failed[0].reason == "DeadlineExceeded", failed[0]
    # Ended by the deadline (5 s + 2 s grace + controller latency), not by `sleep 60`.
    assert elapsed < 45, elapsed

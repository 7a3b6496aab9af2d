"""The Helm chart on a real cluster: every documented option accepted by the API server
(`kubectl apply --dry-run=server`), then the README's Kubernetes quickstart for real: `helm
install` with the locally built image into a namespace enforcing the Pod Security Standard
`restricted`, the operator pod Ready and holding its Lease, examples/taskexecution.yaml
COMPLETED with its diff summary, `helm test`, and `helm uninstall` leaving nothing the chart
or the operator made but the operator's Lease (documented: Helm does not know it).
The two-replica install (PostgreSQL, leader election) is tests/e2e/test_chart_ha_e2e.py."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.operator_harness import get_json, wait_for
from tests.unit.test_chart import CHART, EXAMPLE, OPTIONS, helm_bin, render

pytestmark = pytest.mark.cluster

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
}
EXAMPLE_GIT_EGRESS = {
    "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "demo-git-server"}}}],
    "ports": [{"port": 9418}],
}


def _restricted(kubectl: Any, namespace: str) -> None:
    kubectl("label", "namespace", namespace, "--overwrite", *(f"{k}={v}" for k, v in RESTRICTED.items()))


def _apply_crds(kubectl: Any) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/taskexecutions.orchestrator.dev",
        "crd/adapters.orchestrator.dev",
    )


def _helm(kubeconfig: str, *args: str, values: dict[str, Any] | None = None, timeout: float = 600):
    cmd = [helm_bin(), "--kubeconfig", kubeconfig, *args]
    if values is not None:
        cmd += ["--values", "-"]
    return subprocess.run(
        cmd,
        input=json.dumps(values or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _in_namespace(values: dict[str, Any], namespace: str) -> dict[str, Any]:
    """An option's values with every namespace it names replaced by the test's."""
    values = copy.deepcopy(values)
    if values.get("watch", {}).get("namespace"):
        values["watch"]["namespace"] = namespace
    if values.get("watch", {}).get("namespaces"):
        values["watch"]["namespaces"] = [namespace]
    if values.get("networkPolicy", {}).get("namespaces"):
        values["networkPolicy"]["namespaces"] = [namespace]
    return values


def test_every_option_is_accepted_by_the_api_server_under_restricted(
    kubectl, kube_namespace
) -> None:
    _restricted(kubectl, kube_namespace)
    _apply_crds(kubectl)
    has_monitors = "servicemonitors" in kubectl("api-resources", "-o", "name").stdout
    for name, option in OPTIONS.items():
        objs = render(_in_namespace(option, kube_namespace), namespace=kube_namespace)
        if not has_monitors:
            objs = [o for o in objs if o["kind"] != "ServiceMonitor"]
        out = kubectl(
            "apply",
            "--dry-run=server",
            "-n",
            kube_namespace,
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}),
            check=False,
        )
        assert out.returncode == 0, f"{name}:\n{out.stderr}"
        assert "PodSecurity" not in out.stderr, f"{name}:\n{out.stderr}"
    # The example too (the quickstart applies it as it is).
    out = kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", str(EXAMPLE), check=False)
    assert out.returncode == 0 and "PodSecurity" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- the real install


@contextlib.contextmanager
def host_volume(kube_cluster, kubectl, name: str, access_mode: str) -> Iterator[tuple[dict[str, Any], Path | None]]:
    """persistence values for the work dir, and the directory behind it when it is on this
    machine: the cluster's default StorageClass, else (local cluster, which has no
    provisioner) a hostPath PersistentVolume made here, else an emptyDir."""
    classes = get_json(kubectl, "storageclass").get("items", [])
    default = [
        c
        for c in classes
        if c["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class")
        == "true"
    ]
    if default:
        yield {"enabled": True, "accessModes": [access_mode]}, None
        return
    if not kube_cluster.local:
        yield {"enabled": False}, None
        return
    path = Path(tempfile.mkdtemp(prefix="orchestrator-e2e-pv-"))
    os.chown(path, 10001, 10001)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"e2e": "orchestrator"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": [access_mode],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": name,
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(pv))
    try:
        yield {"enabled": True, "storageClass": name, "accessModes": [access_mode]}, path
    finally:
        kubectl("delete", "pv", name, "--wait=false", check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def work_volume(kube_cluster, kubectl, kube_namespace) -> Iterator[dict[str, Any]]:
    with host_volume(kube_cluster, kubectl, f"orch-e2e-{kube_namespace}", "ReadWriteOnce") as (
        values,
        _,
    ):
        yield values


def apply_example(
    kubectl: Any, ns: str, project_image: str, pull_policy: str, *, name: str | None = None
) -> dict[str, Any]:
    """The quickstart's example, with the local image and (no cluster DNS here) the git
    server's Service IP instead of its name; ``name``: one more TaskExecution of the same task
    (the git server is there already). Returns the TaskExecution as applied."""
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    te = next(d for d in docs if d["kind"] == "TaskExecution")
    if name is None:
        for doc in docs:
            if doc["kind"] == "Pod":
                for c in doc["spec"]["containers"]:
                    c["image"], c["imagePullPolicy"] = project_image, pull_policy
        rest = [d for d in docs if d is not te]
        kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rest}))
        kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/demo-git-server", "--timeout=120s", timeout=150)
    else:
        te["metadata"]["name"] = name
    ip = get_json(kubectl, "service", "demo-git-server", "-n", ns)["spec"]["clusterIP"]
    te["spec"]["source"]["repo"] = te["spec"]["source"]["repo"].replace("demo-git-server", ip)
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(te))
    return te


def wait_finished(kubectl: Any, ns: str, name: str, debug: Callable[[], str]) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = get_json(kubectl, "taskexecution", name, "-n", ns).get("status", {})
        return status if status.get("state") in ("COMPLETED", "FAILED", "TIMEOUT") else None

    status: dict[str, Any] = wait_for(done, 300, f"TaskExecution {name} to finish", debug)
    return status


def lease_of(kubectl: Any, ns: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = get_json(kubectl, "lease", name, "-n", ns).get("spec") or {}
    return spec


#: What the operator's log says when the API server refused it something (kopf's warnings
#: included); RBAC is checked for real in test_chart_rbac_e2e.py.
FORBIDDEN = re.compile(r"(?i)\bforbidden\b|\b403\b|not enough permissions")


def test_helm_install_runs_the_quickstart_under_restricted_and_uninstalls_cleanly(
    kube_cluster, kubectl, kube_namespace, project_image, image_pull_policy, work_volume
) -> None:
    ns = kube_namespace
    release = f"orch-{uuid.uuid4().hex[:6]}"
    kubeconfig = kube_cluster.kubeconfig
    timings: dict[str, float] = {}
    _restricted(kubectl, ns)
    repository, tag = project_image.rsplit(":", 1)
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": image_pull_policy},
        "persistence": work_volume,
        "networkPolicy": {"extraEgress": [EXAMPLE_GIT_EGRESS]},
    }
    fullname = f"{release}-orchestrator"

    def operator_log() -> str:
        return kubectl(
            "logs", "-n", ns, f"deployment/{fullname}", "--tail=200", check=False
        ).stdout

    def debug() -> str:
        te = get_json(kubectl, "taskexecution", "demo-add-multiply", "-n", ns)
        pods = kubectl("get", "pods,jobs,events", "-n", ns, check=False).stdout
        return f"{pods}\nstatus: {json.dumps(te.get('status'), indent=1)}\n{operator_log()}"

    installed = False
    try:
        started = time.monotonic()
        out = _helm(
            kubeconfig, "install", release, str(CHART), "-n", ns, "--wait", "--timeout", "5m",
            values=values,
        )  # fmt: skip
        timings["helm install --wait"] = time.monotonic() - started
        assert out.returncode == 0, f"{out.stderr}\n{debug()}"
        installed = True
        assert "examples/taskexecution.yaml" in out.stdout  # NOTES.txt
        kubectl(
            "wait", "-n", ns, "--for=condition=Ready", "pod",
            "-l", f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator",
            "--timeout=120s", timeout=150,
        )  # fmt: skip
        timings["operator Ready"] = time.monotonic() - started
        adapters = get_json(kubectl, "adapters", "-n", ns)["items"]
        assert {a["metadata"]["name"] for a in adapters} == {"patch", "script"}
        # Leader election with one replica: it holds the chart's Lease, under its pod name,
        # in the release namespace.
        (pod,) = get_json(kubectl, "pods", "-n", ns, "-l",
                          f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator")["items"]  # fmt: skip
        operator_pod = pod["metadata"]["name"]
        wait_for(lambda: lease_of(kubectl, ns, fullname).get("holderIdentity") == operator_pod,
                 60, "the operator to hold its Lease", debug)  # fmt: skip

        started = time.monotonic()
        apply_example(kubectl, ns, project_image, image_pull_policy)
        status = wait_finished(kubectl, ns, "demo-add-multiply", debug)
        timings["example TaskExecution COMPLETED"] = time.monotonic() - started
        assert status["state"] == "COMPLETED", debug()
        diff = status["diff"]
        assert diff["filesChanged"] == 2 and diff["insertions"] > 0 and not diff["empty"], diff
        assert status["gate"]["passed"] is True, status["gate"]

        # Pod security: every pod of the run (operator, adapter, gate, git server) was admitted
        # by a namespace enforcing `restricted`, and that namespace does refuse a pod that is not.
        pods = get_json(kubectl, "pods", "-n", ns)["items"]
        roles = {p["metadata"].get("labels", {}).get("orchestrator.dev/role") for p in pods}
        assert {"adapter", "gate"} <= roles, roles
        assert any(
            p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "operator"
            for p in pods
        )
        ns_labels = get_json(kubectl, "namespace", ns)["metadata"]["labels"]
        assert ns_labels["pod-security.kubernetes.io/enforce"] == "restricted"
        bad_pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "not-restricted"},
            "spec": {"containers": [{"name": "c", "image": project_image}]},
        }
        refused = kubectl(
            "apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(bad_pod), check=False
        )
        assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr
        events = kubectl("get", "events", "-n", ns, "-o", "json", check=False).stdout
        assert "violates PodSecurity" not in events

        # RBAC: the operator never hit a 403 (least privilege is also enough privilege), kopf
        # included, which has no cluster-wide permission at all.
        log = kubectl("logs", "-n", ns, f"deployment/{fullname}", check=False).stdout
        assert not FORBIDDEN.search(log), log[-4000:]
        assert lease_of(kubectl, ns, fullname)["holderIdentity"] == operator_pod

        started = time.monotonic()
        # (no --logs: the pod is deleted once it succeeded, so nothing is left behind)
        out = _helm(kubeconfig, "test", release, "-n", ns, "--timeout", "3m")
        timings["helm test"] = time.monotonic() - started
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{debug()}"
        assert re.search(r"Phase:\s+Succeeded", out.stdout), out.stdout

        started = time.monotonic()
        out = _helm(kubeconfig, "uninstall", release, "-n", ns, "--wait", "--timeout", "3m")
        timings["helm uninstall --wait"] = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        installed = False

        # Nothing of the release is left, namespaced or cluster-wide; CRDs stay (Helm never
        # deletes them), and so does the user's TaskExecution, which has no finalizer that
        # would now block its deletion. The operator's Lease stays too (the operator made it,
        # Helm does not know it; README): it expires, a reinstall takes it over.
        left = kubectl(
            "get",
            "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,"
            "persistentvolumeclaims,networkpolicies,configmaps,jobs,adapters,leases",
            "-n", ns, "-l", f"app.kubernetes.io/instance={release}", "-o", "name",
        ).stdout.split()  # fmt: skip
        cluster_left = kubectl(
            "get", "clusterroles,clusterrolebindings", "-l",
            f"app.kubernetes.io/instance={release}", "-o", "name",
        ).stdout.split()  # fmt: skip
        assert left == [] and cluster_left == [], (left, cluster_left)
        leases = get_json(kubectl, "leases", "-n", ns)["items"]
        assert [lease["metadata"]["name"] for lease in leases] == [fullname]
        kubectl("delete", "lease", fullname, "-n", ns)
        assert kubectl("get", "crd", "taskexecutions.orchestrator.dev", check=False).returncode == 0
        te_obj = get_json(kubectl, "taskexecution", "demo-add-multiply", "-n", ns)
        assert te_obj["metadata"].get("finalizers") in (None, [])
        kubectl("delete", "-n", ns, "-f", str(EXAMPLE), "--wait=true", "--timeout=60s", timeout=90)

        def operator_made() -> list[str]:
            return kubectl(
                "get", "jobs,pods,configmaps", "-n", ns,
                "-l", "app.kubernetes.io/managed-by=orchestrator", "-o", "name",
            ).stdout.split()  # fmt: skip

        started = time.monotonic()
        wait_for(lambda: operator_made() == [], 120, "garbage collection", lambda: str(operator_made()))
        timings["GC of Jobs/Pods/ConfigMaps"] = time.monotonic() - started
        print("\nchart e2e timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    finally:
        if installed:
            _helm(kubeconfig, "uninstall", release, "-n", ns, "--wait", "--timeout", "2m")

"""Fixtures for tests that need a real Kubernetes cluster (marker: ``cluster``).

Which cluster:
  * ``$KUBECONFIG`` set  -> that cluster (kind, k3d, a cloud cluster) is used as it is.
    The image under test comes from ``$ORCHESTRATOR_IMAGE`` (it must be pullable or
    already loaded there; ``$ORCHESTRATOR_IMAGE_PULL_POLICY`` defaults to IfNotPresent).
  * otherwise            -> the local single-node cluster of ``hack/cluster`` is brought
    up (root needed; binaries/images are built on first use, see hack/cluster/README.md)
    and the project image built from the current source is used (pull policy Never).
    At session end it is brought down again if this session started it, unless
    ``ORCHESTRATOR_KEEP_CLUSTER=1``. A ``$KUBECONFIG`` that is the local cluster's own
    kubeconfig counts as the local cluster (never torn down by the session).

Fixtures: ``kube_cluster`` (everything below in one object), ``kubeconfig`` (path),
``project_image`` (image reference), ``image_pull_policy``, ``kubectl`` (run kubectl
against the cluster), ``kube_api`` (a kubernetes.client.ApiClient),
``kube_namespace`` (a fresh namespace per test, deleted afterwards) and
``cluster_postgres_url`` (a PostgreSQL that the cluster's pods and the tests both reach).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / "hack" / "cluster"
UP_TIMEOUT_S = int(os.environ.get("ORCHESTRATOR_CLUSTER_UP_TIMEOUT", "1500"))


@dataclass(frozen=True)
class KubeCluster:
    kubeconfig: str
    local: bool  # True: hack/cluster's cluster; False: whatever $KUBECONFIG points at
    kubectl_bin: str | None
    project_image: str | None
    project_image_error: str | None
    image_pull_policy: str

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        if not self.kubectl_bin:
            pytest.fail(
                "kubectl not found: put it on PATH (or use the local cluster, which has one)"
            )
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
    return values


def _cluster_script(
    name: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLUSTER_DIR / name), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    local_paths = _local_paths()
    env_kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    # $KUBECONFIG naming the local cluster's own kubeconfig (after `export
    # KUBECONFIG=$(hack/cluster/kubeconfig)`) still means the local cluster: its images and
    # kubectl, refreshed by an idempotent `up`, and never torn down by the session.
    is_local_kubeconfig = bool(env_kubeconfig) and (
        local_paths.get("KUBECONFIG_PATH") is not None
        and os.path.realpath(env_kubeconfig) == os.path.realpath(local_paths["KUBECONFIG_PATH"])
    )
    if env_kubeconfig and not is_local_kubeconfig:
        image = os.environ.get("ORCHESTRATOR_IMAGE") or None
        yield KubeCluster(
            kubeconfig=env_kubeconfig,
            local=False,
            kubectl_bin=shutil.which("kubectl"),
            project_image=image,
            project_image_error=None
            if image
            else "ORCHESTRATOR_IMAGE is not set: with $KUBECONFIG, name the project image "
            "the cluster can run (e.g. one loaded with `kind load docker-image`)",
            image_pull_policy=os.environ.get("ORCHESTRATOR_IMAGE_PULL_POLICY", "IfNotPresent"),
        )
        return

    if os.geteuid() != 0:
        pytest.fail(
            "the local cluster (hack/cluster/up) needs root; run as root or set $KUBECONFIG "
            "to an existing cluster"
        )
    was_running = is_local_kubeconfig or _cluster_script("status").returncode == 0
    started = time.monotonic()
    up = _cluster_script("up", timeout=UP_TIMEOUT_S)
    if up.returncode != 0:
        pytest.fail(f"hack/cluster/up failed ({up.returncode}):\n{up.stderr[-6000:]}")
    kubeconfig = up.stdout.strip().splitlines()[-1]
    print(f"\nlocal cluster ready in {time.monotonic() - started:.0f}s: KUBECONFIG={kubeconfig}")

    images = _read_env_file(Path(kubeconfig).parent.parent / "images.env")
    bin_kubectl = Path(local_paths.get("BIN_DIR", "/nonexistent"), "kubectl")
    override = os.environ.get("ORCHESTRATOR_IMAGE")
    cluster = KubeCluster(
        kubeconfig=kubeconfig,
        local=True,
        kubectl_bin=str(bin_kubectl) if bin_kubectl.exists() else shutil.which("kubectl"),
        project_image=override or images.get("PROJECT_IMAGE") or None,
        project_image_error=None if override else images.get("PROJECT_IMAGE_ERROR") or None,
        image_pull_policy=os.environ.get("ORCHESTRATOR_IMAGE_PULL_POLICY", "Never"),
    )
    try:
        yield cluster
    finally:
        keep = os.environ.get("ORCHESTRATOR_KEEP_CLUSTER", "") not in ("", "0")
        if not was_running and not keep:
            down = _cluster_script("down", timeout=300)
            if down.returncode != 0:
                print(f"hack/cluster/down failed ({down.returncode}):\n{down.stderr[-3000:]}")


def _local_paths() -> dict[str, str]:
    """BIN_DIR (where the local kubectl lives) and KUBECONFIG_PATH, from hack/cluster/lib.sh."""
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f'source "{CLUSTER_DIR}/lib.sh" && echo "BIN_DIR=$BIN_DIR" '
            '&& echo "KUBECONFIG_PATH=$KUBECONFIG_PATH" && echo "NODE_IP=$NODE_IP"',
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        return {}
    return dict(
        line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and line[0] != "="
    )


@pytest.fixture(scope="session")
def kubeconfig(kube_cluster: KubeCluster) -> str:
    return kube_cluster.kubeconfig


@pytest.fixture(scope="session")
def project_image(kube_cluster: KubeCluster) -> str:
    """Reference of the project image (built from the current source on the local cluster)."""
    if not kube_cluster.project_image:
        pytest.fail(f"no project image: {kube_cluster.project_image_error or 'unknown reason'}")
    return kube_cluster.project_image


@pytest.fixture(scope="session")
def image_pull_policy(kube_cluster: KubeCluster) -> str:
    return kube_cluster.image_pull_policy


@pytest.fixture(scope="session")
def kubectl(kube_cluster: KubeCluster) -> Callable[..., subprocess.CompletedProcess[str]]:
    return kube_cluster.kubectl


@pytest.fixture(scope="session")
def kube_api(kube_cluster: KubeCluster) -> Iterator[Any]:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=kube_cluster.kubeconfig)
    try:
        client.VersionApi(api_client).get_code()
        yield api_client
    finally:
        api_client.close()


@pytest.fixture
def kube_namespace(kube_api: Any) -> Iterator[str]:
    """A fresh namespace for one test; deleted (without waiting) afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"e2e": "orchestrator"}))
    )
    # The ServiceAccount controller creates `default` shortly after the namespace.
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except client.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except client.ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture(scope="session")
def cluster_postgres_url(kube_cluster: KubeCluster) -> Iterator[str]:
    """A PostgreSQL database that pods (the chart's operator, its migration hook) and this
    process both reach: ``$ORCHESTRATOR_TEST_CLUSTER_POSTGRES_URL``, else (local cluster) a
    throwaway server of ``hack/postgres/for-cluster`` on the node address, stopped and
    removed at the end of the session. The loopback server of ``hack/postgres/up`` does not
    do: a pod's 127.0.0.1 is its own. Its role may create databases (tests make fresh ones)."""
    url = os.environ.get("ORCHESTRATOR_TEST_CLUSTER_POSTGRES_URL")
    if url:
        yield url
        return
    if not kube_cluster.local:
        pytest.fail(
            "set ORCHESTRATOR_TEST_CLUSTER_POSTGRES_URL to a PostgreSQL database the "
            "cluster's pods and this machine both reach (the local cluster starts its own)"
        )
    node_ip = _local_paths()["NODE_IP"]
    with socket.socket() as s:  # a free port on the node address (several sessions share it)
        s.bind((node_ip, 0))
        port = s.getsockname()[1]
    state = tempfile.mkdtemp(prefix="orchestrator-cluster-pg-")
    script = str(ROOT / "hack/postgres/for-cluster")
    up = subprocess.run(
        [script, "up", state, str(port)], capture_output=True, text=True, timeout=600
    )
    try:
        if up.returncode != 0:
            pytest.fail(f"hack/postgres/for-cluster up failed:\n{up.stderr[-3000:]}")
        yield up.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([script, "down", state], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)

"""Helpers for operator e2e tests: the operator as a real `kopf run` process, an in-cluster git
server, and small waiting/reading utilities around kubectl."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples/demo"
BASE_COMMIT = "d143d8712a637d59f8cf0c2dc6a5dee0e71fa9cd"

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`kopf run --standalone operator/handlers.py` watching one namespace."""

    def __init__(
        self,
        *,
        kubeconfig: str,
        namespace: str,
        image: str,
        pull_policy: str,
        workdir: Path,
        mode: tuple[str, ...] = ("--standalone",),
        also_namespaces: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        evidence_port: int | None = None,
    ) -> None:
        """``evidence_port``: shared with the other replicas of a pair (SO_REUSEPORT), as a
        Service in front of the replicas would be: a pod granted by a replica that died uploads
        to the live one."""
        self.extra_env = env or {}
        self.shared_evidence_port = evidence_port is not None
        self.mode = mode
        self.namespaces = (namespace, *also_namespaces)
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.image = image
        self.pull_policy = pull_policy
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "operator.log"
        self.metrics_port = free_port()
        # Runner pods reach this process's evidence server on the node address (local to
        # the machine: hack/cluster/README.md); the operator adds it to Adapter policies.
        self.evidence_host = os.environ.get("ORCHESTRATOR_E2E_EVIDENCE_HOST", "10.213.0.1")
        self.evidence_port = evidence_port or free_port()

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "ORCHESTRATOR_WORKDIR": str(self.workdir),
            "ORCHESTRATOR_RUNNER_IMAGE": self.image,
            "ORCHESTRATOR_IMAGE_PULL_POLICY": self.pull_policy,
            "ORCHESTRATOR_NAMESPACE": ",".join(self.namespaces),
            "ORCHESTRATOR_METRICS_PORT": str(self.metrics_port),
            "ORCHESTRATOR_METRICS_ADDRESS": "127.0.0.1",
            "ORCHESTRATOR_RESYNC_SECONDS": "5",
            "ORCHESTRATOR_EVIDENCE_LISTEN": f"{self.evidence_host}:{self.evidence_port}",
            "ORCHESTRATOR_EVIDENCE_URL": f"http://{self.evidence_host}:{self.evidence_port}",
            "ORCHESTRATOR_EVIDENCE_REUSE_PORT": "true" if self.shared_evidence_port else "false",
            **self.extra_env,
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kopf",
                    "run",
                    *self.mode,
                    *(arg for ns in self.namespaces for arg in ("--namespace", ns)),
                    str(ROOT / "operator/handlers.py"),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup, like a crashed or evicted operator pod."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, debug: Callable[[], str] = lambda: ""
) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{debug()}")


def get_json(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    out = kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout else {}


def apply(
    kubectl: Kubectl, namespace: str, obj: dict[str, Any], check: bool = True
) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def apply_crds(kubectl: Kubectl) -> None:
    """This checkout's CRDs, applied and Established. Tests whose resources need fields or
    limits of this checkout call it right before they apply one: the local cluster is shared
    by several checkouts, and another one may have applied its own CRDs meanwhile."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/taskexecutions.orchestrator.dev")


def git_server(
    kubectl: Kubectl,
    namespace: str,
    image: str,
    pull_policy: str,
    bundle: Path = DEMO / "repos/calc.bundle",
    *,
    push: bool = False,
) -> str:
    """A git daemon pod serving a repository from a bundle (default: examples/demo's calc);
    returns its git:// URL (``git://<service ip>:9418/calc.git``). ``push``: it also accepts
    (anonymous) pushes, as a server the integration branch goes to."""
    kubectl(
        "create",
        "configmap",
        "calc-bundle",
        "-n",
        namespace,
        f"--from-file=calc.bundle={bundle}",
    )
    script = (
        "set -e; mkdir -p /tmp/repos; git clone -q --bare /bundle/calc.bundle /tmp/repos/calc.git; "
        "exec git daemon --reuseaddr --export-all --base-path=/tmp/repos --port=9418 "
        + ("--enable=receive-pack " if push else "")
        + "/tmp/repos"
    )
    labels = {"app": "git-server"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "git-server", "labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "git",
                    "image": image,
                    "imagePullPolicy": pull_policy,
                    "command": ["sh", "-c", script],
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "ports": [{"containerPort": 9418}],
                    "readinessProbe": {"tcpSocket": {"port": 9418}, "periodSeconds": 1},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "bundle", "mountPath": "/bundle"}],
                }
            ],
            "volumes": [{"name": "bundle", "configMap": {"name": "calc-bundle"}}],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "git-server"},
        "spec": {"selector": labels, "ports": [{"port": 9418, "targetPort": 9418}]},
    }
    apply(kubectl, namespace, pod)
    apply(kubectl, namespace, service)
    kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        "pod/git-server",
        "--timeout=180s",
        timeout=200,
    )
    ip = get_json(kubectl, "service", "git-server", "-n", namespace)["spec"]["clusterIP"]
    return f"git://{ip}:9418/calc.git"


def demo_patch(task_id: str) -> str:
    queue = json.loads((DEMO / ".state/task_queue.json").read_text())
    return next(t["patch"] for t in queue["tasks"] if t["task_id"] == task_id)


#: Conflicts with add-multiply: both append a function at the end of calc/ops.py.
DIVIDE_PATCH = (
    "diff --git a/calc/ops.py b/calc/ops.py\n--- a/calc/ops.py\n+++ b/calc/ops.py\n"
    "@@ -7,3 +7,7 @@ def add(a, b):\n \n def sub(a, b):\n     return a - b\n+\n+\n"
    "+def div(a, b):\n+    return a / b\n"
)


GATE = [
    {"name": "compile", "command": ["{python}", "-m", "compileall", "-q", "calc", "tests"]},
    {
        "name": "unit-tests",
        "command": ["{python}", "-m", "unittest", "discover", "-s", "tests", "-t", "."],
    },
]


def adapter(name: str, kind: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "Adapter",
        "metadata": {"name": name},
        "spec": {
            "kind": kind,
            "gate": GATE,
            "resources": {"cpu": "500m", "memory": "256Mi"},
            **spec,
        },
    }


def task_execution(name: str, repo: str, adapter_name: str, **spec: Any) -> dict[str, Any]:
    task = spec.pop("task", {"prompt": "demo"})
    return {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {"name": name},
        "spec": {
            "runId": "e2e",
            "source": {"repo": repo, "baseCommit": BASE_COMMIT},
            "task": task,
            "adapterRef": {"name": adapter_name},
            **spec,
        },
    }


def integration(name: str, run_id: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": name},
        "spec": {"runId": run_id, "resources": {"cpu": "500m", "memory": "256Mi"}, **spec},
    }

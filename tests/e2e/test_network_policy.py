"""NetworkPolicy enforced: what an adapter pod and a gate pod can reach, measured from inside.

The chart's runner policy (rendered by `helm template`, egress to the in-cluster git server
only) and the operator's per-Adapter egress policy (``core.kube.jobs.egress_policy``, created
as the operator creates it) are applied to a namespace holding a git server, a stand-in for a
model API (the Adapter's ``spec.egress``) and a bystander pod with a Service. Pods labelled
exactly as ``core.kube.jobs.job_manifest`` labels adapter and gate pods then open TCP
connections with short timeouts, and the outcome of each (connected, refused, timed out,
unreachable) is compared with the table. A pod no policy selects runs the same probes as the
control: every destination the runner pods are denied is reachable from it, so a denial is
the policy's doing and not a dead address.

On the local cluster the enforcement comes from hack/cluster's NetworkPolicy engine
(kube-network-policies' policy engine, see hack/cluster/README.md); against another cluster
the test holds when its network plugin enforces NetworkPolicy.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from core.kube.jobs import egress_policy, egress_policy_action, job_manifest
from core.resources import AdapterResourceSpec
from tests.e2e.operator_harness import ROOT, apply, get_json, git_server, wait_for
from tests.unit.test_chart import render

pytestmark = pytest.mark.cluster

ADAPTER = "probe-adapter"
# Opens one TCP connection per target (host:port) in parallel, 3 s timeout each, and prints
# {target: outcome}. Runs in the project image (python3).
PROBE = r"""
import concurrent.futures, errno, json, socket, sys

def probe(target):
    host, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        return "connected"
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "unreachable"
        return "error:" + errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()

with concurrent.futures.ThreadPoolExecutor(len(sys.argv) - 1) as pool:
    print(json.dumps(dict(zip(sys.argv[1:], pool.map(probe, sys.argv[1:])))))
"""
HTTP = ["python3", "-m", "http.server", "8080"]
# Small requests: the probes idle, and the shared 2-CPU test node runs other suites too.
SMALL = AdapterResourceSpec.model_validate(
    {"kind": "patch", "resources": {"cpu": "50m", "memory": "96Mi"}}
)
SLEEP = ["python3", "-c", "import time; time.sleep(3600)"]


def _te(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {"name": "probe", "namespace": namespace, "uid": str(uuid.uuid4())},
    }


def _runner_pod(namespace: str, role: str, image: str, pull_policy: str) -> dict[str, Any]:
    """A pod with the labels and security context of the operator's Job pods for ``role``."""
    job = job_manifest(
        te=_te(namespace),
        name=f"probe-{role}",
        role=role,  # type: ignore[arg-type]
        run_id="netpol",
        task_id="probe",
        attempt=1,
        image=image,
        fetch_grant="{}",
        runner_grant="{}",
        deadline_seconds=600,
        adapter=SMALL,
        image_pull_policy=pull_policy,
        adapter_name=ADAPTER,
    )
    template = job["spec"]["template"]
    template["spec"].pop("initContainers")  # nothing to fetch: the probes need no request
    template["spec"]["containers"][0]["command"] = SLEEP
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"probe-{role}", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }


def _plain_pod(name: str, command: list[str], image: str, pull_policy: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "c",
                    "image": image,
                    "imagePullPolicy": pull_policy,
                    "command": command,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def _probe(kubectl: Any, namespace: str, pod: str, targets: list[str]) -> dict[str, str]:
    out = kubectl("exec", "-n", namespace, pod, "--", "python3", "-c", PROBE, *targets, timeout=60)
    result: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def net(kubectl, kube_namespace, project_image, image_pull_policy) -> dict[str, Any]:
    ns = kube_namespace
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/adapters.orchestrator.dev")
    repo = git_server(kubectl, ns, project_image, image_pull_policy)
    for name, command in (("model-api", HTTP), ("bystander", HTTP)):
        apply(kubectl, ns, _plain_pod(name, command, project_image, image_pull_policy))
    bystander_svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bystander"},
        "spec": {"selector": {"app": "bystander"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    apply(kubectl, ns, bystander_svc)
    kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/model-api", "pod/bystander",
            "--timeout=180s", timeout=200)  # fmt: skip
    pod_ip = {
        name: get_json(kubectl, "pod", name, "-n", ns)["status"]["podIP"]
        for name in ("git-server", "model-api", "bystander")
    }

    # The chart's runner policy as `helm template` renders it, admitting the git server the way
    # the quickstart does (podSelector, examples/taskexecution.yaml).
    values = {
        "networkPolicy": {
            "extraEgress": [
                {"to": [{"podSelector": {"matchLabels": {"app": "git-server"}}}],
                 "ports": [{"port": 9418}]}
            ]
        }
    }  # fmt: skip
    policies = [o for o in render(values, namespace=ns) if o["kind"] == "NetworkPolicy"]
    assert [p["metadata"]["name"] for p in policies] == ["orch-orchestrator-runner"]
    for policy in policies:
        apply(kubectl, ns, policy)

    # The Adapter, and its egress policy exactly as the operator builds and creates it.
    spec = {"kind": "patch", "egress": [{"cidr": f"{pod_ip['model-api']}/32", "ports": [8080]}]}
    apply(kubectl, ns, {"apiVersion": "orchestrator.dev/v1alpha1", "kind": "Adapter",
                        "metadata": {"name": ADAPTER}, "spec": spec})  # fmt: skip
    adapter = get_json(kubectl, "adapter", ADAPTER, "-n", ns)
    resource = AdapterResourceSpec.model_validate(adapter["spec"])
    assert egress_policy_action(None, adapter, resource) == "create"
    kubectl("create", "-n", ns, "-f", "-", input=json.dumps(egress_policy(adapter, resource)))

    for role in ("adapter", "gate"):
        apply(kubectl, ns, _runner_pod(ns, role, project_image, image_pull_policy))
    apply(kubectl, ns, _plain_pod("control", SLEEP, project_image, image_pull_policy))
    kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/probe-adapter", "pod/probe-gate",
            "pod/control", "--timeout=180s", timeout=200)  # fmt: skip

    kubernetes = get_json(kubectl, "service", "kubernetes", "-n", "default")
    slices = get_json(kubectl, "endpointslices", "-n", "default",
                      "-l", "kubernetes.io/service-name=kubernetes")["items"]  # fmt: skip
    endpoint = slices[0]["endpoints"][0]["addresses"][0]
    api_port = slices[0]["ports"][0]["port"]
    node = get_json(kubectl, "nodes")["items"][0]
    node_ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    git = f"{repo.split('//')[1].split('/')[0]}"  # the git server's Service address:9418
    targets = {
        "git server (Service)": git,
        "git server pod, other port": f"{pod_ip['git-server']}:9419",
        "model API (Adapter egress)": f"{pod_ip['model-api']}:8080",
        "another pod's port": f"{pod_ip['bystander']}:8080",
        "unlisted Service address": f"{get_json(kubectl, 'service', 'bystander', '-n', ns)['spec']['clusterIP']}:80",
        "kube-apiserver Service": f"{kubernetes['spec']['clusterIP']}:443",
        "kube-apiserver node address": f"{endpoint}:{api_port}",
        "kubelet on the node": f"{node_ip}:10250",
        "metadata address": "169.254.169.254:80",
    }
    # The engine resolves a pod by its address from the API server; the first connection of a
    # pod it does not know yet is refused (fail-closed). Wait until each pod reaches the one
    # destination all three may reach.
    for pod in ("probe-adapter", "probe-gate", "control"):
        wait_for(
            lambda pod=pod: _probe(kubectl, ns, pod, [git])[git] == "connected",
            60,
            f"{pod} to reach the git server",
        )
    return {"ns": ns, "targets": targets, "adapter": adapter, "resource": resource}


def _table(kubectl: Any, net: dict[str, Any]) -> dict[str, dict[str, str]]:
    targets = net["targets"]
    results = {
        pod: _probe(kubectl, net["ns"], pod, list(targets.values()))
        for pod in ("probe-adapter", "probe-gate", "control")
    }
    return {
        name: {pod: results[pod][target] for pod in results} for name, target in targets.items()
    }


def _show(table: dict[str, dict[str, str]]) -> str:
    lines = [f"{'destination':32} {'adapter':12} {'gate':12} {'control':12}"]
    for name, row in table.items():
        lines.append(
            f"{name:32} {row['probe-adapter']:12} {row['probe-gate']:12} {row['control']:12}"
        )
    return "\n".join(lines)


def test_runner_pods_reach_only_what_their_policies_allow(kubectl, net) -> None:
    table = _table(kubectl, net)
    print("\n" + _show(table))
    metadata = table.pop("metadata address")
    expected = {
        # Both roles clone from the git server (the chart's runner policy), on its port only.
        "git server (Service)": ("connected", "connected", "connected"),
        "git server pod, other port": ("timeout", "timeout", "refused"),
        # The Adapter's spec.egress: its adapter pods only, never its gate.
        "model API (Adapter egress)": ("connected", "timeout", "connected"),
        "another pod's port": ("timeout", "timeout", "connected"),
        "unlisted Service address": ("timeout", "timeout", "connected"),
        "kube-apiserver Service": ("timeout", "timeout", "connected"),
        "kube-apiserver node address": ("timeout", "timeout", "connected"),
        "kubelet on the node": ("timeout", "timeout", "connected"),
    }
    got = {name: (r["probe-adapter"], r["probe-gate"], r["control"]) for name, r in table.items()}
    assert got == expected, _show(table)
    # Never reached by a runner pod; on the local cluster pods have no route there at all.
    assert metadata["probe-adapter"] in ("timeout", "unreachable"), metadata
    assert metadata["probe-gate"] in ("timeout", "unreachable"), metadata


def test_clearing_the_adapters_egress_takes_the_allowance_back(kubectl, net) -> None:
    ns, adapter = net["ns"], net["adapter"]
    model = net["targets"]["model API (Adapter egress)"]
    git = net["targets"]["git server (Service)"]
    assert _probe(kubectl, ns, "probe-adapter", [model]) == {model: "connected"}

    kubectl("patch", "adapter", ADAPTER, "-n", ns, "--type=json",
            "-p", '[{"op": "remove", "path": "/spec/egress"}]')  # fmt: skip
    adapter = get_json(kubectl, "adapter", ADAPTER, "-n", ns)
    cleared = AdapterResourceSpec.model_validate(adapter["spec"])
    existing = get_json(kubectl, "networkpolicy", f"orchestrator-adapter-{ADAPTER}", "-n", ns)
    # What the operator does with it (the reconciler follows egress_policy_action).
    assert egress_policy_action(existing, adapter, cleared) == "patch"
    body = {"spec": egress_policy(adapter, cleared)["spec"]}
    kubectl("patch", "networkpolicy", f"orchestrator-adapter-{ADAPTER}", "-n", ns,
            "--type=merge", "-p", json.dumps(body))  # fmt: skip
    existing = get_json(kubectl, "networkpolicy", f"orchestrator-adapter-{ADAPTER}", "-n", ns)
    assert egress_policy_action(existing, adapter, cleared) == "none"

    wait_for(
        lambda: _probe(kubectl, ns, "probe-adapter", [model])[model] == "timeout",
        30,
        "the cleared egress to be enforced",
    )
    assert _probe(kubectl, ns, "probe-adapter", [git, model]) == {
        git: "connected",
        model: "timeout",
    }


def test_a_policy_the_operator_did_not_create_is_foreign(kubectl, kube_namespace) -> None:
    ns = kube_namespace
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/adapters.orchestrator.dev")
    spec = {"kind": "patch", "egress": [{"cidr": "10.0.0.0/8", "ports": [443]}]}
    apply(kubectl, ns, {"apiVersion": "orchestrator.dev/v1alpha1", "kind": "Adapter",
                        "metadata": {"name": "claude"}, "spec": spec})  # fmt: skip
    adapter = get_json(kubectl, "adapter", "claude", "-n", ns)
    resource = AdapterResourceSpec.model_validate(adapter["spec"])
    # Someone else's policy with the operator's name for this Adapter.
    theirs = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "orchestrator-adapter-claude", "labels": {"team": "net"}},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]},
    }
    apply(kubectl, ns, theirs)
    create = kubectl("create", "-n", ns, "-f", "-",
                     input=json.dumps(egress_policy(adapter, resource)), check=False)  # fmt: skip
    assert create.returncode != 0 and "AlreadyExists" in create.stderr, create.stderr
    # The operator's decision on what the API server returns: leave it alone (no patch).
    existing = get_json(kubectl, "networkpolicy", "orchestrator-adapter-claude", "-n", ns)
    assert egress_policy_action(existing, adapter, resource) == "foreign"

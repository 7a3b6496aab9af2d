"""The Helm chart without a cluster: `helm lint`, `helm template` with the default values and
each documented option, every rendered object parsed into the kubernetes client's typed
models (and back, so a misspelt field fails), least-privilege RBAC, restricted pod security,
the values schema and the generated files. `kubectl apply --dry-run=server` and a real
install are in tests/e2e/test_chart_e2e.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.chart_values import ChartValues, values_schema_text
from core.kube.permissions import grants
from core.kube.shards import member_lease, shard_lease
from core.resources import AdapterResourceSpec, TaskExecutionSpec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/orchestrator"
EXAMPLE = ROOT / "examples/taskexecution.yaml"
SEED_METRICS = (
    "tasks_executed_total",
    "task_success_rate",
    "task_duration_seconds",
    "circuit_breaker_state",
    "retry_attempts_total",
    "acceptance_test_pass_rate",
    "executor_heartbeat",
    "adapter_health_check",
    "circuit_breaker_status",
)
AI_ADAPTERS = ("aider", "claudeCode", "codex", "opencode")
PG = {"database": {"type": "postgresql", "postgresql": {"urlSecret": {"name": "orch-db"}}}}
RWX = {"persistence": {"accessModes": ["ReadWriteMany"]}}

# Every documented option, as values overriding the defaults (also used by the e2e dry-run).
OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "served-namespaces": {"watch": {"namespaces": ["team-a", "team-b"]}},
    "other-namespace": {"watch": {"namespace": "tasks"}},
    "postgresql": PG,
    "postgresql-migrate-at-start": {**PG, "migrations": {"hook": False}},
    "ha": {**PG, **RWX, "replicaCount": 2},
    "ha-served-namespaces": {
        **PG,
        **RWX,
        "replicaCount": 3,
        "watch": {"namespaces": ["team-a", "team-b"]},
    },
    "leader-election-settings": {
        "leaderElection": {
            "leaseName": "my-lease",
            "leaseDurationSeconds": 30,
            "renewDeadlineSeconds": 20,
            "retryPeriodSeconds": 5,
        },
        "operator": {"workers": 8, "resyncSeconds": 60},
    },
    "no-leader-election": {"leaderElection": {"enabled": False}},
    # Horizontal shards: 3 replicas share 4 shards (one standby member slot stays free).
    "shards": {**PG, **RWX, "replicaCount": 3, "operator": {"shards": 4}},
    # One replica holds every shard (SQLite is fine: nothing is shared); a Lease name of its own.
    "shards-one-replica": {"operator": {"shards": 2}, "leaderElection": {"leaseName": "my-lease"}},
    "no-persistence": {"persistence": {"enabled": False}},
    "existing-claim": {"persistence": {"existingClaim": "my-claim"}},
    "storage-class": {"persistence": {"storageClass": "fast", "size": "5Gi"}},
    "no-metrics": {"metrics": {"enabled": False}},
    "s3-evidence": {
        **PG,
        **RWX,
        "replicaCount": 2,
        "evidence": {
            "backend": "s3",
            "s3": {
                "endpoint": "http://minio.storage:9000",
                "bucket": "evidence",
                "credentialsSecret": {"name": "s3-keys"},
                "egress": [{"cidr": "10.0.9.0/24", "ports": [9000]}],
            },
        },
    },
    "evidence-url": {"evidence": {"url": "http://orchestrator.example:8081"}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"a": "b"}}}},
    "no-network-policy": {"networkPolicy": {"enabled": False}},
    "network-policy-egress": {
        "networkPolicy": {
            "allowDns": False,
            "namespaces": ["a", "b"],
            "egress": [{"cidr": "10.96.0.0/12", "ports": [9418]}, {"cidr": "0.0.0.0/0"}],
            "extraEgress": [
                {
                    "to": [{"podSelector": {"matchLabels": {"app": "git"}}}],
                    "ports": [{"port": 9418}],
                }
            ],
            "gateEgress": [{"cidr": "10.0.5.0/24", "ports": [443]}],
        }
    },
    "ai-adapters": {
        "adapters": {
            key: {
                "enabled": True,
                "image": f"registry.example/orchestrator-{key.lower()}:1",
                "apiKeySecret": {"name": f"{key.lower()}-key"},
                "gate": [{"name": "unit", "command": ["{python}", "-m", "pytest", "-q"]}],
                "egress": [{"cidr": "0.0.0.0/0", "ports": [443]}],
                "extraEnv": [{"name": "TOOL_FLAG", "value": "1"}],
            }
            for key in AI_ADAPTERS
        }
    },
    "no-sample-adapters": {"adapters": {"patch": {"enabled": False}, "script": {"enabled": False}}},
    "grafana-dashboard": {"grafanaDashboard": {"enabled": True}},
    "external-service-account": {
        "serviceAccount": {"create": False, "name": "mine"},
        "rbac": {"create": False},
    },
    "runner-image-and-extras": {
        "image": {"repository": "registry.example/orchestrator", "tag": "1.2.3"},
        "runner": {"image": "registry.example/runner:1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {
            "verbose": True,
            "logFormat": "json",
            "extraEnv": [{"name": "X", "value": "1"}],
        },
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "k", "operator": "Exists"}],
        "priorityClassName": "high",
        "podAnnotations": {"a": "b"},
    },
}


# --------------------------------------------------------------------------- helpers


@cache
def helm_bin() -> str:
    out = subprocess.run(
        [str(ROOT / "hack/tools/helm")], capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, f"hack/tools/helm failed:\n{out.stderr[-3000:]}"
    return out.stdout.strip().splitlines()[-1]


def helm(*args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [helm_bin(), *args]
    if values:
        cmd += ["--values", "-"]
    return subprocess.run(
        cmd,
        input=json.dumps(values or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def render(values: dict[str, Any], namespace: str = "orchestrator") -> list[dict[str, Any]]:
    out = helm("template", "orch", str(CHART), "--namespace", namespace, values=values)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def served_namespaces(values: dict[str, Any], release_namespace: str = "orchestrator") -> list[str]:
    watch = values.get("watch", {})
    return list(watch.get("namespaces") or [watch.get("namespace") or release_namespace])


def render_with_hooks(values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(values)  # `helm template` includes hooks and test pods


def _strip_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_strip_none(v) for v in node]
    return node


def _norm(node: Any) -> Any:
    """JSON-normalised: the API server sees ints and strings the same way the client does."""
    return json.loads(json.dumps(node))


TYPED = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Pod"): "V1Pod",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("batch/v1", "Job"): "V1Job",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}


def typed_roundtrip(obj: dict[str, Any]) -> Any:
    """Parse into the client's typed model and serialise again: a field the model does not know
    (a typo, a wrong nesting) disappears, so the round trip must give the object back."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    model = api._ApiClient__deserialize(obj, TYPED[(obj["apiVersion"], obj["kind"])])  # type: ignore[attr-defined]
    again = _strip_none(api.sanitize_for_serialization(model))
    assert _norm(again) == _norm(_strip_none(obj)), f"{obj['kind']} {obj['metadata']['name']}"
    return model


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for o in objs:
        if o["kind"] == "Pod":
            out.append((f"Pod/{o['metadata']['name']}", o["spec"]))
        elif o["kind"] in ("Deployment", "Job"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
    return out


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The Pod Security Standard `restricted` profile (v1.35), checked on a pod spec."""
    bad = []
    psc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(key)
    for vol in spec.get("volumes") or []:
        allowed = {"configMap", "emptyDir", "projected", "secret", "downwardAPI",
                   "persistentVolumeClaim", "ephemeral", "csi", "name"}  # fmt: skip
        if set(vol) - allowed:
            bad.append(f"volume {vol['name']}: {sorted(set(vol) - allowed)}")
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            bad.append(f"{name}: capabilities.drop must contain ALL")
        if set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities.add")
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort")
    return bad


# --------------------------------------------------------------------------- tests


def test_helm_lint_strict_with_every_option() -> None:
    for name, values in OPTIONS.items():
        out = helm("lint", "--strict", str(CHART), values=values)
        assert out.returncode == 0, f"{name}:\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_rendered_object_parses_into_the_typed_models(option: str) -> None:
    objs = render_with_hooks(OPTIONS[option])
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "Pod"} <= kinds
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key in TYPED:
            typed_roundtrip(obj)
        elif obj["kind"] == "Adapter":
            assert obj["apiVersion"] == "orchestrator.dev/v1alpha1"
            AdapterResourceSpec.model_validate(obj["spec"])
        elif obj["kind"] == "ServiceMonitor":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["endpoints"][0]["port"] == "metrics"
        else:
            raise AssertionError(f"unexpected object {key} in {option}")


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(group, resource, verb, resourceNames) of every rule of a Role."""
    out = set()
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in (rule.get(field) or []), (role["metadata"]["name"], rule)
        names = tuple(rule.get("resourceNames") or ())
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out |= {(group, res, verb, names) for verb in rule["verbs"]}
    return out


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_rbac_grants_exactly_the_operators_calls_and_nothing_cluster_wide(option: str) -> None:
    """The Roles grant core/kube/permissions.py, which tests/unit/test_operator_permissions.py
    holds to the calls in the code: a new call without a permission fails there, a permission
    the chart does not grant (or grants beyond) fails here."""
    values = OPTIONS[option]
    objs = render(values)
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [o for o in objs if o["kind"] == "Role"]
    bindings = {o["metadata"]["namespace"] + "/" + o["metadata"]["name"]: o
                for o in objs if o["kind"] == "RoleBinding"}  # fmt: skip
    if not values.get("rbac", {}).get("create", True):
        assert roles == [] and bindings == {}
        return
    served = served_namespaces(values)
    sa = {"kind": "ServiceAccount", "name": "orch-orchestrator", "namespace": "orchestrator"}
    main = [r for r in roles if r["metadata"]["name"] == "orch-orchestrator"]
    assert sorted(r["metadata"]["namespace"] for r in main) == sorted(served)
    for role in main:
        rules = _rules(role)
        assert {(g, r, v) for g, r, v, _ in rules} == grants("served"), role["metadata"]
        assert all(names == () for *_, names in rules)
        binding = bindings[f"{role['metadata']['namespace']}/orch-orchestrator"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "orch-orchestrator"}  # fmt: skip
        assert binding["subjects"] == [sa]
    election = [r for r in roles if r["metadata"]["name"] == "orch-orchestrator-leader-election"]
    evidence = [r for r in roles if r["metadata"]["name"] == "orch-orchestrator-evidence"]
    assert len(roles) == len(main) + len(election) + len(evidence)
    # The local evidence store: get of the operator's own Service (its ClusterIP is the URL
    # runner pods use), in the release namespace only; none with S3 or a configured URL.
    store = values.get("evidence", {})
    if store.get("backend", "local") == "local" and not store.get("url"):
        (role,) = evidence
        assert role["metadata"]["namespace"] == "orchestrator"
        rules = _rules(role)
        assert {(g, r, v) for g, r, v, _ in rules} == grants("evidence")
        assert rules == {("", "services", "get", ("orch-orchestrator",))}
        binding = bindings["orchestrator/orch-orchestrator-evidence"]
        assert binding["roleRef"]["name"] == "orch-orchestrator-evidence"
        assert binding["subjects"] == [sa]
    else:
        assert evidence == [] and "orchestrator/orch-orchestrator-evidence" not in bindings
    if not values.get("leaderElection", {}).get("enabled", True):
        assert election == []
        return
    # The Lease: only in the release namespace; get/update of its name, create (unnamed).
    # Sharded (operator.shards=S): get/update also of the S shard and S member Leases, by name.
    (role,) = election
    assert role["metadata"]["namespace"] == "orchestrator"
    lease = values.get("leaderElection", {}).get("leaseName") or "orch-orchestrator"
    shards = values.get("operator", {}).get("shards", 0)
    names = (
        lease,
        *(shard_lease(lease, i) for i in range(shards)),
        *(member_lease(lease, k) for k in range(shards)),
    )
    rules = _rules(role)
    assert {(g, r, v) for g, r, v, _ in rules} == grants("lease")
    assert rules == {
        ("coordination.k8s.io", "leases", "get", names),
        ("coordination.k8s.io", "leases", "update", names),
        ("coordination.k8s.io", "leases", "create", ()),
    }
    assert bindings["orchestrator/orch-orchestrator-leader-election"]["subjects"] == [sa]
    env = {e["name"]: e for e in _operator(objs)["env"]}
    assert env["ORCHESTRATOR_LEASE_NAME"]["value"] == lease
    if shards:
        assert env["ORCHESTRATOR_SHARDS"]["value"] == str(shards)
    else:
        assert "ORCHESTRATOR_SHARDS" not in env  # the single Lease, as before shards
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "ORCHESTRATOR_LEASE_NAMESPACE" not in env  # the pod's own: where the Role is


def _operator(objs: list[dict[str, Any]]) -> dict[str, Any]:
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    container: dict[str, Any] = deploy["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_pod_meets_the_restricted_pod_security_standard(option: str) -> None:
    specs = pod_specs(render_with_hooks(OPTIONS[option]))
    assert specs
    for name, spec in specs:
        assert restricted_violations(spec) == [], name


def test_adapter_and_gate_job_pods_meet_the_restricted_standard() -> None:
    from core.kube.jobs import job_manifest

    te = {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {"name": "t", "namespace": "n", "uid": "u"},
    }
    for role in ("adapter", "gate"):
        job = job_manifest(
            te=te, name="j", role=role, run_id="r", task_id="t", attempt=1, image="i",
            fetch_grant="{}", runner_grant="{}", deadline_seconds=10, adapter=None,
            patch_source={"configMap": {"name": "p"}} if role == "adapter" else None,
        )  # fmt: skip
        typed_roundtrip(job)
        spec = job["spec"]["template"]["spec"]
        assert restricted_violations(spec) == []
        assert spec["automountServiceAccountToken"] is False
        # The chart's NetworkPolicy selects them by this label.
        assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == (
            "orchestrator-runner"
        )


def test_default_install_shape() -> None:
    objs = render({})
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    deploy = by_kind[("Deployment", "orch-orchestrator")]
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["kopf", "run"]
    assert c["args"][:2] == ["--standalone", "--namespace=orchestrator"]
    assert c["args"][-1] == "/opt/orchestrator/operator/handlers.py"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ORCHESTRATOR_NAMESPACE"] == "orchestrator"
    assert env["ORCHESTRATOR_MIGRATE"] == "true"
    assert env["ORCHESTRATOR_RUNNER_IMAGE"] == "orchestrator:0.1.0"
    assert "ORCHESTRATOR_DATABASE_URL" not in env
    assert env["ORCHESTRATOR_WORKERS"] == "4" and env["ORCHESTRATOR_RESYNC_SECONDS"] == "30"
    # leader election also with one replica: the Lease in the pod's namespace, under its name
    assert env["ORCHESTRATOR_LEADER_ELECTION"] == "true"
    assert env["ORCHESTRATOR_LEASE_NAME"] == "orch-orchestrator"
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert fields == {"POD_NAMESPACE": "metadata.namespace", "ORCHESTRATOR_IDENTITY": "metadata.name"}
    timings = ("LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD")
    assert [env[f"ORCHESTRATOR_{t}_SECONDS"] for t in timings] == ["15", "10", "2"]
    assert not any(a.startswith(("--peering", "--priority")) for a in c["args"])
    assert c["resources"]["limits"]["memory"]
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "orch-orchestrator-work"
    assert ("PersistentVolumeClaim", "orch-orchestrator-work") in by_kind
    assert not any(o["kind"] == "Job" for o in objs)  # SQLite: migrated at start
    policy = by_kind[("NetworkPolicy", "orch-orchestrator-runner")]
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "orchestrator-runner"
    }
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []
    # DNS and the evidence server only
    assert [r["ports"][0]["port"] for r in policy["spec"]["egress"]] == [53, 8081]
    adapters = {o["metadata"]["name"] for o in objs if o["kind"] == "Adapter"}
    assert adapters == {"patch", "script"}
    test_pod = by_kind[("Pod", "orch-orchestrator-test")]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_served_namespace_gets_the_default_deny_runner_policy(option: str) -> None:
    values = OPTIONS[option]
    objs = render(values)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    if not values.get("networkPolicy", {}).get("enabled", True):
        assert policies == []
        return
    runner = {
        p["metadata"]["namespace"]: p for p in policies if p["metadata"]["name"].endswith("-runner")
    }
    extra = values.get("networkPolicy", {}).get("namespaces", [])
    assert set(runner) == set(served_namespaces(values)) | set(extra)
    for policy in runner.values():
        spec = policy["spec"]
        assert spec["podSelector"] == {
            "matchLabels": {"app.kubernetes.io/name": "orchestrator-runner"}
        }
        assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    # The sample Adapters exist where TaskExecutions are served (they refer to them by name).
    adapters = {o["metadata"]["namespace"] for o in objs if o["kind"] == "Adapter"}
    enabled = values.get("adapters", {}).get("patch", {}).get("enabled", True)
    assert adapters == (set(served_namespaces(values)) if enabled else set())


def test_gate_pods_get_their_own_policy_and_never_the_model_api() -> None:
    objs = render(OPTIONS["network-policy-egress"])
    gate = [
        o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-gate")
    ]
    assert {g["metadata"]["namespace"] for g in gate} == {"orchestrator", "a", "b"}
    for policy in gate:
        assert policy["spec"]["podSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": "orchestrator-runner",
            "orchestrator.dev/role": "gate",
        }
        assert policy["spec"]["egress"] == [
            {
                "to": [{"ipBlock": {"cidr": "10.0.5.0/24"}}],
                "ports": [{"protocol": "TCP", "port": 443}],
            }
        ]
    assert not any(
        o["metadata"]["name"].endswith("-gate") for o in render({}) if o["kind"] == "NetworkPolicy"
    )
    # An AI adapter's model API is its Adapter's egress (selecting its adapter pods only), not
    # the runner policy both roles share.
    objs = render(OPTIONS["ai-adapters"])
    runner = next(o for o in objs if o["kind"] == "NetworkPolicy")
    assert [r["ports"][0]["port"] for r in runner["spec"]["egress"]] == [53, 8081]
    aider = next(o for o in objs if o["kind"] == "Adapter" and o["metadata"]["name"] == "aider")
    assert aider["spec"]["egress"] == [{"cidr": "0.0.0.0/0", "ports": [443]}]


def test_probes_use_kopfs_health_endpoint_which_a_standby_answers_too() -> None:
    """kopf's /healthz runs the operator's probes (operator/handlers.py); none of them fails
    on a standby (leader: false), so one probe endpoint serves startup, readiness and liveness
    on every replica. Startup allows for migrations; liveness restarts only a process that has
    not answered for a minute."""
    for option in ("default", "ha"):
        c = _operator(render(OPTIONS[option]))
        port = next(p for p in c["ports"] if p["name"] == "health")["containerPort"]
        assert f"--liveness=http://0.0.0.0:{port}/healthz" in c["args"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
        startup, live = c["startupProbe"], c["livenessProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
        assert live["periodSeconds"] * live.get("failureThreshold", 3) >= 60
        assert live["timeoutSeconds"] >= 5 and c["readinessProbe"]["timeoutSeconds"] >= 5
    handlers = (ROOT / "operator/handlers.py").read_text()
    probes = re.findall(r'@kopf\.on\.probe\(id="(\w+)"\)', handlers)
    assert probes == ["executor_heartbeat", "leader", "circuit_breaker_status"]
    test_pod = next(o for o in render({}) if o["kind"] == "Pod")
    script = test_pod["spec"]["containers"][0]["command"][-1]
    assert '"executor_heartbeat" in body' in script and '"leader" in body' in script


def test_postgresql_migrates_in_a_hook_and_ha_uses_a_lease() -> None:
    objs = render(OPTIONS["ha"])
    job = next(o for o in objs if o["kind"] == "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    mc = job["spec"]["template"]["spec"]["containers"][0]
    assert mc["command"][:3] == ["orchestrator", "db", "upgrade"]
    assert mc["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "orch-db", "key": "url"}
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    # kopf only hosts the process: always standalone, never peering
    assert c["command"] == ["kopf", "run"] and c["args"][0] == "--standalone"
    assert not any(a.startswith(("--peering", "--priority")) for a in c["args"])
    env = {e["name"]: e for e in c["env"]}
    assert env["ORCHESTRATOR_MIGRATE"]["value"] == "false"
    assert env["ORCHESTRATOR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "orch-db"
    assert env["ORCHESTRATOR_LEADER_ELECTION"]["value"] == "true"
    assert env["ORCHESTRATOR_IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # ledger, logs, evidence: shared
    assert not any(o["kind"] in ("KopfPeering", "ClusterKopfPeering") for o in objs)
    objs = render(OPTIONS["ha-served-namespaces"])
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] == 3
    c = deploy["spec"]["template"]["spec"]
    args = c["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--all-namespaces" not in args
    env = {e["name"]: e.get("value") for e in c["containers"][0]["env"]}
    assert env["ORCHESTRATOR_NAMESPACE"] == "team-a,team-b"  # resync: each, nothing else
    # the Lease stays in the release namespace, whatever is served
    lease = next(o for o in objs if o["metadata"]["name"] == "orch-orchestrator-leader-election"
                 and o["kind"] == "Role")  # fmt: skip
    assert lease["metadata"]["namespace"] == "orchestrator"
    env = {e["name"]: e.get("value") for e in _operator(render(OPTIONS["leader-election-settings"]))["env"]}
    assert env["ORCHESTRATOR_LEASE_NAME"] == "my-lease" and env["ORCHESTRATOR_WORKERS"] == "8"
    timings = ("LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD")
    assert [env[f"ORCHESTRATOR_{t}_SECONDS"] for t in timings] == ["30", "20", "5"]
    env = {e["name"]: e.get("value") for e in _operator(render(OPTIONS["no-leader-election"]))["env"]}
    assert env["ORCHESTRATOR_LEADER_ELECTION"] == "false"
    assert not {"ORCHESTRATOR_LEASE_NAME", "ORCHESTRATOR_IDENTITY"} & set(env)


def test_shards_reach_the_operator_and_are_off_by_default() -> None:
    """operator.shards=0 (the default) renders exactly what the chart rendered before shards
    (no ORCHESTRATOR_SHARDS, the one Lease name); S > 0 passes S to every replica."""
    default = helm("template", "orch", str(CHART), "--namespace", "orchestrator")
    assert default.returncode == 0, default.stderr
    zero = helm("template", "orch", str(CHART), "--namespace", "orchestrator",
                values={"operator": {"shards": 0}})  # fmt: skip
    assert zero.stdout == default.stdout
    assert "shard" not in default.stdout.lower() and "member" not in default.stdout.lower()
    objs = render(OPTIONS["shards"])
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"  # one replica at a time
    env = {e["name"]: e.get("value") for e in _operator(objs)["env"]}
    assert env["ORCHESTRATOR_SHARDS"] == "4" and env["ORCHESTRATOR_LEADER_ELECTION"] == "true"
    # the chart accepts what the operator accepts, no more
    from core.kube.runtime import OperatorSettings

    chart = ChartValues.model_json_schema(by_alias=True)["$defs"]["Operator"]["properties"]
    operator = OperatorSettings.model_json_schema()["properties"]["shards"]
    assert (chart["shards"]["minimum"], chart["shards"]["maximum"]) == (
        operator["minimum"],
        operator["maximum"],
    )


async def _lease_calls(
    option: str, replicas: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], list[Any], list[int | None], list[bool]]:
    """Run the operator's control loop (leader election, shards) as the chart configures it:
    the Deployment's env -> OperatorSettings -> the Lease settings -> ``replicas`` replicas on
    one fake API server, 60 s of fake time. Returns the Lease Role, every Lease call, and
    then the shards each replica held and whether it held the one Lease."""
    from core.kube.api import ApiCall
    from core.kube.control_loop import ControlLoop
    from core.kube.runtime import OperatorSettings, election_config
    from core.testing.clock import FakeClock
    from core.testing.fake_kube import FakeApiServer, FakeKubeApi
    from tests.unit.test_shards import Completing, Ledger

    class Idle(Completing):
        """test_shards' controller seam; the unsharded loop's sweep passes no shard filter."""

        async def sweep(  # type: ignore[override]
            self, namespaces: tuple[str, ...], owns: Any = None
        ) -> int:
            return 0

    objs = render(OPTIONS[option])
    roles = [o for o in objs if o["kind"] == "Role"]
    (role,) = [r for r in roles if r["metadata"]["name"].endswith("-leader-election")]
    container = _operator(objs)
    for name in list(os.environ):
        if name.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(name)
    fields = {"metadata.namespace": "orchestrator"}  # the release namespace (downward API)
    for entry in container["env"]:
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
        elif entry["name"] == "POD_NAMESPACE":
            monkeypatch.setenv("POD_NAMESPACE", fields[entry["valueFrom"]["fieldRef"]["fieldPath"]])
    settings = OperatorSettings()  # type: ignore[call-arg]  # runner_image: from the env
    election = election_config(settings)
    assert election is not None and election.namespace == "orchestrator"
    server, clock, ledger = FakeApiServer(namespaces=("orchestrator",)), FakeClock(), Ledger()
    calls: list[ApiCall] = []
    loops = []
    for n in range(replicas):
        api = FakeKubeApi(server)
        api.add_observer(lambda call: calls.append(call) if call.resource == "leases" else None)
        loops.append(
            ControlLoop(
                Idle(api, clock, f"pod-{n}", ledger, 1.0),  # type: ignore[arg-type]
                api,
                namespaces=settings.namespaces,
                workers=settings.workers,
                election=election,
                identity=f"pod-{n}",  # ORCHESTRATOR_IDENTITY: the pod's name
                clock=clock,
                shards=settings.shards,
            )
        )
    tasks = [asyncio.get_running_loop().create_task(loop.run()) for loop in loops]
    await clock.run_for(60, 0.5)
    held = [len(loop.shards.held()) if loop.shards is not None else None for loop in loops]
    leading = [loop.elector is not None and loop.elector.leading for loop in loops]
    for task in tasks:
        task.cancel()
    ended = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, asyncio.CancelledError) for e in ended), ended  # ran until cancelled
    return role, calls, held, leading


@pytest.mark.parametrize(
    ("option", "replicas"),
    [("default", 1), ("leader-election-settings", 1), ("ha", 2), ("shards", 3),
     ("shards-one-replica", 1)],
)  # fmt: skip
def test_the_lease_role_grants_exactly_the_leases_the_operator_uses(
    option: str, replicas: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the names the chart expects, but the Lease calls the operator's own leader election
    and shards (core/kube/leader.py, shards.py) make, configured from the chart's env: each is
    one the Role allows (get/update of a listed name, create of any, in the release namespace
    only), and every listed name is used (nothing granted beyond)."""
    role, calls, held, leading = asyncio.run(_lease_calls(option, replicas, monkeypatch))
    named = next(r for r in role["rules"] if r.get("resourceNames"))
    assert sorted(named["verbs"]) == ["get", "update"]
    unnamed = [r for r in role["rules"] if not r.get("resourceNames")]
    assert [r["verbs"] for r in unnamed] == [["create"]]
    allowed = set(named["resourceNames"])
    assert calls and {c.namespace for c in calls} == {"orchestrator"}
    refused = [(c.verb, c.name) for c in calls
               if not (c.verb == "create" or (c.verb in ("get", "update") and c.name in allowed))]  # fmt: skip
    assert refused == []
    assert {c.name for c in calls} == allowed  # each granted name is one the operator uses
    shards = OPTIONS[option].get("operator", {}).get("shards", 0)
    if shards:  # the shards were taken and split under these permissions
        counts = sorted(n or 0 for n in held)
        assert sum(counts) == shards and counts[-1] - counts[0] <= 1, held
        assert leading.count(True) == 1  # the one Lease too (Integrations, escalations)
    else:
        assert leading.count(True) == 1 and held == [None] * replicas


def test_ai_adapters_render_their_templates_with_the_api_key_secret() -> None:
    objs = render(OPTIONS["ai-adapters"])
    adapters = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "Adapter"}
    assert set(adapters) == {"patch", "script", "aider", "claude-code", "codex", "opencode"}
    for name, env_name in (("aider", "OPENAI_API_KEY"), ("claude-code", "ANTHROPIC_API_KEY")):
        spec = AdapterResourceSpec.model_validate(adapters[name])
        assert spec.template is not None and spec.template.value == name
        assert spec.env[0].name == env_name and spec.env[0].secret_key_ref is not None
        assert spec.env[0].secret_key_ref.key == "api-key"
        assert spec.image and spec.gate and spec.egress


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "needs database.type=postgresql"),
        ({**PG, "replicaCount": 2}, "ReadWriteMany"),
        ({**PG, "replicaCount": 2, "persistence": {"enabled": False}}, "a work dir the replicas share"),
        ({**PG, **RWX, "replicaCount": 2, "leaderElection": {"enabled": False}},
         "needs leaderElection.enabled=true"),
        ({"leaderElection": {"renewDeadlineSeconds": 15}}, "retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"),
        ({"leaderElection": {"retryPeriodSeconds": 10}}, "retryPeriodSeconds < renewDeadlineSeconds"),
        ({"replicaCount": 0}, "replicaCount"),
        ({"operator": {"shards": 2}, "leaderElection": {"enabled": False}},
         "operator.shards needs leaderElection.enabled=true"),
        ({**PG, **RWX, "replicaCount": 2, "operator": {"shards": 2},
          "leaderElection": {"enabled": False}}, "needs leaderElection.enabled=true"),
        ({"operator": {"shards": 2}, "replicaCount": 2}, "needs database.type=postgresql"),
        ({"operator": {"shards": 65}}, "/operator/shards"),
        ({"operator": {"shards": -1}}, "/operator/shards"),
        ({"peering": {"name": "x"}}, "peering"),
        ({"operator": {"workers": 0}}, "workers"),
        ({"database": {"type": "postgresql"}}, "database.postgresql.urlSecret.name"),
        ({"adapters": {"aider": {"enabled": True}}}, "adapters.aider.image"),
        (
            {"adapters": {"codex": {"enabled": True, "image": "x"}}},
            "adapters.codex.apiKeySecret.name",
        ),
        ({"imagee": {}}, "imagee"),
        ({"metrics": {"port": "nine"}}, "port"),
        ({"watch": {"allNamespaces": True}}, "watch.allNamespaces was removed"),
        ({"watch": {"namespaces": ["a"], "namespace": "x"}}, "exclude each other"),
    ],
)
def test_invalid_values_are_refused_with_a_message(values: dict[str, Any], message: str) -> None:
    out = helm("template", "orch", str(CHART), values=values)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_values_yaml_equals_the_model_defaults_and_the_schema_is_generated() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert ChartValues.model_validate(values).model_dump(by_alias=True, mode="json") == values
    assert ChartValues().model_dump(by_alias=True, mode="json") == values
    assert (CHART / "values.schema.json").read_text() == values_schema_text()


def test_chart_crds_are_the_generated_crds() -> None:
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert top
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes()
    # nothing else: no KopfPeering CRDs (kopf runs standalone; leader election is a Lease)
    assert sorted(p.name for p in (CHART / "crds").glob("*")) == top


def test_grafana_dashboard_covers_the_seed_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards/orchestrator.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in SEED_METRICS:
        assert re.search(rf"\b{metric}(_bucket)?\b", exprs), metric
    cm = next(o for o in render(OPTIONS["grafana-dashboard"]) if o["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["orchestrator.json"]) == dashboard


def test_the_example_task_execution_is_valid_and_carries_the_demo() -> None:
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    by_kind = {d["kind"]: d for d in docs}
    te = by_kind["TaskExecution"]
    spec = TaskExecutionSpec.model_validate(te["spec"])
    assert spec.adapter_ref.name == "patch"  # enabled in the chart by default
    queue = json.loads((ROOT / "examples/demo/.state/task_queue.json").read_text())
    task = next(t for t in queue["tasks"] if t["task_id"] == "add-multiply")
    assert spec.task.patch == task["patch"]
    assert spec.source.base_commit == task["base_commit"]
    bundle = base64.b64decode(by_kind["ConfigMap"]["binaryData"]["calc.bundle"], validate=True)
    assert bundle == (ROOT / "examples/demo/repos/calc.bundle").read_bytes()
    for obj in docs:
        if (obj["apiVersion"], obj["kind"]) in TYPED:
            typed_roundtrip(obj)
    assert restricted_violations(by_kind["Pod"]["spec"]) == []


def test_runner_pods_reach_the_evidence_store_and_nothing_else_new() -> None:
    def runner_policy(values: dict[str, Any]) -> dict[str, Any]:
        objs = render(values)
        return next(o for o in objs if o["metadata"]["name"] == "orch-orchestrator-runner")

    # local: the operator's pods in the release namespace, on the evidence port only
    egress = runner_policy({})["spec"]["egress"]
    to_operator = [e for e in egress if "podSelector" in (e["to"][0])]
    assert len(to_operator) == 1
    peer = to_operator[0]["to"][0]
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "orchestrator"}
    }
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "orch"
    assert to_operator[0]["ports"] == [{"protocol": "TCP", "port": 8081}]
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render({})}
    service = objs[("Service", "orch-orchestrator")]
    assert {"name": "evidence", "port": 8081, "targetPort": "evidence", "protocol": "TCP"} in (
        service["spec"]["ports"]
    )
    env = {e["name"]: e for e in objs[("Deployment", "orch-orchestrator")]["spec"]["template"][
        "spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["ORCHESTRATOR_EVIDENCE_SERVICE"]["value"] == "orch-orchestrator"
    assert env["ORCHESTRATOR_EVIDENCE_BACKEND"]["value"] == "local"
    # s3: the endpoint's addresses, credentials from the Secret for the operator only
    s3 = OPTIONS["s3-evidence"]
    egress = runner_policy(s3)["spec"]["egress"]
    assert {"to": [{"ipBlock": {"cidr": "10.0.9.0/24"}}],
            "ports": [{"protocol": "TCP", "port": 9000}]} in egress  # fmt: skip
    assert not any("podSelector" in e["to"][0] for e in egress if "to" in e)
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render(s3)}
    env = {e["name"]: e for e in objs[("Deployment", "orch-orchestrator")]["spec"]["template"][
        "spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["ORCHESTRATOR_S3_BUCKET"]["value"] == "evidence"
    assert env["ORCHESTRATOR_S3_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-keys",
        "key": "secret-access-key",
    }
    ports = objs[("Service", "orch-orchestrator")]["spec"]["ports"]
    assert "evidence" not in {p["name"] for p in ports}


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ({}, {"work": "2Gi", "tmp": "1Gi", "inputs": str(116 * 1024 * 1024), "request": "1Gi"}),
        (
            {
                "workSizeLimit": "8Gi",
                "tmpSizeLimit": "2Gi",
                "inputsSizeLimit": "300Mi",
                "ephemeralStorageRequest": "4Gi",
                "ephemeralStorageLimit": "16Gi",
            },
            {"work": "8Gi", "tmp": "2Gi", "inputs": "300Mi", "request": "4Gi", "limit": "16Gi"},
        ),
    ],
)
def test_runner_storage_values_reach_the_runner_pods(
    storage: dict[str, str], expected: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """runner.storage -> the operator's env -> its settings -> every runner pod's emptyDirs
    and ephemeral-storage (the path a user's values take, minus the API server)."""
    from core.kube.jobs import job_manifest
    from core.kube.runtime import OperatorSettings, runner_storage

    container = _operator(render({"runner": {"storage": storage}}))
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name in list(os.environ):
        if name.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("ORCHESTRATOR_RUNNER_") or name == "ORCHESTRATOR_MAX_DIFF_BYTES":
            monkeypatch.setenv(name, value)
    disk = runner_storage(OperatorSettings(runner_image=env["ORCHESTRATOR_RUNNER_IMAGE"]))
    te = {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {"name": "t", "namespace": "n", "uid": "u"},
    }
    job = job_manifest(
        te=te, name="j", role="adapter", run_id="r", task_id="t", attempt=1, image="i",
        fetch_grant="{}", runner_grant="{}", deadline_seconds=10, adapter=None, storage=disk,
    )  # fmt: skip
    pod = job["spec"]["template"]["spec"]
    sizes = {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["volumes"]}
    assert sizes == {k: expected[k] for k in ("work", "tmp", "inputs")}
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == expected["request"]
    assert resources["limits"]["ephemeral-storage"] == expected.get("limit", disk.limit)


def test_a_runner_storage_value_that_is_no_quantity_stops_the_operator_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.errors import ConfigError
    from core.kube.runtime import OperatorSettings, runner_storage

    monkeypatch.setenv("ORCHESTRATOR_RUNNER_WORK_SIZE_LIMIT", "two gigs")
    settings = OperatorSettings(runner_image="i")
    with pytest.raises(ConfigError, match="work: 'two gigs' is not a quantity"):
        runner_storage(settings)

"""Pure logic of the Kubernetes backend: Job manifests, names, CRD schemas, conditions.

These tests check what we *send*; what the API server does with it is tested in tests/e2e.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes.client import ApiClient, V1Job

from core.crd import adapter_crd, task_execution_crd
from core.kube.conditions import set_conditions
from core.kube.jobs import (
    BACKSTOP_GRACE_SECONDS,
    RunnerStorage,
    egress_policy,
    egress_policy_action,
    is_own_egress_policy,
    job_manifest,
    job_name,
    label_value,
    labels,
    patch_source_volume,
    quantity,
)
from core.models import TaskState
from core.resources import AdapterResourceSpec, TaskExecutionStatus

TE = {
    "apiVersion": "orchestrator.dev/v1alpha1",
    "kind": "TaskExecution",
    "metadata": {"name": "fix-bug", "namespace": "team-a", "uid": "1234-abcd"},
}
ADAPTER = AdapterResourceSpec.model_validate(
    {
        "kind": "process",
        "template": "claude-code",
        "env": [
            {"name": "ANTHROPIC_API_KEY", "secretKeyRef": {"name": "keys", "key": "anthropic"}},
            {"name": "MODE", "value": "fast"},
        ],
        "resources": {"cpu": "250m", "memory": "300Mi"},
    }
)


def manifest(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "te": TE,
        "name": job_name("fix-bug", "1234-abcd", 1, "adapter"),
        "role": "adapter",
        "run_id": "r1",
        "task_id": "fix-bug",
        "attempt": 1,
        "image": "localhost/orchestrator/orchestrator:src-1",
        "fetch_grant": '{"downloads": "only"}',
        "runner_grant": '{"uploads": "only"}',
        "deadline_seconds": 600,
        "adapter": ADAPTER,
    }
    return job_manifest(**{**args, **overrides})


def test_job_names_are_deterministic_unique_and_dns_safe() -> None:
    a1 = job_name("fix-bug", "uid-1", 1, "adapter")
    assert a1 == job_name("fix-bug", "uid-1", 1, "adapter")
    others = {
        job_name("fix-bug", "uid-1", 2, "adapter"),
        job_name("fix-bug", "uid-1", 1, "gate"),
        job_name("fix-bug", "uid-2", 1, "adapter"),
    }
    assert a1 not in others and len(others) == 3
    long = job_name("x" * 250, "uid-1", 12, "gate")
    assert len(long) <= 63 and long.endswith("-12g")


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # apimachinery's


@pytest.mark.parametrize(
    "name",
    [
        "a" * 62 + "-b",  # issue 11: cut to 63 it ended in '-' and the Job create got a 422
        "a" * 62 + ".b",
        "x" * 253,
        "-" * 70,
        "fix-bug",
    ],
)
def test_label_values_and_job_names_are_valid_for_any_stored_name(name: str) -> None:
    value = label_value(name)
    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
    for role in ("adapter", "gate"):
        job = job_name(name, "uid-1", 12, role)  # type: ignore[arg-type]
        assert len(job) <= 63 and LABEL_VALUE.fullmatch(job), job  # copied into job-name
    te = {**TE, "metadata": {**TE["metadata"], "name": name}}
    assert labels(name, "r1", "t1", 1, "adapter")["orchestrator.dev/taskexecution"] == value
    assert manifest(te=te)["metadata"]["labels"]["orchestrator.dev/taskexecution"] == value


def test_a_valid_name_is_its_own_label_value_and_cut_ones_stay_distinct() -> None:
    assert label_value("fix-bug") == "fix-bug"  # selectors on the name keep working
    assert label_value("a" * 62 + "-b") != label_value("a" * 62 + "-c")


def test_adapter_pods_are_locked_down() -> None:
    job = manifest()
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 600 + BACKSTOP_GRACE_SECONDS
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsUser"] != 0
    assert container["resources"]["limits"] == {
        "cpu": "250m",
        "memory": "300Mi",
        "ephemeral-storage": RunnerStorage().limit,
    }
    assert container["command"] == ["python", "-m", "core.runner", "adapter"]
    env = {e["name"]: e for e in container["env"]}
    assert env["ANTHROPIC_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "keys", "key": "anthropic"}
    }
    assert env["MODE"]["value"] == "fast"
    # the request is a file the init container fetched (never an environment variable);
    # the runner container holds only its upload grant, the init container only downloads
    assert "ORCHESTRATOR_REQUEST" not in env
    assert env["ORCHESTRATOR_REQUEST_FILE"]["value"] == "/etc/orchestrator/inputs/request.json"
    assert env["ORCHESTRATOR_GRANT"]["value"] == '{"uploads": "only"}'
    (fetch,) = pod["initContainers"]
    assert fetch["command"] == ["python", "-m", "core.runner", "fetch"]
    assert {e["name"]: e["value"] for e in fetch["env"]}["ORCHESTRATOR_GRANT"] == (
        '{"downloads": "only"}'
    )
    assert fetch["securityContext"] == sc
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["inputs"] == {
        "name": "inputs",
        "mountPath": "/etc/orchestrator/inputs",
        "readOnly": True,
    }
    assert {m["name"]: m.get("readOnly") for m in fetch["volumeMounts"]}["inputs"] is None
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "1234-abcd" and owner["controller"] is True
    labels = job["metadata"]["labels"]
    assert (
        labels["orchestrator.dev/attempt"] == "1" and labels["orchestrator.dev/role"] == "adapter"
    )
    assert spec["template"]["metadata"]["labels"] == labels


def test_adapter_pods_carry_their_adapter_for_network_policies_gate_pods_do_not() -> None:
    labels = manifest(adapter_name="claude")["spec"]["template"]["metadata"]["labels"]
    assert labels["orchestrator.dev/adapter"] == "claude"
    gate = manifest(adapter_name="claude", role="gate", name="g")
    labels = gate["spec"]["template"]["metadata"]["labels"]
    # The gate runs the repository's checks: it must not inherit the adapter's egress.
    assert "orchestrator.dev/adapter" not in labels
    assert "orchestrator.dev/adapter" not in gate["metadata"]["labels"]
    assert labels["orchestrator.dev/role"] == "gate"
    assert labels["app.kubernetes.io/name"] == "orchestrator-runner"  # the chart's policies


def test_gate_pods_get_no_adapter_secrets_and_no_configmap() -> None:
    job = manifest(role="gate", name="g")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container["env"]}
    assert "ANTHROPIC_API_KEY" not in names and "MODE" not in names
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert sorted(volumes) == ["inputs", "tmp", "work"]  # the patch comes through the grant
    assert all(set(v) == {"name", "emptyDir"} for v in volumes.values())


@pytest.mark.parametrize("kind", ["configMap", "secret"])
def test_a_patch_named_by_reference_is_mounted_by_the_kubelet(kind: str) -> None:
    source = patch_source_volume(kind, "big-patch", "change.diff")  # type: ignore[arg-type]
    job = manifest(patch_source=source)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    name_key = "name" if kind == "configMap" else "secretName"
    assert volumes["patch-source"][kind] == {
        name_key: "big-patch",
        "items": [{"key": "change.diff", "path": "patch"}],
    }
    (container,) = job["spec"]["template"]["spec"]["containers"]
    mount = {m["name"]: m for m in container["volumeMounts"]}["patch-source"]
    assert mount == {
        "name": "patch-source",
        "mountPath": "/etc/orchestrator/patch-source",
        "readOnly": True,
    }


def _disk(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    return volumes, container["resources"]["requests"], container["resources"]["limits"]


def test_runner_pods_have_bounded_local_disk_by_default() -> None:
    """Every emptyDir has a sizeLimit and the container an ephemeral-storage request and
    limit: a task that fills its disk is evicted alone, not its node's other pods."""
    volumes, requests, limits = _disk(manifest())
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "1Gi"}
    inputs = quantity(volumes["inputs"]["emptyDir"]["sizeLimit"])
    assert inputs == 100 * 1024 * 1024 + 16 * 1024 * 1024  # the default hard limit of a diff
    assert requests["ephemeral-storage"] == "1Gi"
    # the limit covers the three volumes plus 512Mi of container logs
    assert quantity(limits["ephemeral-storage"]) == quantity("3Gi") + inputs + quantity("512Mi")
    # cpu and memory requests still equal their limits
    assert (requests["cpu"], requests["memory"]) == (limits["cpu"], limits["memory"])


def test_runner_storage_is_configurable_and_sized_from_the_diff_limit() -> None:
    storage = RunnerStorage.for_diff_limit(
        512 * 1024 * 1024, work="10Gi", tmp="500Mi", ephemeral_request="2Gi"
    )
    volumes, requests, limits = _disk(manifest(storage=storage))
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "10Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "500Mi"}
    inputs = quantity(volumes["inputs"]["emptyDir"]["sizeLimit"])
    assert inputs == 528 * 1024 * 1024
    assert requests["ephemeral-storage"] == "2Gi"
    assert quantity(limits["ephemeral-storage"]) == (
        quantity("10Gi") + quantity("500Mi") + inputs + quantity("512Mi")
    )
    explicit = RunnerStorage(inputs="1Gi", ephemeral_limit="20Gi")
    volumes, _, limits = _disk(manifest(storage=explicit))
    assert volumes["inputs"]["emptyDir"] == {"sizeLimit": "1Gi"}
    assert limits["ephemeral-storage"] == "20Gi"


def test_integration_gate_pods_get_the_same_disk_limits() -> None:
    """An Integration's gate Job mounts its inputs from a ConfigMap; work and tmp are bounded
    and the container has its ephemeral-storage like an attempt's gate."""
    job = manifest(
        role="gate", fetch_grant=None, runner_grant=None, inputs_configmap="gate-1-patch"
    )
    volumes, requests, limits = _disk(job)
    assert volumes["inputs"] == {"name": "inputs", "configMap": {"name": "gate-1-patch"}}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert "ephemeral-storage" in requests and "ephemeral-storage" in limits


@pytest.mark.parametrize(
    ("storage", "problem"),
    [
        (RunnerStorage(work="2 GB"), "work: '2 GB' is not a quantity"),
        (RunnerStorage(ephemeral_limit="lots"), "limit: 'lots' is not a quantity"),
        (
            RunnerStorage(ephemeral_request="8Gi", ephemeral_limit="4Gi"),
            "request 8Gi exceeds its limit 4Gi",
        ),
    ],
)
def test_bad_runner_storage_is_refused_naming_the_setting(
    storage: RunnerStorage, problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        storage.validate()


def test_jobs_carry_a_backstop_ttl_only_when_asked() -> None:
    assert "ttlSecondsAfterFinished" not in manifest()["spec"]
    assert manifest(ttl_seconds_after_finished=604800)["spec"]["ttlSecondsAfterFinished"] == (
        604800
    )


def test_manifest_parses_into_the_typed_kubernetes_model() -> None:
    job: V1Job = ApiClient().deserialize(json.dumps(manifest()), "V1Job", "application/json")
    assert job.spec.backoff_limit == 0
    assert job.spec.template.spec.automount_service_account_token is False
    assert job.spec.template.spec.containers[0].security_context.capabilities.drop == ["ALL"]


def _walk(node: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _walk(value, f"{path}[{i}]")
    return out


@pytest.mark.parametrize("crd", [task_execution_crd(), adapter_crd()], ids=["tex", "adp"])
def test_crd_schemas_are_structural(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "$defs" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert "const" not in node, path
        for option in node.get("anyOf", []):
            assert option.get("type") != "null", path
        if node.get("type") == "object" and path.endswith(("spec", "status")):
            assert "properties" in node, path
    spec = schema["properties"]["spec"]
    assert spec["x-kubernetes-validations"], "CEL rules expected"
    assert all("description" in spec["properties"][k] for k in spec["properties"])


def test_task_execution_crd_columns_and_immutability() -> None:
    crd = task_execution_crd()
    version = crd["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "State",
        "Adapter",
        "Attempt",
        "Reason",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"] == ["tex"]
    rules = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    assert rules[0]["rule"] == "self == oldSelf"
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"
    ]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_conditions_keep_transition_time_until_their_status_changes() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    running = set_conditions(
        TaskExecutionStatus(state=TaskState.IN_PROGRESS, reason="AdapterRunning"), t0, 1
    )
    by_type = {c.type: c for c in running.conditions}
    assert by_type["Running"].status == "True" and by_type["Succeeded"].status == "Unknown"
    t1 = t0 + timedelta(minutes=1)
    validating = set_conditions(running.model_copy(update={"state": TaskState.VALIDATING}), t1, 1)
    assert {c.type: c.last_transition_time for c in validating.conditions}["Running"] == t0
    t2 = t1 + timedelta(minutes=1)
    done = set_conditions(
        validating.model_copy(update={"state": TaskState.COMPLETED, "reason": "Completed"}), t2, 1
    )
    final = {c.type: c for c in done.conditions}
    assert final["Running"].status == "False" and final["Running"].last_transition_time == t2
    assert final["Succeeded"].status == "True" and final["Succeeded"].reason == "Completed"


ADAPTER_OBJ = {
    "apiVersion": "orchestrator.dev/v1alpha1",
    "kind": "Adapter",
    "metadata": {"name": "claude", "namespace": "team-a", "uid": "u-1"},
}
EGRESS = AdapterResourceSpec.model_validate(
    {"kind": "patch", "egress": [{"cidr": "10.0.0.0/8", "ports": [443]}, {"cidr": "192.0.2.1/32"}]}
)
NO_EGRESS = AdapterResourceSpec.model_validate({"kind": "patch"})


def test_adapter_egress_becomes_a_network_policy_for_its_adapter_pods() -> None:
    policy = egress_policy(ADAPTER_OBJ, EGRESS)
    assert policy["metadata"]["name"] == "orchestrator-adapter-claude"
    owner = policy["metadata"]["ownerReferences"][0]
    assert (owner["uid"], owner["kind"], owner["controller"]) == ("u-1", "Adapter", True)
    assert policy["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "orchestrator",
        "orchestrator.dev/adapter": "claude",
    }
    # Adapter pods of this Adapter only: a gate pod is never selected, even if labelled.
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {"orchestrator.dev/adapter": "claude", "orchestrator.dev/role": "adapter"}
    }
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert policy["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 443}]},
        {"to": [{"ipBlock": {"cidr": "192.0.2.1/32"}}]},
    ]
    pod = manifest(adapter_name="claude")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod.items()
    gate = manifest(adapter_name="claude", role="gate", name="g")["spec"]["template"]["metadata"]
    assert not policy["spec"]["podSelector"]["matchLabels"].items() <= gate["labels"].items()


def test_a_cleared_egress_gives_a_policy_that_allows_nothing_more() -> None:
    policy = egress_policy(ADAPTER_OBJ, NO_EGRESS)
    assert policy["spec"]["egress"] == [] and policy["spec"]["policyTypes"] == ["Egress"]


def test_only_the_operators_policy_for_this_very_adapter_is_its_own() -> None:
    own = egress_policy(ADAPTER_OBJ, EGRESS)
    assert is_own_egress_policy(own, ADAPTER_OBJ)
    foreign = {**own, "metadata": {**own["metadata"], "labels": {}, "ownerReferences": []}}
    assert not is_own_egress_policy(foreign, ADAPTER_OBJ)
    # Same name, made by someone else who copied the labels but owns it otherwise.
    labelled = {**own, "metadata": {**own["metadata"], "ownerReferences": []}}
    assert not is_own_egress_policy(labelled, ADAPTER_OBJ)
    # An earlier Adapter of the same name (deleted and recreated: new uid).
    recreated = {**ADAPTER_OBJ, "metadata": {**ADAPTER_OBJ["metadata"], "uid": "u-2"}}
    assert not is_own_egress_policy(own, recreated)
    # Owned by the Adapter but not as controller (someone else's object referencing it).
    ref = {**own["metadata"]["ownerReferences"][0], "controller": False}
    assert not is_own_egress_policy(
        {**own, "metadata": {**own["metadata"], "ownerReferences": [ref]}}, ADAPTER_OBJ
    )


@pytest.mark.parametrize(
    ("existing", "spec", "action"),
    [
        (None, EGRESS, "create"),
        (None, NO_EGRESS, "none"),  # nothing granted, nothing to take back
        ("own", EGRESS, "none"),  # already as desired
        ("own", NO_EGRESS, "patch"),  # cleared: the rules go
        ("own-old-rules", EGRESS, "patch"),
        ("own-cleared", NO_EGRESS, "none"),
        ("foreign", EGRESS, "foreign"),  # a 409 never overwrites someone else's policy
        ("foreign", NO_EGRESS, "foreign"),
    ],
)
def test_egress_policy_action(existing: str | None, spec: AdapterResourceSpec, action: str) -> None:
    own = egress_policy(ADAPTER_OBJ, EGRESS)
    objs: dict[str | None, dict[str, Any] | None] = {
        None: None,
        "own": own,
        # What the API server returns: `egress` dropped when empty.
        "own-cleared": {**own, "spec": {k: v for k, v in own["spec"].items() if k != "egress"}},
        "own-old-rules": {**own, "spec": {**own["spec"], "egress": own["spec"]["egress"][:1]}},
        "foreign": {
            "metadata": {"name": own["metadata"]["name"], "labels": {"team": "net"}},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]},
        },
    }
    assert egress_policy_action(objs[existing], ADAPTER_OBJ, spec) == action


def test_every_adapter_policy_also_reaches_the_evidence_store() -> None:
    store = {"to": [{"ipBlock": {"cidr": "10.213.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 8081}]}  # fmt: skip
    policy = egress_policy(ADAPTER_OBJ, EGRESS, [store])
    assert policy["spec"]["egress"][-1] == store and len(policy["spec"]["egress"]) == 3
    # a policy made before the store was listed is brought up to date
    old = egress_policy(ADAPTER_OBJ, EGRESS)
    assert egress_policy_action(old, ADAPTER_OBJ, EGRESS, [store]) == "patch"
    assert egress_policy_action(policy, ADAPTER_OBJ, EGRESS, [store]) == "none"
    # no rules of its own: still no policy (the pods are not selected, nothing is denied)
    assert egress_policy(ADAPTER_OBJ, NO_EGRESS, [store])["spec"]["egress"] == []
    assert egress_policy_action(None, ADAPTER_OBJ, NO_EGRESS, [store]) == "none"


def test_the_operator_masks_what_it_knows_of_an_adapters_secrets() -> None:
    from core.kube.redactors import operator_redactor
    from core.models import GateCheck

    spec = AdapterResourceSpec.model_validate(
        {
            "kind": "process",
            "template": "claude-code",
            "env": [
                {"name": "ANTHROPIC_API_KEY", "secretKeyRef": {"name": "keys", "key": "k"}},
                {"name": "SERVICE_TOKEN", "value": "literal-token-123"},
                {"name": "MODE", "value": "fast-mode-value"},
            ],
        }
    )
    check = GateCheck(name="unit", command=["true"], env={"DB_PASSWORD": "hunter2hunter2"})
    redact = operator_redactor(spec, [check])
    text = "token literal-token-123 pw hunter2hunter2 mode fast-mode-value key sk-" + "a" * 30
    masked = redact(text)
    assert "literal-token-123" not in masked and "[REDACTED:SERVICE_TOKEN]" in masked
    assert "hunter2hunter2" not in masked and "[REDACTED:DB_PASSWORD]" in masked
    assert "fast-mode-value" in masked  # not a secret by its name
    assert "sk-aaaa" not in masked  # a credential shape, whoever printed it
    # a Secret's value is known to the operator by reference only: the runner masks it
    assert {name for name, _ in operator_redactor(spec).pairs} == {"SERVICE_TOKEN"}

"""The generated CRDs on a real API server: they apply (CEL cost within budget), they refuse
every bad object of tests/api_cases.py at the field the models name, and they accept the
good ones, the quickstart example, the chart's sample Adapters and the e2e tests' Adapters.

The cluster is shared (other sessions apply ``crds/`` and run the operator), so the refusal
tests install the very same CRDs under a group, kind and plural of their own (no short
names or categories, so ``kubectl get tex`` elsewhere never resolves to them) and remove
them afterwards. ``crds/`` and the chart's copies are proven with a server-side dry run.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from core.crd import adapter_crd, task_execution_crd
from core.resources import VERSION
from tests.api_cases import BAD, GOOD, Case
from tests.e2e.operator_harness import ROOT, adapter, task_execution

pytestmark = pytest.mark.cluster

NOT_CHECKED = "some validation rules were not checked"


class PrivateCrds:
    """The generated CRDs under a private group (see the module docstring)."""

    def __init__(self, api: Any, suffix: str) -> None:
        from kubernetes import client

        self.ext = client.ApiextensionsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.group = f"crdcheck-{suffix}.orchestrator.dev"
        self.kinds: dict[str, tuple[str, str]] = {}  # kind -> (private kind, plural)
        self.crds = [self._renamed(c, suffix) for c in (task_execution_crd(), adapter_crd())]

    def _renamed(self, crd: dict[str, Any], suffix: str) -> dict[str, Any]:
        crd = copy.deepcopy(crd)
        names = crd["spec"]["names"]
        kind = f"{names['kind']}Check{suffix.capitalize()}"
        plural = kind.lower() + "s"
        self.kinds[names["kind"]] = (kind, plural)
        crd["spec"]["group"] = self.group
        crd["spec"]["names"] = {
            "kind": kind,
            "listKind": f"{kind}List",
            "plural": plural,
            "singular": kind.lower(),
        }
        crd["metadata"]["name"] = f"{plural}.{self.group}"
        return crd

    def install(self) -> None:
        for crd in self.crds:
            self.ext.create_custom_resource_definition(crd)
        deadline = time.monotonic() + 60
        for crd in self.crds:
            while True:
                got = self.ext.read_custom_resource_definition(crd["metadata"]["name"])
                conditions = {c.type: c.status for c in got.status.conditions or []}
                if conditions.get("Established") == "True":
                    break
                assert time.monotonic() < deadline, f"{crd['metadata']['name']}: {conditions}"
                time.sleep(0.5)

    def remove(self) -> None:
        for crd in self.crds:
            self.ext.delete_custom_resource_definition(crd["metadata"]["name"])

    def create(
        self, obj: dict[str, Any], namespace: str, *, dry_run: bool = True
    ) -> list[tuple[str, str]]:
        """Create ``obj`` (its kind mapped to ours); the refusal's (field, message) causes."""
        from kubernetes.client import ApiException

        kind, plural = self.kinds[obj["kind"]]
        body = {**copy.deepcopy(obj), "apiVersion": f"{self.group}/{VERSION}", "kind": kind}
        try:
            self.custom.create_namespaced_custom_object(
                self.group, VERSION, namespace, plural, body, dry_run="All" if dry_run else None
            )
        except ApiException as exc:
            assert exc.status == 422, (exc.status, exc.body)
            details = json.loads(exc.body).get("details") or {}
            causes = [(c.get("field", ""), c.get("message", "")) for c in details["causes"]]
            return [c for c in causes if NOT_CHECKED not in c[1]]
        return []


@pytest.fixture(scope="module")
def crds(kube_api: Any) -> Iterator[PrivateCrds]:
    private = PrivateCrds(kube_api, uuid.uuid4().hex[:8])
    private.install()
    try:
        yield private
    finally:
        private.remove()


@pytest.fixture(scope="module")
def namespace(kube_api: Any) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"e2e-crd-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


def test_the_generated_crds_apply_to_the_real_api_server(kubectl: Callable[..., Any]) -> None:
    """CEL rules over the cost budget, a bad fieldPath or a non-structural schema: refused."""
    for directory in ("crds", "charts/orchestrator/crds"):
        out = kubectl(
            "apply", "--server-side", "--force-conflicts", "--dry-run=server",
            "-f", str(ROOT / directory), check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "taskexecutions.orchestrator.dev serverside-applied" in out.stdout


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_objects_are_refused_at_the_field(
    crds: PrivateCrds, namespace: str, case: Case
) -> None:
    causes = crds.create(case.body(), namespace)
    assert causes, f"{case.id}: accepted"
    assert {field for field, _ in causes} == {case.field}, causes  # there and only there
    assert any(case.says.lower() in message.lower() for _, message in causes), causes


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_good_objects_are_accepted(crds: PrivateCrds, namespace: str, case: Case) -> None:
    assert crds.create(case.body(), namespace) == []


def test_examples_and_the_charts_sample_adapters_are_accepted(
    crds: PrivateCrds, namespace: str
) -> None:
    from tests.unit.test_chart import OPTIONS, render

    objects = [
        d
        for d in yaml.safe_load_all((ROOT / "examples/taskexecution.yaml").read_text())
        if d and d["kind"] in ("TaskExecution", "Adapter")
    ]
    for option in ("default", "ai-adapters"):
        objects += [d for d in render(OPTIONS[option]) if d["kind"] == "Adapter"]
    from tests.e2e.test_operator import SLEEP_THEN_WRITE, SLOW

    objects += [
        adapter("patch", "patch", egress=[{"cidr": "10.0.0.7/32", "ports": [9418]}]),
        adapter("slow", "process", command=["{python}", "-c", SLOW]),
        adapter("sleepy", "process", command=["{python}", "-c", SLEEP_THEN_WRITE.format(n=12)]),
        task_execution("add-multiply", "git://10.0.0.7:9418/calc.git", "patch"),
    ]
    kinds = sorted({(o["kind"], o["metadata"]["name"]) for o in objects})
    assert ("Adapter", "aider") in kinds and ("Adapter", "script") in kinds, kinds
    for obj in objects:
        obj = copy.deepcopy(obj)
        obj["metadata"].pop("namespace", None)
        assert crds.create(obj, namespace) == [], obj["metadata"]["name"]


def test_a_task_executions_spec_cannot_change(crds: PrivateCrds, namespace: str) -> None:
    from kubernetes.client import ApiException

    obj = Case("immutable", "TaskExecution", {}).body()
    assert crds.create(obj, namespace, dry_run=False) == []
    _, plural = crds.kinds["TaskExecution"]
    with pytest.raises(ApiException) as exc:
        crds.custom.patch_namespaced_custom_object(
            crds.group, VERSION, namespace, plural, obj["metadata"]["name"],
            {"spec": {"timeoutSeconds": 900}},
        )  # fmt: skip
    assert exc.value.status == 422
    assert "spec is immutable" in json.loads(exc.value.body)["message"]

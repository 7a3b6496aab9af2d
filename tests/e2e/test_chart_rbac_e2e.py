"""The chart's RBAC on a real API server: with watch.namespaces the operator's ServiceAccount may
do its calls in each served namespace and nothing namespaced anywhere else.

The chart is rendered with two served namespaces; its ServiceAccount, Roles, RoleBindings,
ClusterRole, ClusterRoleBinding and NetworkPolicies are applied as `helm install` would. The
API server's authorizer is then asked (SubjectAccessReview, what `kubectl auth can-i --as`
does), and real requests are made as the ServiceAccount (impersonation): refused with 403
outside the served namespaces, accepted inside.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.unit.test_chart import CHART, helm

pytestmark = pytest.mark.cluster

KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
         "NetworkPolicy")  # fmt: skip


@pytest.fixture
def served(kubectl, kube_api, kube_namespace) -> Iterator[dict[str, Any]]:
    """Release namespace = kube_namespace; served: two fresh ones; plus one not served."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    suffix = uuid.uuid4().hex[:6]
    extra = [f"e2e-rbac-{n}-{suffix}" for n in ("a", "b", "x")]
    for name in extra:
        core.create_namespace(
            client.V1Namespace(
                metadata=client.V1ObjectMeta(name=name, labels={"e2e": "orchestrator"})
            )
        )
    release = f"rbac{suffix}"
    out = helm("template", release, str(CHART), "--namespace", kube_namespace,
               values={"watch": {"namespaces": extra[:2]}})  # fmt: skip
    assert out.returncode == 0, out.stderr
    objs = [o for o in yaml.safe_load_all(out.stdout) if o and o["kind"] in KINDS]
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    kubectl("apply", "-f", "-", input=body)
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]["name"]
    try:
        yield {
            "release_ns": kube_namespace,
            "a": extra[0],
            "b": extra[1],
            "x": extra[2],
            "user": f"system:serviceaccount:{kube_namespace}:{sa}",
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{kube_namespace}",
                "system:authenticated",
            ],
        }
    finally:
        kubectl("delete", "-f", "-", "--wait=false", input=body, check=False)
        for name in extra:
            core.delete_namespace(name, propagation_policy="Background")


def _allowed(kube_api: Any, who: dict[str, Any], verb: str, resource: str, namespace: str | None,
             group: str = "", subresource: str = "") -> bool:  # fmt: skip
    from kubernetes import client

    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=who["user"],
            groups=who["groups"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=resource, subresource=subresource or None,
                namespace=namespace,
            ),
        )
    )  # fmt: skip
    out = client.AuthorizationV1Api(kube_api).create_subject_access_review(review)
    return bool(out.status.allowed)


def test_the_operator_may_act_only_in_its_served_namespaces(kube_api, served) -> None:
    def ask(verb: str, res: str, ns: str | None, group: str = "", sub: str = "") -> bool:
        return _allowed(kube_api, served, verb, res, ns, group, sub)

    a, b, x, home = served["a"], served["b"], served["x"], served["release_ns"]
    for ns in (a, b):
        assert ask("create", "jobs", ns, "batch")
        assert ask("get", "pods", ns, "", "log")
        assert ask("create", "configmaps", ns)
        assert ask("get", "configmaps", ns)
        assert ask("create", "networkpolicies", ns, "networking.k8s.io")
        assert ask("patch", "networkpolicies", ns, "networking.k8s.io")
        assert ask("list", "taskexecutions", ns, "orchestrator.dev")
        assert ask("patch", "taskexecutions", ns, "orchestrator.dev", "status")
        assert ask("create", "events", ns)
    assert ask("list", "namespaces", None)  # kopf's observation, cluster-scoped
    assert ask("list", "customresourcedefinitions", None, "apiextensions.k8s.io")
    # Nothing namespaced outside the served namespaces (the release's own included) ...
    for ns in (x, home):
        assert not ask("create", "jobs", ns, "batch")
        assert not ask("get", "pods", ns, "", "log")
        assert not ask("get", "configmaps", ns)
        assert not ask("list", "configmaps", ns)
        assert not ask("create", "networkpolicies", ns, "networking.k8s.io")
        assert not ask("patch", "networkpolicies", ns, "networking.k8s.io")
        assert not ask("list", "taskexecutions", ns, "orchestrator.dev")
    # ... nothing cluster-wide ...
    assert not ask("create", "jobs", None, "batch")
    assert not ask("list", "configmaps", None)
    assert not ask("get", "pods", None, "", "log")
    assert not ask("patch", "networkpolicies", None, "networking.k8s.io")
    assert not ask("list", "taskexecutions", None, "orchestrator.dev")
    # ... and nothing beyond its calls where it is served.
    for verb, res, group in (
        ("get", "secrets", ""),
        ("list", "secrets", ""),
        ("create", "pods", ""),
        ("delete", "jobs", "batch"),
        ("delete", "networkpolicies", "networking.k8s.io"),
        ("create", "rolebindings", "rbac.authorization.k8s.io"),
        ("create", "serviceaccounts", ""),
    ):
        assert not ask(verb, res, a, group), (verb, res)


def test_requests_as_the_operator_are_refused_outside_its_namespaces(kube_api, served) -> None:
    """Real calls as the ServiceAccount (impersonated): 403 outside, accepted inside."""
    from kubernetes import client

    api = client.ApiClient(kube_api.configuration)
    api.set_default_header("Impersonate-User", served["user"])
    try:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        net = client.NetworkingV1Api(api)
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "forbidden"},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "c", "image": "localhost/none", "command": ["true"]}]}}},
        }  # fmt: skip
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "orchestrator-adapter-x"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]},
        }
        denied = {
            "create job": lambda ns: batch.create_namespaced_job(ns, job, dry_run="All"),
            "list configmaps": lambda ns: core.list_namespaced_config_map(ns),
            "read pod log": lambda ns: core.read_namespaced_pod_log("any", ns),
            "create networkpolicy": lambda ns: net.create_namespaced_network_policy(
                ns, policy, dry_run="All"
            ),
            "list secrets": lambda ns: core.list_namespaced_secret(ns),
        }
        for ns in (served["x"], served["release_ns"]):
            for what, call in denied.items():
                with pytest.raises(client.ApiException) as err:
                    call(ns)
                assert err.value.status == 403, (what, ns, err.value.status)
        # Where it is served the same calls go through (dry run: nothing is created); a
        # secret stays out of reach there too.
        a = served["a"]
        batch.create_namespaced_job(a, job, dry_run="All")
        net.create_namespaced_network_policy(a, policy, dry_run="All")
        core.create_namespaced_config_map(a, {"metadata": {"name": "p"}}, dry_run="All")
        with pytest.raises(client.ApiException) as err:
            core.list_namespaced_secret(a)
        assert err.value.status == 403
        # The default-deny runner policy was installed in each served namespace.
        admin = client.NetworkingV1Api(kube_api)
        for ns in (served["a"], served["b"]):
            names = [p.metadata.name for p in admin.list_namespaced_network_policy(ns).items]
            assert any(n.endswith("-runner") for n in names), (ns, names)
    finally:
        api.close()

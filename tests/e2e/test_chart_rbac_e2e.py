"""The chart's RBAC on a real API server: the operator's ServiceAccount may make exactly its
calls (core/kube/permissions.py, which a unit test derives from the code), where they are
needed, and nothing else.

The chart is rendered with two served namespaces; its ServiceAccount, Roles, RoleBindings and
NetworkPolicies are applied as `helm install` would. The API server's authorizer is then asked
(SubjectAccessReview, what `kubectl auth can-i --as` does) about every verb of every resource
in the table, in every namespace and cluster-wide, and real requests are made as the
ServiceAccount (impersonation): 403 where the operator has no business, accepted where it
has. The Lease of leader election: get/update of its one name and create, only in the
release namespace (with operator.shards=S: of its S shard and S member Leases too, by name);
the local evidence store: get of the operator's own Service, only there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from core.kube.permissions import PERMISSIONS, grants
from tests.unit.test_chart import CHART, helm

pytestmark = pytest.mark.cluster

KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
         "NetworkPolicy")  # fmt: skip
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
#: Resources the operator never touches at all (beyond its table): each verb refused anywhere.
NEVER = (
    ("", "secrets"),
    ("", "serviceaccounts"),
    ("", "serviceaccounts/token"),
    ("", "pods/exec"),
    ("", "pods/attach"),
    ("", "pods/portforward"),
    ("", "services"),
    ("", "persistentvolumeclaims"),
    ("apps", "deployments"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
    ("orchestrator.dev", "taskexecutions/finalizers"),
)


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
    assert not [o for o in objs if o["kind"].startswith("Cluster")]  # nothing cluster-wide
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    kubectl("apply", "-f", "-", input=body)
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]["name"]
    try:
        yield {
            "release_ns": kube_namespace,
            "a": extra[0],
            "b": extra[1],
            "x": extra[2],
            "lease": f"{release}-orchestrator",
            "service": f"{release}-orchestrator",  # the evidence store's Service
            **_as_service_account(kube_namespace, sa),
        }
    finally:
        kubectl("delete", "-f", "-", "--wait=false", input=body, check=False)
        for name in extra:
            core.delete_namespace(name, propagation_policy="Background")


def _as_service_account(namespace: str, name: str) -> dict[str, Any]:
    """The user and groups the API server authenticates a ServiceAccount's token as."""
    return {
        "user": f"system:serviceaccount:{namespace}:{name}",
        "groups": [
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        ],
    }


def _allowed(kube_api: Any, who: dict[str, Any], verb: str, group: str, resource: str,
             namespace: str | None, name: str | None = None) -> bool:  # fmt: skip
    from kubernetes import client

    res, _, sub = resource.partition("/")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=who["user"],
            groups=who["groups"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=res, subresource=sub or None,
                namespace=namespace, name=name,
            ),
        )
    )  # fmt: skip
    out = client.AuthorizationV1Api(kube_api).create_subject_access_review(review)
    return bool(out.status.allowed)


def test_the_operator_may_make_exactly_its_calls_and_only_where_they_belong(
    kube_api, served
) -> None:
    def ask(verb: str, group: str, res: str, ns: str | None, name: str | None = None) -> bool:
        return _allowed(kube_api, served, verb, group, res, ns, name)

    a, b, x, home, lease = served["a"], served["b"], served["x"], served["release_ns"], served["lease"]
    table = {(p.group, p.resource) for p in PERMISSIONS if p.scope == "served"}
    wrong: list[str] = []

    def expect(allowed: bool, verb: str, group: str, res: str, ns: str | None,
               name: str | None = None) -> None:  # fmt: skip
        if ask(verb, group, res, ns, name) != allowed:
            where = ns or "cluster-wide"
            wrong.append(f"{'refused' if allowed else 'allowed'}: {verb} {group}/{res} {name or ''} in {where}")

    # Served namespaces: every verb of the table, and no other verb of those resources.
    for ns in (a, b):
        for group, res in sorted(table):
            for verb in VERBS:
                expect((group, res, verb) in grants("served"), verb, group, res, ns)
    # Nothing of it anywhere else: the release namespace, a namespace not served, the cluster.
    for ns in (home, x, None):
        for group, res in sorted(table):
            for verb in VERBS:
                expect(False, verb, group, res, ns)
    # Resources outside the table: refused everywhere.
    for ns in (a, home, None):
        for group, res in NEVER:
            for verb in VERBS:
                expect(False, verb, group, res, ns)
    # kopf's cluster scanning is off: no namespaces, CRDs or nodes to read.
    for group, res in (("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions"),
                       ("", "nodes")):  # fmt: skip
        for verb in ("get", "list", "watch"):
            expect(False, verb, group, res, None)
    # The Lease: get/update of its one name and create, in the release namespace only. A
    # create is allowed whatever the name (RBAC cannot limit a create by name: documented).
    leases = ("coordination.k8s.io", "leases")
    for verb in VERBS:
        expect(verb in ("get", "update", "create"), verb, *leases, home, lease)
        expect(verb == "create", verb, *leases, home)
        expect(verb == "create", verb, *leases, home, "someone-elses-lease")
        for ns in (a, b, x, None):
            expect(False, verb, *leases, ns, lease)
            expect(False, verb, *leases, ns)
    # The local evidence store: get of the operator's own Service (its ClusterIP is the
    # runner pods' upload address), in the release namespace only; no other Service.
    for verb in VERBS:
        expect(verb == "get", verb, "", "services", home, served["service"])
        expect(False, verb, "", "services", home, "kubernetes")
        for ns in (a, x, None):
            expect(False, verb, "", "services", ns, served["service"])
    assert wrong == []


def test_requests_as_the_operator_are_refused_where_it_has_no_business(kube_api, served) -> None:
    """Real calls as the ServiceAccount (impersonated): 403 outside its calls and namespaces,
    accepted inside."""
    from kubernetes import client

    api = client.ApiClient(kube_api.configuration)
    api.set_default_header("Impersonate-User", served["user"])
    try:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        net, coord = client.NetworkingV1Api(api), client.CoordinationV1Api(api)
        custom = client.CustomObjectsApi(api)
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
        pod = {"metadata": {"name": "p"},
               "spec": {"containers": [{"name": "c", "image": "localhost/none"}]}}  # fmt: skip
        lease_body = {"metadata": {"name": served["lease"]}, "spec": {"holderIdentity": "e2e"}}
        outside = {
            "create job": lambda ns: batch.create_namespaced_job(ns, job, dry_run="All"),
            "list configmaps": lambda ns: core.list_namespaced_config_map(ns),
            "read pod log": lambda ns: core.read_namespaced_pod_log("any", ns),
            "create networkpolicy": lambda ns: net.create_namespaced_network_policy(
                ns, policy, dry_run="All"
            ),
            "list secrets": lambda ns: core.list_namespaced_secret(ns),
            "list taskexecutions": lambda ns: custom.list_namespaced_custom_object(
                "orchestrator.dev", "v1alpha1", ns, "taskexecutions"
            ),
        }
        a, home = served["a"], served["release_ns"]
        for ns in (served["x"], home):
            for what, call in outside.items():
                with pytest.raises(client.ApiException) as err:
                    call(ns)
                assert err.value.status == 403, (what, ns, err.value.status)
        # A Lease anywhere but the release namespace is refused.
        for ns in (a, served["x"]):
            with pytest.raises(client.ApiException) as err:
                coord.create_namespaced_lease(ns, lease_body, dry_run="All")
            assert err.value.status == 403, ns
        # Where it is served, its calls go through (dry run: nothing is created) ...
        batch.create_namespaced_job(a, job, dry_run="All")
        net.create_namespaced_network_policy(a, policy, dry_run="All")
        custom.list_namespaced_custom_object("orchestrator.dev", "v1alpha1", a, "taskexecutions")
        # a Job's TTL may be shortened (authorized: 404, there is no such Job)
        with pytest.raises(client.ApiException) as err:
            batch.patch_namespaced_job("forbidden", a, {"spec": {"ttlSecondsAfterFinished": 1}})
        assert err.value.status == 404
        core.create_namespaced_config_map(a, {"metadata": {"name": "p"}}, dry_run="All")
        # ... and nothing beyond them: no secrets (a patch a task names in one is mounted by
        # the kubelet), no deleting ConfigMaps or NetworkPolicies, no replacing a Job or
        # changing a TaskExecution's spec, no pods of its own, no pod listing cluster-wide.
        denied = {
            "list secrets": lambda: core.list_namespaced_secret(a),
            "delete configmap": lambda: core.delete_namespaced_config_map("p", a, dry_run="All"),
            "delete networkpolicy": lambda: net.delete_namespaced_network_policy(
                "orchestrator-adapter-x", a, dry_run="All"
            ),
            "replace job": lambda: batch.replace_namespaced_job("forbidden", a, job),
            "patch taskexecution": lambda: custom.patch_namespaced_custom_object(
                "orchestrator.dev", "v1alpha1", a, "taskexecutions", "t", {"spec": {}}
            ),
            "create pod": lambda: core.create_namespaced_pod(a, pod, dry_run="All"),
            "list pods cluster-wide": lambda: core.list_pod_for_all_namespaces(),
        }
        for what, call in denied.items():
            with pytest.raises(client.ApiException) as err:
                call()
            assert err.value.status == 403, (what, err.value.status)
        # Leader election for real, in the release namespace: create, read and renew its own
        # Lease; another Lease can be neither read nor listed nor deleted.
        made = coord.create_namespaced_lease(home, lease_body)
        assert made.spec.holder_identity == "e2e"
        got = coord.read_namespaced_lease(served["lease"], home)
        got.spec.holder_identity = "e2e-renewed"
        assert coord.replace_namespaced_lease(served["lease"], home, got).spec.holder_identity == (
            "e2e-renewed"
        )
        for what, call in {
            "read another lease": lambda: coord.read_namespaced_lease("kube-like", home),
            "list leases": lambda: coord.list_namespaced_lease(home),
            "delete its lease": lambda: coord.delete_namespaced_lease(served["lease"], home),
            "patch its lease": lambda: coord.patch_namespaced_lease(
                served["lease"], home, {"spec": {"holderIdentity": "x"}}
            ),
        }.items():
            with pytest.raises(client.ApiException) as err:
                call()
            assert err.value.status == 403, (what, err.value.status)
        # The default-deny runner policy was installed in each served namespace.
        admin = client.NetworkingV1Api(kube_api)
        for ns in (served["a"], served["b"]):
            names = [p.metadata.name for p in admin.list_namespaced_network_policy(ns).items]
            assert any(n.endswith("-runner") for n in names), (ns, names)
    finally:
        api.close()


SHARDS = 3


@pytest.fixture
def sharded(kubectl, kube_namespace) -> Iterator[dict[str, Any]]:
    """The chart with operator.shards=3, its ServiceAccount, Roles and RoleBindings applied in
    the release namespace (= kube_namespace, also the one served)."""
    release = f"shards{uuid.uuid4().hex[:6]}"
    out = helm("template", release, str(CHART), "--namespace", kube_namespace,
               values={"operator": {"shards": SHARDS}})  # fmt: skip
    assert out.returncode == 0, out.stderr
    objs = [o for o in yaml.safe_load_all(out.stdout) if o and o["kind"] in KINDS]
    assert not [o for o in objs if o["kind"].startswith("Cluster")]
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    kubectl("apply", "-f", "-", input=body)
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]["name"]
    try:
        yield {
            "release_ns": kube_namespace,
            "lease": f"{release}-orchestrator",
            **_as_service_account(kube_namespace, sa),
        }
    finally:
        kubectl("delete", "-f", "-", "--wait=false", input=body, check=False)


def test_a_sharded_operator_may_use_exactly_its_leases(kube_api, sharded) -> None:
    """operator.shards=S: get/update of the Lease, its S shard and S member Leases (the names
    core/kube/shards.py gives them), of no other Lease (not shard S, not member S); create of
    any (RBAC cannot limit a create by name); nothing else of Leases. Asked of the authorizer,
    then as real requests impersonating the ServiceAccount."""
    from kubernetes import client

    from core.kube.shards import member_lease, shard_lease

    home, lease = sharded["release_ns"], sharded["lease"]
    ours = [lease, *(shard_lease(lease, i) for i in range(SHARDS)),
            *(member_lease(lease, k) for k in range(SHARDS))]  # fmt: skip
    others = [shard_lease(lease, SHARDS), member_lease(lease, SHARDS), f"{lease}-shard",
              "someone-elses-lease"]  # fmt: skip
    leases = ("coordination.k8s.io", "leases")
    wrong: list[str] = []
    for verb in VERBS:
        for name in ours + others + [None]:
            allowed = verb == "create" or (verb in ("get", "update") and name in ours)
            if _allowed(kube_api, sharded, verb, *leases, home, name) != allowed:
                wrong.append(f"{'refused' if allowed else 'allowed'}: {verb} lease {name}")
    assert wrong == []

    api = client.ApiClient(kube_api.configuration)
    api.set_default_header("Impersonate-User", sharded["user"])
    try:
        coord = client.CoordinationV1Api(api)
        for name in (shard_lease(lease, 0), member_lease(lease, SHARDS - 1)):
            coord.create_namespaced_lease(
                home, {"metadata": {"name": name}, "spec": {"holderIdentity": "e2e"}}
            )
            got = coord.read_namespaced_lease(name, home)
            got.spec.holder_identity = "e2e-renewed"
            assert coord.replace_namespaced_lease(name, home, got).spec.holder_identity == (
                "e2e-renewed"
            )
        beyond = shard_lease(lease, SHARDS)
        coord.create_namespaced_lease(
            home, {"metadata": {"name": beyond}, "spec": {"holderIdentity": "e2e"}}
        )  # allowed: a create carries no name RBAC can check ...
        for what, call in {
            "read shard S": lambda: coord.read_namespaced_lease(beyond, home),  # ... the rest does
            "list leases": lambda: coord.list_namespaced_lease(home),
            "delete a shard lease": lambda: coord.delete_namespaced_lease(
                shard_lease(lease, 0), home
            ),
        }.items():
            with pytest.raises(client.ApiException) as err:
                call()
            assert err.value.status == 403, (what, err.value.status)
    finally:
        api.close()

"""Every Kubernetes API permission the operator needs, and why: the table its RBAC is held to.

Why a table in code: least privilege is only as good as its bookkeeping. The Helm chart's
Roles (charts/orchestrator/templates/rbac.yaml) must grant exactly these verbs, and the calls
themselves are derived from the code: ``tests/unit/test_operator_permissions.py`` finds every
:class:`~core.kube.api.KubeApi` call the operator's modules make, runs each through the real
client (:class:`~core.kube.client_api.ClientKubeApi`) and turns the HTTP requests into RBAC
verbs the way the API server's authorizer does (GET of a name: get, of a collection: list or
watch; POST create, PUT update, PATCH patch, DELETE delete; a 409 on create reads the object).
A new call without a line here fails that test; a line here the chart does not grant fails
``tests/unit/test_chart.py``; the e2e tests ask the real API server (403 for everything else).

Three scopes: ``served`` permissions go into a Role in each served namespace (the informers,
the Jobs and their pods, Events ...); ``lease`` permissions into a Role in the operator's own
namespace, for leader election (:mod:`core.kube.leader`); ``evidence`` into a Role there too,
when the operator serves the evidence store itself (``evidence.backend=local`` without a
configured URL): it reads its own Service's ClusterIP (``resourceNames``: the Service), the
address runner pods upload to. ``get`` and ``update`` of the Lease are limited to its name
(sharded, :mod:`core.kube.shards`: also the shard and member Leases, whose names are numbered,
so the chart lists them all); ``create`` cannot be (RBAC sees no name on a create), so it stays
a rule of its own.
Nothing is cluster-wide: kopf runs with its cluster scanning off (operator/handlers.py), and
its discovery reads (``/api``, ``/apis``) are open to every authenticated client (the default
``system:discovery`` ClusterRole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["served", "lease", "evidence"]
#: One permission as RBAC checks it: (API group, resource[/subresource], verb).
Grant = tuple[str, str, str]


@dataclass(frozen=True)
class Permission:
    group: str  # "" is the core group
    resource: str  # plural, with the subresource: "pods/log", "taskexecutions/status"
    verbs: tuple[str, ...]
    scope: Scope
    why: str

    def grants(self) -> frozenset[Grant]:
        return frozenset((self.group, self.resource, verb) for verb in self.verbs)


PERMISSIONS: tuple[Permission, ...] = (
    Permission(
        "orchestrator.dev",
        "taskexecutions",
        ("get", "list", "watch"),
        "served",
        "the informer lists and watches them; a status write refused with 409 reads the "
        "object again",
    ),
    Permission(
        "orchestrator.dev",
        "taskexecutions/status",
        ("patch",),
        "served",
        "the one status write path (merge patch with a resourceVersion precondition)",
    ),
    Permission(
        "orchestrator.dev",
        "adapters",
        ("get", "list", "watch"),
        "served",
        "the informer lists and watches them; an Adapter missing from the cache is read",
    ),
    Permission(
        "orchestrator.dev",
        "adapters/status",
        ("patch",),
        "served",
        "each Adapter's status mirrors its circuit breaker",
    ),
    Permission(
        "orchestrator.dev",
        "integrations",
        ("get", "list", "watch"),
        "served",
        "the informer lists and watches them (one per run: core/kube/integration_controller.py)",
    ),
    Permission(
        "orchestrator.dev",
        "integrations/status",
        ("patch",),
        "served",
        "each Integration's status mirrors the run's integration branch",
    ),
    Permission(
        "batch",
        "jobs",
        ("create", "get", "list", "watch", "patch", "delete"),
        "served",
        "one Job per attempt and role and per merged-tree gate run of an Integration (a 409 "
        "reads the existing one); the informer lists and watches only the operator's (label "
        "selector); patch: an attempt's Jobs get their short TTL once it is recorded; pending "
        "triage deletes a Job whose pod cannot start (uid precondition)",
    ),
    Permission("", "pods", ("list",), "served", "an attempt's pods, by the Job's label"),
    Permission("", "pods/log", ("get",), "served", "the runner's report is its pod's log"),
    Permission(
        "",
        "configmaps",
        ("create", "get"),
        "served",
        "an Integration's merged-tree gate run gets its request and merged diff in a "
        "ConfigMap (a 409 reads the existing one); a task's patch never does",
    ),
    Permission(
        "networking.k8s.io",
        "networkpolicies",
        ("create", "get", "patch"),
        "served",
        "each Adapter's egress policy (get: is the policy of that name the operator's own?)",
    ),
    Permission(
        "",
        "events",
        ("create",),
        "served",
        "TASK_STARTED, TASK_COMPLETED, TASK_FAILED, ...; ESCALATION (Warning) on the "
        "TaskExecution and the Adapter; INTEGRATION_* on the Integration",
    ),
    Permission(
        "",
        "services",
        ("get",),
        "evidence",
        "the local evidence store: its own Service's ClusterIP is the URL runner pods use "
        "(resourceNames: its name)",
    ),
    Permission(
        "coordination.k8s.io",
        "leases",
        ("get", "update"),
        "lease",
        "leader election: read and renew the operator's Lease, and with shards its shard "
        "and member Leases (resourceNames: their names)",
    ),
    Permission(
        "coordination.k8s.io",
        "leases",
        ("create",),
        "lease",
        "leader election: create the Lease(s) the first time (RBAC cannot limit a create by "
        "name)",
    ),
)


def grants(scope: Scope | None = None) -> frozenset[Grant]:
    """Every (group, resource, verb) of ``scope`` (None: both)."""
    out: set[Grant] = set()
    for permission in PERMISSIONS:
        if scope is None or permission.scope == scope:
            out |= permission.grants()
    return frozenset(out)

"""Job manifests for adapter and gate attempts, and each Adapter's egress policy.

Names are deterministic (TaskExecution uid + attempt + role), so a retried or replayed
reconcile creates the same object and a 409 means "already done". Pods run untrusted code:
no service-account token, non-root, no privilege escalation, all capabilities dropped,
RuntimeDefault seccomp, read-only root filesystem, resource limits from the Adapter, bounded
local disk (:class:`RunnerStorage`). The runner enforces the budget;
``activeDeadlineSeconds`` is only a backstop.

Bulk never goes into a manifest: the init container ``fetch`` downloads the runner request
(and a patch to apply) through the attempt's grant into the ``inputs`` emptyDir, which the
runner container mounts read-only (see :mod:`core.kube.attempt_io`). A patch the task
names in a ConfigMap or Secret is mounted by the kubelet (the operator never reads it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from kubernetes.utils import parse_quantity

from core.kube.queueing import QUEUE_LABEL
from core.resources import AdapterResourceSpec

Role = Literal["adapter", "gate"]
MANAGED_BY = "orchestrator"
LABEL_TE = "orchestrator.dev/taskexecution"
LABEL_RUN = "orchestrator.dev/run"
LABEL_TASK = "orchestrator.dev/task"
LABEL_ATTEMPT = "orchestrator.dev/attempt"
LABEL_ROLE = "orchestrator.dev/role"
LABEL_ADAPTER = "orchestrator.dev/adapter"
BACKSTOP_GRACE_SECONDS = 60
WORKDIR = "/work"
INPUTS_DIR = "/etc/orchestrator/inputs"
PATCH_SOURCE_DIR = "/etc/orchestrator/patch-source"
PATCH_SOURCE_FILE = f"{PATCH_SOURCE_DIR}/patch"
RUNNER_UID = 10001
#: The init container only downloads: small fixed resources.
FETCH_RESOURCES = {"cpu": "200m", "memory": "128Mi"}


#: Room in the inputs volume beyond the largest patch: the runner request (prompt up to its
#: 1 MiB limit, the task, the adapter) and filesystem overhead.
INPUTS_HEADROOM_BYTES = 16 * 1024 * 1024
#: Room for the containers' own logs and writable layers (the root filesystem is read-only;
#: the kubelet counts the container logs against the pod's ephemeral-storage limit).
LOGS_ALLOWANCE = "512Mi"


def quantity(value: str) -> Decimal:
    """A Kubernetes quantity ("2Gi", "500M", "1048576") as a number (ValueError if not one)."""
    return Decimal(parse_quantity(value))  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class RunnerStorage:
    """Local disk of a runner pod: each emptyDir's ``sizeLimit`` and the runner container's
    ``ephemeral-storage`` request and limit (Kubernetes quantities).

    Why: without limits, a task that writes without end (a log flood, a build filling
    ``/work``) fills the node's disk and gets *other* pods evicted for disk pressure. With
    them the kubelet evicts this pod alone, and :func:`core.kube.pods.storage_eviction`
    tells that apart from a platform eviction. ``inputs=None``: sized from the hard limit of
    a diff (:meth:`for_diff_limit`); ``ephemeral_limit=None``: the volumes' sum plus
    :data:`LOGS_ALLOWANCE`.
    """

    work: str = "2Gi"
    tmp: str = "1Gi"
    inputs: str | None = None
    ephemeral_request: str = "1Gi"
    ephemeral_limit: str | None = None

    @classmethod
    def for_diff_limit(
        cls,
        max_diff_bytes: int,
        *,
        work: str = "2Gi",
        tmp: str = "1Gi",
        inputs: str | None = None,
        ephemeral_request: str = "1Gi",
        ephemeral_limit: str | None = None,
    ) -> RunnerStorage:
        """The inputs volume holds the request and at most one patch of ``max_diff_bytes``."""
        return cls(
            work=work,
            tmp=tmp,
            inputs=inputs or str(max_diff_bytes + INPUTS_HEADROOM_BYTES),
            ephemeral_request=ephemeral_request,
            ephemeral_limit=ephemeral_limit,
        )

    @property
    def inputs_limit(self) -> str:
        return self.inputs or str(100 * 1024 * 1024 + INPUTS_HEADROOM_BYTES)

    @property
    def limit(self) -> str:
        """The container's ephemeral-storage limit (checked to be at least its request)."""
        if self.ephemeral_limit:
            return self.ephemeral_limit
        volumes = (self.work, self.tmp, self.inputs_limit, LOGS_ALLOWANCE)
        return str(int(sum(quantity(q) for q in volumes)))

    def validate(self) -> None:
        """Raise ValueError naming the bad quantity (at startup, not on every Job create)."""
        for name in ("work", "tmp", "inputs_limit", "ephemeral_request", "limit"):
            value = getattr(self, name)
            try:
                quantity(value)
            except ValueError as exc:
                raise ValueError(f"runner storage {name}: {value!r} is not a quantity") from exc
        if quantity(self.ephemeral_request) > quantity(self.limit):
            raise ValueError(
                f"runner ephemeral-storage request {self.ephemeral_request} exceeds its "
                f"limit {self.limit}"
            )


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(text: str) -> str:
    """``text`` as a label value: itself when it is one, else a cut that ends in a hash.

    The CRDs refuse TaskExecution and Adapter names that are not DNS labels, so for every
    object created since this is the identity and label selectors on the name work. It keeps
    an object stored before those rules (a 64+ character name whose 63rd character is '-')
    from turning into a label value the API server refuses with 422 on every Job create.
    """
    if len(text) <= 63 and _LABEL_VALUE.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[: 63 - 9].strip("-_.")
    return f"{head}-{digest}" if head else digest


def job_name(te_name: str, uid: str, attempt: int, role: Role) -> str:
    """<=63 chars, unique per TaskExecution object, attempt and role.

    The Job controller copies the name into its pods' ``job-name`` label, so it must also be
    a label value: the cut name never ends in '-' or '.', and the suffix is alphanumeric.
    """
    digest = hashlib.sha256(uid.encode()).hexdigest()[:8]
    suffix = f"{digest}-{attempt}{'a' if role == 'adapter' else 'g'}"
    head = te_name[: 62 - len(suffix)].rstrip("-.")
    return f"{head}-{suffix}" if head else suffix


def labels(te_name: str, run_id: str, task_id: str, attempt: int, role: Role) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "orchestrator-runner",
        LABEL_TE: label_value(te_name),
        LABEL_RUN: run_id,
        LABEL_TASK: task_id,
        LABEL_ATTEMPT: str(attempt),
        LABEL_ROLE: role,
    }


def owner_reference(te: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": te["apiVersion"],
        "kind": te["kind"],
        "name": te["metadata"]["name"],
        "uid": te["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }


def _env(adapter: AdapterResourceSpec | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    for var in adapter.env if adapter else []:
        if var.secret_key_ref is not None:
            ref = {"name": var.secret_key_ref.name, "key": var.secret_key_ref.key}
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": ref}})
        else:
            env.append({"name": var.name, "value": var.value or ""})
    return env


def job_manifest(
    *,
    te: dict[str, Any],
    name: str,
    role: Role,
    run_id: str,
    task_id: str,
    attempt: int,
    image: str,
    fetch_grant: str | None = None,
    runner_grant: str | None = None,
    deadline_seconds: float,
    adapter: AdapterResourceSpec | None,
    patch_source: dict[str, Any] | None = None,
    image_pull_policy: str = "IfNotPresent",
    adapter_name: str | None = None,
    storage: RunnerStorage | None = None,
    ttl_seconds_after_finished: int | None = None,
    inputs_configmap: str | None = None,
    queue_name: str | None = None,
) -> dict[str, Any]:
    """``fetch_grant`` / ``runner_grant``: the init container's and the runner's part of the
    attempt's grant (JSON); ``patch_source``: a volume source (``configMap`` or ``secret``
    with one item, path ``patch``) holding a patch the task names by reference;
    ``storage``: the emptyDirs' size limits and the runner container's ephemeral-storage
    (default :class:`RunnerStorage`'s); ``ttl_seconds_after_finished``: a backstop only,
    the operator shortens it once the attempt's evidence is recorded.

    ``inputs_configmap`` instead of the grants: a ConfigMap (keys ``request.json`` and
    ``patch``) mounted as the inputs directory, no fetch container and no uploads (the log
    stays in the pod log). Only an Integration's merged-tree gate runs use it, which keep
    their patch in a ConfigMap until they move to the evidence store.

    ``queue_name``: a Kueue LocalQueue: the Job is created suspended with Kueue's queue label
    (on the Job, not its pods), so it starts when Kueue admits it (:mod:`core.kube.queueing`)."""
    if (inputs_configmap is None) == (fetch_grant is None or runner_grant is None):
        raise ValueError("job_manifest: give fetch_grant and runner_grant, or inputs_configmap")
    disk = storage or RunnerStorage()
    res = adapter.resources if adapter else None
    limits = {"cpu": res.cpu if res else "1", "memory": res.memory if res else "1Gi"}
    requests = {**limits, "ephemeral-storage": disk.ephemeral_request}
    limits["ephemeral-storage"] = disk.limit
    volumes: list[dict[str, Any]] = [
        {"name": "work", "emptyDir": {"sizeLimit": disk.work}},
        {"name": "tmp", "emptyDir": {"sizeLimit": disk.tmp}},
        {"name": "inputs", "emptyDir": {"sizeLimit": disk.inputs_limit}}
        if inputs_configmap is None
        else {"name": "inputs", "configMap": {"name": inputs_configmap}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "work", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "inputs", "mountPath": INPUTS_DIR, "readOnly": True},
    ]
    if patch_source is not None:
        volumes.append({"name": "patch-source", **patch_source})
        mounts.append({"name": "patch-source", "mountPath": PATCH_SOURCE_DIR, "readOnly": True})
    security = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUNNER_UID,
        "runAsGroup": RUNNER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    fetch = {
        "name": "fetch",
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "command": ["python", "-m", "core.runner", "fetch"],
        "env": [
            {"name": "ORCHESTRATOR_GRANT", "value": fetch_grant},
            {"name": "ORCHESTRATOR_INPUTS", "value": INPUTS_DIR},
        ],
        "resources": {"requests": dict(FETCH_RESOURCES), "limits": dict(FETCH_RESOURCES)},
        "volumeMounts": [
            {"name": "inputs", "mountPath": INPUTS_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": security,
    }
    container = {
        "name": role,
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "command": ["python", "-m", "core.runner", role],
        "env": [
            {"name": "ORCHESTRATOR_REQUEST_FILE", "value": f"{INPUTS_DIR}/request.json"},
            *([{"name": "ORCHESTRATOR_GRANT", "value": runner_grant}] if runner_grant else []),
            {"name": "ORCHESTRATOR_WORKDIR", "value": WORKDIR},
            {"name": "HOME", "value": f"{WORKDIR}/home"},
            *(_env(adapter) if role == "adapter" else []),
        ],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "securityContext": security,
    }
    pod_labels = labels(te["metadata"]["name"], run_id, task_id, attempt, role)
    if adapter_name is not None and role == "adapter":
        # Selects the pod for its Adapter's egress policy. Gate pods never carry it: they run
        # the repository's own checks and get only the chart's runner policy (git server).
        pod_labels[LABEL_ADAPTER] = adapter_name
    ttl = (
        {}
        if ttl_seconds_after_finished is None
        else {"ttlSecondsAfterFinished": ttl_seconds_after_finished}
    )
    job_labels = dict(pod_labels)
    queue = {}
    if queue_name is not None:
        job_labels[QUEUE_LABEL] = queue_name
        queue = {"suspend": True}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": te["metadata"]["namespace"],
            "labels": job_labels,
            "ownerReferences": [owner_reference(te)],
        },
        "spec": {
            **ttl,
            **queue,
            "backoffLimit": 0,
            "activeDeadlineSeconds": max(1, int(deadline_seconds) + BACKSTOP_GRACE_SECONDS),
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUNNER_UID,
                        "runAsGroup": RUNNER_UID,
                        "fsGroup": RUNNER_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "initContainers": [] if inputs_configmap is not None else [fetch],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def patch_source_volume(
    kind: Literal["configMap", "secret"], name: str, key: str
) -> dict[str, Any]:
    """A volume source projecting one key of a ConfigMap or Secret as the file ``patch``."""
    items = [{"key": key, "path": "patch"}]
    if kind == "configMap":
        return {"configMap": {"name": name, "items": items}}
    return {"secret": {"secretName": name, "items": items}}


def job_finished(job: dict[str, Any]) -> str | None:
    """'Complete' / 'Failed' when the Job is done, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


def job_failure_reason(job: dict[str, Any]) -> str | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
    return None


def egress_policy_name(adapter_name: str) -> str:
    return f"orchestrator-adapter-{adapter_name}"[:253]


def egress_policy(
    adapter: dict[str, Any], spec: AdapterResourceSpec, extra: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A NetworkPolicy letting the Adapter's adapter pods reach what its ``spec.egress`` declares.

    NetworkPolicies add up: with the chart's default-deny policy for runner pods, this is the
    only extra way out for this Adapter's adapter pods; gate pods are never selected (role
    label). An empty ``spec.egress`` gives a policy without rules: it selects the pods and
    allows nothing more, which is how a cleared ``spec.egress`` takes the allowance back.
    The Adapter is its controller owner (garbage-collected with it), and the managed-by and
    adapter labels mark it as the operator's: see :func:`egress_policy_action`. ``extra``:
    rules every such policy carries (the evidence store the pods must reach, which a policy
    selecting them would otherwise deny where no chart policy admits it).
    """
    meta = adapter["metadata"]
    rules = []
    for rule in spec.egress:
        entry: dict[str, Any] = {"to": [{"ipBlock": {"cidr": rule.cidr}}]}
        if rule.ports:
            entry["ports"] = [{"protocol": "TCP", "port": p} for p in rule.ports]
        rules.append(entry)
    if rules:
        rules.extend(dict(rule) for rule in extra)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": egress_policy_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_ADAPTER: meta["name"]},
            "ownerReferences": [
                {
                    "apiVersion": adapter["apiVersion"],
                    "kind": adapter["kind"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_ADAPTER: meta["name"], LABEL_ROLE: "adapter"}},
            "policyTypes": ["Egress"],
            "egress": rules,
        },
    }


def is_own_egress_policy(policy: dict[str, Any], adapter: dict[str, Any]) -> bool:
    """True when ``policy`` is the one the operator made for this very Adapter object.

    Both marks are required: the managed-by label (the operator's) and a controller owner
    reference carrying the Adapter's uid (this Adapter, not an earlier one of the same name).
    A policy with the same name made by anyone else is foreign and never touched.
    """
    meta = policy.get("metadata") or {}
    if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") != MANAGED_BY:
        return False
    uid = adapter["metadata"]["uid"]
    return any(
        ref.get("uid") == uid and ref.get("kind") == adapter["kind"] and ref.get("controller")
        for ref in meta.get("ownerReferences") or []
    )


EgressAction = Literal["create", "patch", "none", "foreign"]


def egress_policy_action(
    existing: dict[str, Any] | None,
    adapter: dict[str, Any],
    spec: AdapterResourceSpec,
    extra: Sequence[dict[str, Any]] = (),
) -> EgressAction:
    """What the operator does with an Adapter's egress policy, given what the API server has.

    * no policy: ``create`` it when ``spec.egress`` has rules, else ``none``;
    * the operator's own policy (:func:`is_own_egress_policy`): ``patch`` its spec to the
      desired one (rules replaced; no rules when ``spec.egress`` was cleared), or ``none``
      when it already says that;
    * any other policy of that name: ``foreign``: leave it alone (report it, never
      overwrite it, also not after a 409 on create).
    """
    if existing is None:
        return "create" if spec.egress else "none"
    if not is_own_egress_policy(existing, adapter):
        return "foreign"
    desired = egress_policy(adapter, spec, extra)["spec"]
    current = existing.get("spec") or {}
    same = all(current.get(k) == desired[k] for k in ("podSelector", "policyTypes"))
    same = same and (current.get("egress") or []) == desired["egress"]
    return "none" if same else "patch"

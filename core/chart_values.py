"""The values of the Helm chart (``charts/orchestrator``) as a pydantic model.

``charts/orchestrator/values.schema.json`` is generated from :class:`ChartValues` by
``orchestrator schema generate`` (a unit test fails on drift), so ``helm install`` rejects a
mistyped key or a wrong type before anything reaches the cluster. ``values.yaml`` is written
by hand for its comments; a unit test checks that it equals the model's defaults.
Keys are camelCase, as in every Helm chart. Cross-field rules that JSON Schema cannot say
well (two replicas need PostgreSQL, an AI adapter needs an image and an API-key Secret) are
checked by the templates with ``fail``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from core.resources import Check, EgressRule, EnvVar, Resources
from core.rules import without_kubernetes_keys

VALUES_SCHEMA_PATH = "charts/orchestrator/values.schema.json"


class _Values(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _restricted_pod() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted_container() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


class Image(_Values):
    repository: str = Field(default="orchestrator", description="Image of the project.")
    tag: str = Field(default="", description="Default: the chart's appVersion.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class RunnerStorage(_Values):
    """Local disk of adapter and gate pods (Kubernetes quantities, e.g. 2Gi)."""

    work_size_limit: str = Field(default="2Gi", description="sizeLimit of the /work emptyDir.")
    tmp_size_limit: str = Field(default="1Gi", description="sizeLimit of the /tmp emptyDir.")
    inputs_size_limit: str = Field(
        default="",
        description="sizeLimit of the inputs emptyDir (runner request and patch). Empty: "
        "operator.maxDiffBytes + 16Mi.",
    )
    ephemeral_storage_request: str = Field(
        default="1Gi", description="ephemeral-storage request of the runner container."
    )
    ephemeral_storage_limit: str = Field(
        default="",
        description="ephemeral-storage limit of the runner container. Empty: the three size "
        "limits plus 512Mi for logs. A pod over a limit is evicted by the kubelet and its "
        "attempt fails as adapter_error.",
    )


class Runner(_Values):
    image: str = Field(
        default="",
        description="Image of adapter and gate pods (must contain the runner). Default: image.",
    )
    pull_policy: Literal["", "Always", "IfNotPresent", "Never"] = Field(
        default="", description="Default: image.pullPolicy."
    )
    storage: RunnerStorage = Field(default_factory=RunnerStorage)


class Watch(_Values):
    all_namespaces: bool = Field(
        default=False,
        description="Removed; must stay false (the chart refuses true): it granted cluster-wide "
        "Job creation, NetworkPolicy writes and reads of every ConfigMap and pod log. List the "
        "namespaces in watch.namespaces.",
    )
    namespace: str = Field(
        default="",
        description="The one namespace served when watch.namespaces is empty; default: release's.",
    )
    namespaces: list[str] = Field(
        default_factory=list,
        description="The namespaces served; each gets a Role, RoleBinding, the default-deny "
        "runner NetworkPolicy and the sample Adapters. Nothing namespaced is granted elsewhere.",
    )


class LeaderElection(_Values):
    enabled: bool = Field(
        default=True,
        description="Work only while holding a Lease in the release namespace (one active "
        "replica; required for replicaCount >= 2).",
    )
    lease_name: str = Field(default="", description="Name of the Lease; default: fullname.")
    lease_duration_seconds: float = Field(
        default=15,
        gt=0,
        description="A standby takes over a Lease not renewed for this long (its own clock).",
    )
    renew_deadline_seconds: float = Field(
        default=10,
        gt=0,
        description="The leader stops working when it could not renew for this long "
        "(< leaseDurationSeconds).",
    )
    retry_period_seconds: float = Field(
        default=2, gt=0, description="How often the leader renews and a standby tries."
    )


class Operator(_Values):
    resync_seconds: float = Field(
        default=30, gt=0, description="Every unfinished TaskExecution is looked at this often."
    )
    workers: int = Field(default=4, ge=1, le=64, description="TaskExecutions reconciled at once.")
    shards: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Horizontal shards (ORCHESTRATOR_SHARDS): 0, one Lease and one active "
        "replica; S > 0, the TaskExecutions cut into S shards, each its own Lease "
        "'<leaseName>-shard-<i>', spread over the replicas (member Leases "
        "'<leaseName>-member-<k>', k < S; replicas beyond S stand by). Needs "
        "leaderElection.enabled; two or more replicas need what replicaCount >= 2 needs.",
    )
    max_diff_bytes: int = Field(
        default=100 * 1024 * 1024,
        gt=0,
        description="Hard limit of a diff (kept whole in the evidence store; over it the "
        "attempt fails as diff_too_large).",
    )
    job_ttl_seconds: int = Field(
        default=300,
        ge=0,
        description="A finished Job's ttlSecondsAfterFinished once its attempt is recorded.",
    )
    log_format: Literal["plain", "full", "json"] = "plain"
    verbose: bool = Field(default=False, description="kopf --verbose.")
    health_port: int = Field(default=8080, ge=1, le=65535, description="kopf's /healthz.")
    extra_env: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra env entries of the operator container."
    )


class SecretKey(_Values):
    name: str = Field(default="", description="Secret name.")
    key: str = Field(default="", description="Key in the Secret.")


class PostgreSQL(_Values):
    url_secret: SecretKey = Field(
        default_factory=lambda: SecretKey(key="url"),
        description="Secret holding the SQLAlchemy URL, e.g. postgresql://user:pw@host:5432/db.",
    )


class S3(_Values):
    endpoint: str = Field(default="", description="Endpoint URL; empty: AWS S3.")
    public_endpoint: str = Field(
        default="",
        description="The endpoint as runner pods reach it (grants are signed for this host); "
        "default: endpoint.",
    )
    bucket: str = Field(default="", description="The bucket (must exist).")
    prefix: str = Field(default="", description="Key prefix inside the bucket.")
    region: str = "us-east-1"
    credentials_secret: SecretKey = Field(
        default_factory=SecretKey,
        description="Secret with keys access-key-id and secret-access-key (the key field is "
        "unused); empty: the pod's own identity (IRSA, instance role).",
    )
    temporary_days: int = Field(
        default=8, ge=1, description="Lifecycle rule: expire requests/ and incoming/ after."
    )
    patch_days: int | None = Field(
        default=None, ge=1, description="Lifecycle rule: expire patches/ after (null: keep)."
    )
    egress: list[EgressRule] = Field(
        default_factory=list,
        description="Where runner pods reach the endpoint (the object store's addresses).",
    )


class Evidence(_Values):
    backend: Literal["local", "s3"] = Field(
        default="local",
        description="local: the operator's work volume, served to runner pods by the operator "
        "(port below); s3: an S3-compatible bucket (lifecycle rules, no volume needed).",
    )
    port: int = Field(default=8081, ge=1, le=65535, description="local: the evidence server.")
    url: str = Field(
        default="",
        description="local: the URL runner pods use; default: the Service's ClusterIP and port "
        "(no cluster DNS needed).",
    )
    s3: S3 = Field(default_factory=S3)


class Database(_Values):
    type: Literal["sqlite", "postgresql"] = Field(
        default="sqlite",
        description="sqlite: a file on the persistence volume (one replica); postgresql: external.",
    )
    postgresql: PostgreSQL = Field(default_factory=PostgreSQL)


class Migrations(_Values):
    hook: bool = Field(
        default=True,
        description="postgresql: migrate in a pre-install/pre-upgrade hook Job (else at start).",
    )
    resources: dict[str, Any] = Field(
        default_factory=lambda: {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "256Mi"},
        }
    )


class Persistence(_Values):
    enabled: bool = Field(
        default=True, description="A PVC for the work dir (SQLite DB, ledger, logs); else emptyDir."
    )
    existing_claim: str = ""
    storage_class: str | None = Field(
        default=None, description="null: the cluster's default StorageClass."
    )
    access_modes: list[str] = Field(default_factory=lambda: ["ReadWriteOnce"])
    size: str = "1Gi"


class ServiceAccount(_Values):
    create: bool = True
    name: str = Field(default="", description="Default: fullname.")
    annotations: dict[str, str] = Field(default_factory=dict)


class Rbac(_Values):
    create: bool = True


class MetricsService(_Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    annotations: dict[str, str] = Field(default_factory=dict)


class ServiceMonitor(_Values):
    enabled: bool = Field(default=False, description="Needs the Prometheus Operator's CRDs.")
    interval: str = "30s"
    labels: dict[str, str] = Field(default_factory=dict)


class Metrics(_Values):
    enabled: bool = True
    port: int = Field(default=9100, ge=1, le=65535)
    service: MetricsService = Field(default_factory=MetricsService)
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor)


class NetworkPolicy(_Values):
    enabled: bool = Field(
        default=True,
        description="Deny all ingress and egress of adapter/gate pods except the rules below.",
    )
    allow_dns: bool = Field(default=True, description="Allow DNS (port 53) to any namespace.")
    namespaces: list[str] = Field(
        default_factory=list,
        description="Extra namespaces to create the runner policy in (every served namespace "
        "always gets it).",
    )
    egress: list[EgressRule] = Field(
        default_factory=list,
        description="Allowed egress of adapter and gate pods: the git server they clone from "
        "(pod addresses: policies see connections after a Service's DNAT). An AI API belongs "
        "in the Adapter's egress.",
    )
    extra_egress: list[dict[str, Any]] = Field(
        default_factory=list,
        description="NetworkPolicyEgressRule objects appended as they are (e.g. a podSelector).",
    )
    gate_egress: list[EgressRule] = Field(
        default_factory=list,
        description="Extra egress of gate pods only (policy <fullname>-gate), e.g. a package "
        "index the checks install from.",
    )


class SampleAdapter(_Values):
    enabled: bool = False
    name: str = Field(description="Adapter resource name (TaskExecutions refer to it).")
    description: str = ""
    image: str = Field(
        default="",
        description="Image with the tool installed, built FROM the project image; default: "
        "runner image (which has no AI CLI).",
    )
    api_key_secret: SecretKey = Field(
        default_factory=SecretKey, description="Secret with the tool's API key."
    )
    api_key_env: str = Field(default="", description="Env var the tool reads its API key from.")
    command: list[str] | None = Field(default=None, description="argv (script adapter).")
    timeout_seconds: float = Field(default=1800, gt=0)
    resources: Resources = Field(default_factory=Resources)
    gate: list[Check] = Field(default_factory=list, description="Default test-gate checks.")
    egress: list[EgressRule] = Field(
        default_factory=list, description="Recorded on the Adapter; enforce with networkPolicy."
    )
    extra_env: list[EnvVar] = Field(default_factory=list)


class Adapters(_Values):
    patch: SampleAdapter = Field(
        default_factory=lambda: SampleAdapter(
            enabled=True,
            name="patch",
            description="Applies the unified diff in spec.task.patch (deterministic).",
            timeout_seconds=300,
            resources=Resources(cpu="500m", memory="256Mi"),
        )
    )
    script: SampleAdapter = Field(
        default_factory=lambda: SampleAdapter(
            enabled=True,
            name="script",
            description="Runs a fixed command in the checkout (here: records the task's prompt).",
            command=["sh", "-c", 'cat "$ORCHESTRATOR_PROMPT_FILE" >> TASKS.md'],
            timeout_seconds=300,
            resources=Resources(cpu="500m", memory="256Mi"),
        )
    )
    aider: SampleAdapter = Field(
        default_factory=lambda: SampleAdapter(
            name="aider",
            description="aider (needs an image with aider and an API-key Secret).",
            api_key_env="OPENAI_API_KEY",
            api_key_secret=SecretKey(key="api-key"),
        )
    )
    claude_code: SampleAdapter = Field(
        default_factory=lambda: SampleAdapter(
            name="claude-code",
            description="Claude Code (needs an image with `claude` and an API-key Secret).",
            api_key_env="ANTHROPIC_API_KEY",
            api_key_secret=SecretKey(key="api-key"),
        )
    )
    codex: SampleAdapter = Field(
        default_factory=lambda: SampleAdapter(
            name="codex",
            description="Codex CLI (needs an image with `codex` and an API-key Secret).",
            api_key_env="OPENAI_API_KEY",
            api_key_secret=SecretKey(key="api-key"),
        )
    )
    opencode: SampleAdapter = Field(
        default_factory=lambda: SampleAdapter(
            name="opencode",
            description="OpenCode (needs an image with `opencode` and an API-key Secret).",
            api_key_env="ANTHROPIC_API_KEY",
            api_key_secret=SecretKey(key="api-key"),
        )
    )


class GrafanaDashboard(_Values):
    enabled: bool = Field(default=False, description="A ConfigMap for Grafana's sidecar.")
    labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"})
    annotations: dict[str, str] = Field(default_factory=dict)


class ChartValues(_Values):
    """Everything ``helm install -f my-values.yaml`` accepts."""

    name_override: str = ""
    fullname_override: str = ""
    image: Image = Field(default_factory=Image)
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list)
    runner: Runner = Field(default_factory=Runner)
    watch: Watch = Field(default_factory=Watch)
    replica_count: int = Field(
        default=1,
        ge=1,
        description="2 or more: one leader (the Lease holder) and hot standbys that keep their "
        "watch cache warm and do nothing else; needs PostgreSQL and a ReadWriteMany work dir.",
    )
    leader_election: LeaderElection = Field(default_factory=LeaderElection)
    operator: Operator = Field(default_factory=Operator)
    evidence: Evidence = Field(default_factory=Evidence)
    database: Database = Field(default_factory=Database)
    migrations: Migrations = Field(default_factory=Migrations)
    persistence: Persistence = Field(default_factory=Persistence)
    service_account: ServiceAccount = Field(default_factory=ServiceAccount)
    rbac: Rbac = Field(default_factory=Rbac)
    resources: dict[str, Any] = Field(
        default_factory=lambda: {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        }
    )
    pod_security_context: dict[str, Any] = Field(default_factory=_restricted_pod)
    security_context: dict[str, Any] = Field(default_factory=_restricted_container)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str = ""
    metrics: Metrics = Field(default_factory=Metrics)
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy)
    adapters: Adapters = Field(default_factory=Adapters)
    grafana_dashboard: GrafanaDashboard = Field(default_factory=GrafanaDashboard)


def values_schema_text() -> str:
    schema = without_kubernetes_keys(ChartValues.model_json_schema(by_alias=True))
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def chart_files() -> dict[str, str]:
    """Generated files of the chart: its values schema and copies of the CRDs."""
    from core.crd import crd_files

    files = {f"charts/orchestrator/{rel}": text for rel, text in crd_files().items()}
    files[VALUES_SCHEMA_PATH] = values_schema_text()
    return files

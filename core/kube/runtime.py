"""Assembling the operator from its settings (environment variables, pydantic-settings).

``operator/handlers.py`` only starts and stops what this module builds: the database
(migrated once at start), work dir, API client, metrics endpoint, the evidence store (the
local one with its HTTP server for runner pods, or S3), the
:class:`~core.kube.reconciler.Controller` and the :class:`~core.kube.control_loop.ControlLoop`
that feeds it (informers, work queue, leader election), with the parts that share the loop
(escalation Events, Integrations).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.db.database import check_schema, default_url, make_engine, upgrade
from core.db.store import Store
from core.engine.evidence import LEDGER_DIR
from core.engine.evidence_grants import GrantingStore, GrantSigner, LocalGrantingStore, load_secret
from core.engine.evidence_s3 import S3EvidenceStore, s3_client
from core.engine.monitoring.metrics import Metrics
from core.errors import ConfigError
from core.kube.client_api import ClientKubeApi
from core.kube.control_loop import ControlLoop
from core.kube.escalation_events import EscalationEvents
from core.kube.evidence_server import EvidenceServer
from core.kube.integration_controller import IntegrationController, IntegrationSettings
from core.kube.jobs import RunnerStorage
from core.kube.leader import ElectionConfig
from core.kube.reconciler import Controller, ControllerSettings


class OperatorSettings(BaseSettings):
    """Settings of the operator, from ``ORCHESTRATOR_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    workdir: Path = Field(default=Path("/var/lib/orchestrator"), description="Logs, ledger, DB.")
    database_url: str | None = Field(default=None, description="Default: SQLite in workdir.")
    runner_image: str = Field(description="Image of adapter and gate pods (has the runner).")
    image_pull_policy: str = "IfNotPresent"
    namespace: str | None = Field(
        default=None,
        description="Namespaces watched, comma-separated (as kopf's --namespace flags); None: all.",
    )
    metrics_port: int | None = Field(default=None, description="Serve Prometheus metrics here.")
    metrics_address: str = "0.0.0.0"  # noqa: S104 - the metrics Service scrapes the pod
    migrate: bool = Field(default=True, description="Run database migrations at start.")
    resync_seconds: float = 30.0
    max_diff_bytes: int = Field(
        default=100 * 1024 * 1024, description="Hard limit of a diff (over it: diff_too_large)."
    )
    job_ttl_seconds: int = Field(
        default=300, ge=0, description="A finished Job's TTL once its attempt is recorded."
    )
    runner_work_size_limit: str = Field(
        default="2Gi", description="sizeLimit of runner pods' /work emptyDir (the checkout)."
    )
    runner_tmp_size_limit: str = Field(
        default="1Gi", description="sizeLimit of runner pods' /tmp emptyDir."
    )
    runner_inputs_size_limit: str | None = Field(
        default=None,
        description="sizeLimit of runner pods' inputs emptyDir; default: max_diff_bytes + 16Mi.",
    )
    runner_ephemeral_storage_request: str = Field(
        default="1Gi", description="ephemeral-storage request of runner containers."
    )
    runner_ephemeral_storage_limit: str | None = Field(
        default=None,
        description="ephemeral-storage limit of runner containers; default: the three "
        "emptyDirs' size limits plus 512Mi for logs. Over it the kubelet evicts the pod and "
        "the attempt fails as adapter_error.",
    )
    evidence_backend: Literal["local", "s3"] = Field(
        default="local",
        description="local: <workdir>/.ledger served to runner pods by this process; s3: a bucket.",
    )
    evidence_listen: str = Field(
        default="0.0.0.0:8081", description="local: host:port of the evidence server."
    )
    evidence_url: str | None = Field(
        default=None, description="local: the URL runner pods reach the evidence server at."
    )
    evidence_reuse_port: bool = Field(
        default=False,
        description="local: share evidence_listen with the other replicas on the same host "
        "(SO_REUSEPORT; several operator processes on one node address, as the e2e tests run "
        "them): a pod granted by a replica that died uploads to a live one.",
    )
    evidence_service: str | None = Field(
        default=None,
        description="local, when evidence_url is unset: the Service (in $POD_NAMESPACE) whose "
        "ClusterIP and port 'evidence' make the URL (no cluster DNS needed).",
    )
    evidence_egress: str | None = Field(
        default=None,
        description="JSON list of NetworkPolicy egress rules reaching the evidence store, added "
        "to every Adapter's policy. Default: the store URL's address when it is an IP.",
    )
    s3_endpoint: str | None = Field(default=None, description="s3: endpoint URL (None: AWS).")
    s3_public_endpoint: str | None = Field(
        default=None, description="s3: the endpoint pods reach (grants are signed for it)."
    )
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = Field(default=None, description="Default: boto3's chain.")
    s3_secret_access_key: str | None = None
    s3_temporary_days: int | None = Field(
        default=8,
        ge=1,
        description="s3: lifecycle rule expiring requests/ and incoming/ (None: set none).",
    )
    s3_patch_days: int | None = Field(
        default=None, ge=1, description="s3: lifecycle rule expiring patches/ (None: keep)."
    )
    kubeconfig: str | None = None
    workers: int = Field(default=16, ge=1, le=64, description="Keys reconciled at once.")
    defer_quiet_seconds: float = Field(
        default=0.25,
        ge=0,
        description="Follow-up work (status after a Job was created, pod polls, resync) waits "
        "until no new work arrived for this long: a burst gets its Jobs first. 0: no wait.",
    )
    defer_max_seconds: float = Field(
        default=30.0, ge=0, description="Follow-up work waits at most this long for a burst."
    )
    leader_election: bool = Field(
        default=True, description="Work only while holding the Lease (one active replica)."
    )
    shards: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Horizontal shards: 0 (default) one Lease, one active replica; S > 0 "
        "cuts the TaskExecutions into S shards (sha256 of the uid), each its own Lease "
        "'<lease_name>-shard-<i>', spread over the live replicas (member Leases "
        "'<lease_name>-member-<k>'); needs leader_election and a database shared by the "
        "replicas (PostgreSQL).",
    )
    lease_name: str = "orchestrator-operator"
    lease_namespace: str | None = Field(
        default=None,
        description="Namespace of the Lease. Default: $POD_NAMESPACE, else the first "
        "served namespace, else 'default'.",
    )
    integration_workers: int = Field(
        default=2, ge=1, le=16, description="Integrations merged and gated at once."
    )
    integration_poll_seconds: float = Field(
        default=10.0, gt=0, description="Safety-net look at a running gate Job (events first)."
    )
    breaker_check_seconds: float = Field(
        default=60.0, gt=0, description="How often breakers are checked for escalations."
    )
    lease_duration_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0
    identity: str | None = Field(
        default=None, description="This replica's name in the Lease. Default: host-pid-random."
    )

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in (self.namespace or "").split(",") if n.strip())


def load_settings() -> OperatorSettings:
    """The settings from the environment; a bad one is a :class:`ConfigError` naming the
    variable to fix (the operator stops with it instead of retrying its start-up forever)."""
    try:
        return OperatorSettings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            field = str(err["loc"][0]) if err["loc"] else ""
            name = f"ORCHESTRATOR_{field.upper()}" if field else "the operator settings"
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError(
            "invalid operator settings: "
            + "; ".join(problems)
            + "\n  fix: set these environment variables (the chart sets them from its values)"
        ) from exc


@dataclass
class Evidence:
    """The operator's evidence store, and the server that serves a local one to pods."""

    store: GrantingStore
    server: EvidenceServer | None = None
    #: The URL runner pods reach the store at.
    url: str = ""

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


async def start_evidence(settings: OperatorSettings, api: ClientKubeApi | None = None) -> Evidence:
    """The configured store; for ``local``, its server listening and its public URL known."""
    if settings.evidence_backend == "s3":
        if not settings.s3_bucket:
            raise ConfigError("ORCHESTRATOR_S3_BUCKET: required with evidence_backend=s3")

        def client(endpoint: str | None) -> object:
            return s3_client(
                endpoint,
                region=settings.s3_region,
                access_key=settings.s3_access_key_id,
                secret_key=settings.s3_secret_access_key,
            )

        store = S3EvidenceStore(
            client(settings.s3_endpoint),
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            presigner=client(settings.s3_public_endpoint or settings.s3_endpoint),
        )
        if settings.s3_temporary_days is not None:
            store.ensure_lifecycle(
                temporary_days=settings.s3_temporary_days, patch_days=settings.s3_patch_days
            )
        return Evidence(store, url=settings.s3_public_endpoint or settings.s3_endpoint or "")
    host, _, port = settings.evidence_listen.rpartition(":")
    signer = GrantSigner(load_secret(settings.workdir / ".evidence-grant-key"))
    url = settings.evidence_url
    if url is None and settings.evidence_service and api is not None:
        url = await _service_url(api, settings.evidence_service)
    root = settings.workdir / LEDGER_DIR
    server = EvidenceServer(LocalGrantingStore(root, base_url="", signer=signer), signer)
    listen = host or "0.0.0.0"  # noqa: S104 - pods connect
    try:
        bound = await server.start(listen, int(port), reuse_port=settings.evidence_reuse_port)
    except OSError as exc:  # kopf would retry the start-up every 60 s, never to succeed
        raise ConfigError(
            f"ORCHESTRATOR_EVIDENCE_LISTEN={settings.evidence_listen}: cannot listen there "
            f"({exc.strerror or exc}); fix: stop what holds it, or set another host:port "
            "(port 0 takes any free one)"
        ) from exc
    url = url or f"http://127.0.0.1:{bound}"
    server.store.base_url = url.rstrip("/")
    return Evidence(server.store, server, url)


def evidence_egress(settings: OperatorSettings, url: str) -> tuple[dict[str, Any], ...]:
    """The egress rules reaching the store: as configured, else the URL's IP and port."""
    if settings.evidence_egress:
        rules = json.loads(settings.evidence_egress)
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise ConfigError("ORCHESTRATOR_EVIDENCE_EGRESS: a JSON list of egress rules")
        return tuple(rules)
    parts = urlsplit(url)
    try:
        address = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        return ()  # a name: the chart's runner policy admits the store
    port = parts.port or (443 if parts.scheme == "https" else 80)
    cidr = f"{address}/{address.max_prefixlen}"
    return ({"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": port}]},)


async def _service_url(api: ClientKubeApi, name: str) -> str:
    namespace = os.environ.get("POD_NAMESPACE") or "default"
    service = await api.get_object("services", namespace, name)
    if service is None:
        raise ConfigError(f"the evidence Service {namespace}/{name} does not exist")
    spec = service.get("spec") or {}
    ports = [p for p in spec.get("ports") or [] if p.get("name") == "evidence"]
    if not spec.get("clusterIP") or not ports:
        raise ConfigError(f"Service {namespace}/{name} has no ClusterIP or no port 'evidence'")
    return f"http://{spec['clusterIP']}:{ports[0]['port']}"


def runner_storage(settings: OperatorSettings) -> RunnerStorage:
    """Runner pods' disk limits from the settings, checked once at startup."""
    storage = RunnerStorage.for_diff_limit(
        settings.max_diff_bytes,
        work=settings.runner_work_size_limit,
        tmp=settings.runner_tmp_size_limit,
        inputs=settings.runner_inputs_size_limit,
        ephemeral_request=settings.runner_ephemeral_storage_request,
        ephemeral_limit=settings.runner_ephemeral_storage_limit,
    )
    try:
        storage.validate()
    except ValueError as exc:
        raise ConfigError(f"ORCHESTRATOR_RUNNER_*: {exc}") from exc
    return storage


async def build_controller(settings: OperatorSettings, evidence: Evidence) -> Controller:
    settings.workdir.mkdir(parents=True, exist_ok=True)
    url = settings.database_url or default_url(settings.workdir)
    if settings.migrate:
        upgrade(url)
    engine = make_engine(url)
    check_schema(engine, url)
    metrics = Metrics()
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port, settings.metrics_address)
    api = await ClientKubeApi.connect(settings.kubeconfig)
    return Controller(
        api,
        Store(engine),
        ControllerSettings(
            workdir=settings.workdir,
            runner_image=settings.runner_image,
            namespaces=settings.namespaces,
            image_pull_policy=settings.image_pull_policy,
            max_diff_bytes=settings.max_diff_bytes,
            resync_seconds=settings.resync_seconds,
            job_ttl_seconds=settings.job_ttl_seconds,
            evidence_egress=evidence_egress(settings, evidence.url),
            runner_storage=runner_storage(settings),
        ),
        evidence=evidence.store,
        metrics=metrics,
    )


def election_config(settings: OperatorSettings) -> ElectionConfig | None:
    """The Lease of leader election (None: off); with shards, also the base name of the shard
    and member Leases (core/kube/shards.py). The chart's Role is held to what this gives."""
    if not settings.leader_election:
        return None
    namespace = (
        settings.lease_namespace
        or os.environ.get("POD_NAMESPACE")
        or next(iter(settings.namespaces), "default")
    )
    return ElectionConfig(
        namespace=namespace,
        name=settings.lease_name,
        lease_duration=settings.lease_duration_seconds,
        renew_deadline=settings.renew_deadline_seconds,
        retry_period=settings.retry_period_seconds,
    )


def build_control_loop(settings: OperatorSettings, controller: Controller) -> ControlLoop:
    election = election_config(settings)
    if settings.shards and election is None:
        raise ConfigError("ORCHESTRATOR_SHARDS needs ORCHESTRATOR_LEADER_ELECTION=true")
    identity = settings.identity or (f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    events = EscalationEvents(
        controller.api,
        controller.recorder.escalations,
        controller.cache,
        controller.breakers,
        namespaces=settings.namespaces,
        breaker_check_seconds=settings.breaker_check_seconds,
    )
    integrations = IntegrationController(
        controller.api,
        controller.store,
        controller.cache,
        IntegrationSettings(
            workdir=settings.workdir,
            runner_image=settings.runner_image,
            image_pull_policy=settings.image_pull_policy,
            poll_seconds=settings.integration_poll_seconds,
            concurrency=settings.integration_workers,
            storage=runner_storage(settings),
        ),
        metrics=controller.metrics,
    )
    return ControlLoop(
        controller,
        controller.api,
        namespaces=settings.namespaces,
        workers=settings.workers,
        resync_seconds=settings.resync_seconds,
        defer_quiet=settings.defer_quiet_seconds,
        defer_max=settings.defer_max_seconds,
        election=election,
        identity=identity,
        parts=[events, integrations],
        shards=settings.shards,
    )

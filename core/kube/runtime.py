"""Assembling the operator from its settings (environment variables, pydantic-settings).

``operator/handlers.py`` only starts and stops what this module builds: the database
(migrated once at start), work dir, API client, metrics endpoint, the
:class:`~core.kube.reconciler.Controller` and the :class:`~core.kube.control_loop.ControlLoop`
that feeds it (informers, work queue, leader election), with the parts that share the loop
(escalation Events, Integrations).
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.db.database import check_schema, default_url, make_engine, upgrade
from core.db.store import Store
from core.engine.monitoring.metrics import Metrics
from core.kube.client_api import ClientKubeApi
from core.kube.control_loop import ControlLoop
from core.kube.escalation_events import EscalationEvents
from core.kube.integration_controller import IntegrationController, IntegrationSettings
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
        description="Namespaces watched, comma-separated (as kopf's --namespace flags); "
        "None: all.",
    )
    metrics_port: int | None = Field(default=None, description="Serve Prometheus metrics here.")
    metrics_address: str = "0.0.0.0"  # noqa: S104 - the metrics Service scrapes the pod
    migrate: bool = Field(default=True, description="Run database migrations at start.")
    resync_seconds: float = 30.0
    max_diff_bytes: int = 512 * 1024
    kubeconfig: str | None = None
    workers: int = Field(default=4, ge=1, le=64, description="Keys reconciled at once.")
    leader_election: bool = Field(
        default=True, description="Work only while holding the Lease (one active replica)."
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


async def build_controller(settings: OperatorSettings) -> Controller:
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
        ),
        metrics=metrics,
    )


def build_control_loop(settings: OperatorSettings, controller: Controller) -> ControlLoop:
    election = None
    if settings.leader_election:
        namespace = (
            settings.lease_namespace
            or os.environ.get("POD_NAMESPACE")
            or next(iter(settings.namespaces), "default")
        )
        election = ElectionConfig(
            namespace=namespace,
            name=settings.lease_name,
            lease_duration=settings.lease_duration_seconds,
            renew_deadline=settings.renew_deadline_seconds,
            retry_period=settings.retry_period_seconds,
        )
    identity = settings.identity or (
        f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
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
        ),
        metrics=controller.metrics,
    )
    return ControlLoop(
        controller,
        controller.api,
        namespaces=settings.namespaces,
        workers=settings.workers,
        resync_seconds=settings.resync_seconds,
        election=election,
        identity=identity,
        parts=[events, integrations],
    )

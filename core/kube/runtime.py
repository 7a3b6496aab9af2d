"""Assembling the operator from its settings (environment variables, pydantic-settings).

``operator/handlers.py`` only wires kopf to :class:`~core.kube.reconciler.Controller`; this
module builds the controller: database (migrated once at start), work dir, API client,
metrics endpoint.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.db.database import check_schema, default_url, make_engine, upgrade
from core.db.store import Store
from core.engine.monitoring.metrics import Metrics
from core.kube.api import KubeApi
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
    api = await KubeApi.connect(settings.kubeconfig)
    return Controller(
        api,
        Store(engine),
        ControllerSettings(
            workdir=settings.workdir,
            runner_image=settings.runner_image,
            namespaces=tuple(
                n.strip() for n in (settings.namespace or "").split(",") if n.strip()
            ),
            image_pull_policy=settings.image_pull_policy,
            max_diff_bytes=settings.max_diff_bytes,
            resync_seconds=settings.resync_seconds,
        ),
        metrics=metrics,
    )

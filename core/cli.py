"""``orchestrator``: the command line of the execution controller.

Every command works on a phase-4 work dir (``--workdir``, default: the current directory) and
its database (``--database-url`` / ``ORCHESTRATOR_DATABASE_URL``, default: SQLite file
``orchestrator.db`` in the work dir). Errors a user can fix exit with code 2 and a message that
names the file or field and the fix.

This module holds the app and ``execute``; the other commands live by concept in
:mod:`core.cli_tasks`, :mod:`core.cli_integration`, :mod:`core.cli_evidence` and
:mod:`core.cli_admin` (shared options and helpers: :mod:`core.cli_common`) and are registered
here, in the order ``--help`` lists them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from core import __version__
from core.cli_admin import db_upgrade, ledger_verify, schema_generate
from core.cli_common import (
    CWD,
    Backend,
    DatabaseUrl,
    FollowTimeout,
    Kubeconfig,
    Workdir,
    console,
    err,
    fail,
)
from core.cli_evidence import export, gc
from core.cli_integration import integrate, integrate_on_kubernetes, run_integration
from core.cli_tasks import adapters, cancel, logs, manual_submit, status
from core.engine.alert_webhook import WebhookConfig
from core.engine.escalation import EscalationPolicy
from core.engine.executor import (
    DEFAULT_MAX_DIFF_BYTES,
    DEFAULT_MAX_LOG_BYTES,
    ExecutorConfig,
    build_executor,
    serve_continuously,
)
from core.engine.inputs import DEFAULT_MAX_PROMPT_BYTES
from core.engine.integration_worker import IntegrationConfig
from core.engine.monitoring.metrics import Metrics
from core.engine.run_watcher import RunWatcher
from core.engine.state_files import STATE_DIR
from core.errors import OrchestratorError
from core.models import ExecutionResults

app = typer.Typer(
    help="Execute routed AI coding tasks: isolated attempts, test gate, ledger, retries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
ledger_app = typer.Typer(help="The hash-chained patch ledger.", no_args_is_help=True)
manual_app = typer.Typer(help="Tasks routed to a human.", no_args_is_help=True)
schema_app = typer.Typer(help="Generated JSON Schemas and CRDs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(ledger_app, name="ledger")
app.add_typer(manual_app, name="manual")
app.add_typer(schema_app, name="schema")


def _version(value: bool) -> None:
    if value:
        console.print(f"orchestrator {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    pass


class EscalationFormat(StrEnum):
    generic = "generic"
    alertmanager = "alertmanager"


def execute(
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            "-r",
            help="Run id, as in .state/task_queue.json (with --watch: only this run; "
            "default there: every run ROUTING_COMPLETE names).",
        ),
    ] = None,
    workdir: Workdir = CWD,
    database_url: DatabaseUrl = None,
    backend: Annotated[
        Backend, typer.Option(help="local: process groups here; kubernetes: TaskExecution CRs.")
    ] = Backend.local,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT.")
    ] = None,
    keep_worktrees: Annotated[
        bool, typer.Option(help="Keep attempt worktrees under .work/ for debugging.")
    ] = False,
    max_tasks: Annotated[
        int | None, typer.Option(min=1, help="Start at most N tasks, then stop (resumable).")
    ] = None,
    max_log_bytes: Annotated[
        int,
        typer.Option(
            min=1024,
            help="Cap of an attempt's log in logs/execution/ (adapter output and notes, every "
            "byte written counted); head and tail are kept around a truncation marker.",
        ),
    ] = DEFAULT_MAX_LOG_BYTES,
    max_gate_log_bytes: Annotated[
        int | None,
        typer.Option(min=1024, help="Cap of each gate check's log. Default: --max-log-bytes."),
    ] = None,
    max_diff_bytes: Annotated[
        int,
        typer.Option(
            min=1024,
            help="Hard limit of an attempt's diff. Every diff up to it is kept whole in the "
            "evidence store; a larger one is not kept and fails the attempt as diff_too_large.",
        ),
    ] = DEFAULT_MAX_DIFF_BYTES,
    max_prompt_bytes: Annotated[
        int,
        typer.Option(min=1, help="Refuse (exit 2) a task whose prompt is larger than this."),
    ] = DEFAULT_MAX_PROMPT_BYTES,
    wait: Annotated[
        bool,
        typer.Option(
            help="Wait for open circuit breakers and safe mode to clear (no busy loop) "
            "instead of returning with those tasks PENDING."
        ),
    ] = True,
    safe_mode_after: Annotated[
        float,
        typer.Option(
            min=1, help="Enter safe mode when a breaker has not closed for this many seconds."
        ),
    ] = 900.0,
    namespace: Annotated[
        str, typer.Option(help="kubernetes backend: namespace of the TaskExecutions.")
    ] = "default",
    kubeconfig: Kubeconfig = None,
    follow_timeout: FollowTimeout = None,
    integrate_after: Annotated[
        bool,
        typer.Option(
            "--integrate",
            help="Then merge the COMPLETED tasks onto the integration branch (`orchestrator "
            "integrate` with its defaults); tasks it sends back are executed and integrated "
            "again, until none is. kubernetes backend: the run's Integration resource, followed.",
        ),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Continuous mode: after the run, wait for new runs (a new ROUTING_COMPLETE, "
            "changed tasks, a submitted manual patch) and execute them, until SIGTERM/SIGINT "
            "(the running attempt is stopped and resumed on the next start; exit code 0).",
        ),
    ] = False,
    poll_seconds: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="--watch: poll the work dir every N seconds instead of file-system "
            "notifications (for network file systems). Default: notifications.",
        ),
    ] = None,
    escalation_webhook: Annotated[
        str | None,
        typer.Option(
            envvar="ORCHESTRATOR_ESCALATION_WEBHOOK",
            help="POST escalations here (with retries); a bearer token may come from "
            "$ORCHESTRATOR_ESCALATION_WEBHOOK_TOKEN. They always go to logs/escalations.jsonl, "
            "the database and escalations_total.",
            show_envvar=True,
        ),
    ] = None,
    escalation_format: Annotated[
        EscalationFormat,
        typer.Option(
            help="generic: the escalation record as JSON; alertmanager: an alert for "
            "Alertmanager's /api/v2/alerts."
        ),
    ] = EscalationFormat.generic,
    escalate_gate_failures: Annotated[
        int,
        typer.Option(
            min=1, help="Escalate when this many attempts of an adapter in a row fail the gate."
        ),
    ] = 2,
    escalate_breaker_open_after: Annotated[
        float,
        typer.Option(min=1, help="Escalate a circuit breaker not closed for this many seconds."),
    ] = 900.0,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox/--no-sandbox",
            help="local backend: run adapters and gate checks in the bubblewrap sandbox "
            "(tree and scratch dirs writable, work dir state hidden, /tmp private). Without "
            "a working bubblewrap `execute` refuses; --no-sandbox runs them unconfined, with "
            "every right of your user.",
        ),
    ] = True,
) -> None:
    """Execute the routed tasks of a run; resumes where a previous execution stopped.

    Reads .state/routing_decisions.json, .state/task_queue.json and .state/ROUTING_COMPLETE;
    writes .state/execution_results.json, .state/patch_ledger.jsonl, logs/ and the database.
    Escalations (breaker opened or open too long, repeated gate failures, task timeout,
    adapter crash, safe mode) go to logs/escalations.jsonl, the database, a metric and the
    optional webhook. Exit code: 0 all tasks finished (whatever their outcome), 3 tasks left
    waiting, 2 bad input (or no sandbox: see --no-sandbox); with --watch 0 after a clean stop.
    """
    if backend is Backend.kubernetes:
        if run is None or watch:
            raise fail("the kubernetes backend needs --run and does not --watch")
        _execute_on_kubernetes(run, workdir, namespace, kubeconfig, follow_timeout)
        if integrate_after:
            from core.kube.integration_submit import integration_resource

            body = integration_resource(run)
            integrate_on_kubernetes(run, workdir, namespace, kubeconfig, follow_timeout, body)
        return
    if run is None and not watch:
        raise fail("which run? pass --run <id> (or --watch to execute every run that arrives)")
    if integrate_after and (watch or run is None):
        raise fail("--integrate needs --run <id> and does not --watch")
    webhook = None
    if escalation_webhook:
        webhook = WebhookConfig(
            url=escalation_webhook,
            format=escalation_format.value,
            token=os.environ.get("ORCHESTRATOR_ESCALATION_WEBHOOK_TOKEN") or None,
        )
    config = ExecutorConfig(
        run_id=run or "",
        workdir=workdir,
        database_url=database_url,
        max_log_bytes=max_log_bytes,
        max_gate_log_bytes=max_gate_log_bytes,
        max_diff_bytes=max_diff_bytes,
        max_prompt_bytes=max_prompt_bytes,
        keep_worktrees=keep_worktrees,
        max_tasks=max_tasks,
        wait_for_breakers=wait,
        safe_mode_max_open_seconds=safe_mode_after,
        escalation=EscalationPolicy(
            gate_failures=escalate_gate_failures,
            breaker_open_seconds=escalate_breaker_open_after,
            webhook=webhook,
        ),
        sandbox=sandbox,
    )
    stop = threading.Event()
    metrics = Metrics()
    if watch:
        _watch(config, stop, metrics, metrics_port, poll_seconds)
        return
    try:
        executor = build_executor(config, metrics=metrics, stop=stop)
    except OrchestratorError as exc:
        raise fail(str(exc)) from exc
    if metrics_port is not None:
        metrics.serve(metrics_port)
    _stop_on_signals(stop, "stopping after the current attempt")
    try:
        results = executor.run()
        while integrate_after and run is not None and not stop.is_set():
            integration = run_integration(
                IntegrationConfig(run_id=run, workdir=workdir), database_url, metrics
            )
            if not integration.reopened:
                break
            console.print(
                f"executing the {len(integration.reopened)} task(s) sent back: "
                + ", ".join(integration.reopened),
                highlight=False,
            )
            results = build_executor(config, metrics=metrics, stop=stop).run()
    except OrchestratorError as exc:
        raise fail(str(exc)) from exc
    _summary(results, workdir)
    if stop.is_set() or not results.finished:
        raise typer.Exit(3)


def _stop_on_signals(stop: threading.Event, what: str) -> None:
    def _stop(signum: int, _frame: object) -> None:
        err.print(f"received {signal.Signals(signum).name}: {what}")
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def _summary(results: ExecutionResults, workdir: Path) -> None:
    s = results.summary
    console.print(
        f"run {results.run_id}: {s['COMPLETED']} completed, {s['FAILED']} failed, "
        f"{s['TIMEOUT']} timeout, {s['CANCELLED']} cancelled, {s['PENDING']} waiting "
        f"(of {s['total']})",
        highlight=False,
    )
    console.print(f"results: {workdir / STATE_DIR / 'execution_results.json'}", highlight=False)


def _watch(
    config: ExecutorConfig,
    stop: threading.Event,
    metrics: Metrics,
    metrics_port: int | None,
    poll_seconds: float | None,
) -> None:
    """``execute --watch``: the executor loop until SIGTERM/SIGINT."""
    if metrics_port is not None:
        metrics.serve(metrics_port)
    _stop_on_signals(stop, "stopping: the running attempt ends and is resumed on the next start")
    watcher = RunWatcher(
        config.workdir,
        stop,
        force_polling=poll_seconds is not None,
        poll_seconds=poll_seconds or 1.0,
        on_tick=metrics.heartbeat,
    )
    console.print(
        f"watching {config.workdir} for runs ({watcher.mode}); SIGTERM or Ctrl-C stops",
        highlight=False,
    )
    try:
        serve_continuously(
            config,
            stop=stop,
            watcher=watcher,
            metrics=metrics,
            on_results=lambda results: _summary(results, config.workdir),
            report=lambda message: err.print(message, highlight=False, markup=False),
        )
    except OrchestratorError as exc:
        raise fail(str(exc)) from exc
    console.print("stopped", highlight=False)


def _execute_on_kubernetes(
    run: str, workdir: Path, namespace: str, kubeconfig: str | None, timeout: float | None
) -> None:
    from core.engine.monitoring.progress import ConsoleProgress
    from core.kube.submit import KubernetesSubmitter

    try:
        submitter = KubernetesSubmitter(
            workdir, run, namespace, kubeconfig=kubeconfig, progress=ConsoleProgress(console)
        )
        created = submitter.submit()
        console.print(
            f"run {run}: {created} TaskExecution(s) created in namespace {namespace} "
            f"({len(submitter.inputs.tasks) - created} already there); following",
            highlight=False,
        )
        results = submitter.follow(timeout)
    except OrchestratorError as exc:
        raise fail(str(exc)) from exc
    s = results.summary
    console.print(
        f"run {run}: {s['COMPLETED']} completed, {s['FAILED']} failed, {s['TIMEOUT']} timeout, "
        f"{s['CANCELLED']} cancelled, {s['PENDING'] + s['IN_PROGRESS'] + s['VALIDATING']} "
        f"unfinished (of {s['total']})",
        highlight=False,
    )
    if not results.finished:
        raise typer.Exit(3)


# The order here is the order ``--help`` lists the commands in.
app.command()(execute)
app.command()(integrate)
app.command()(status)
app.command()(logs)
app.command()(adapters)
app.command()(cancel)
app.command("export")(export)
app.command("gc")(gc)
ledger_app.command("verify")(ledger_verify)
db_app.command("upgrade")(db_upgrade)
manual_app.command("submit")(manual_submit)
schema_app.command("generate")(schema_generate)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except OrchestratorError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()

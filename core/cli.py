"""``orchestrator``: the command line of the execution controller.

Every command works on a phase-4 work dir (``--workdir``, default: the current directory) and
its database (``--database-url`` / ``ORCHESTRATOR_DATABASE_URL``, default: SQLite file
``orchestrator.db`` in the work dir). Errors a user can fix exit with code 2 and a message that
names the file or field and the fix.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core import __version__
from core.cli_evidence import export, gc
from core.db.database import check_schema, default_url, make_engine, redact, upgrade
from core.db.integration_rows import IntegrationRows
from core.db.store import Store
from core.db.test_history import TestHistory
from core.engine.adapters import manual_paths
from core.engine.alert_webhook import WebhookConfig
from core.engine.escalation import EscalationPolicy
from core.engine.evidence import local_store
from core.engine.executor import (
    DEFAULT_MAX_DIFF_BYTES,
    DEFAULT_MAX_LOG_BYTES,
    ExecutorConfig,
    build_executor,
    serve_continuously,
)
from core.engine.inputs import DEFAULT_MAX_PROMPT_BYTES
from core.engine.integration_worker import (
    IntegrationConfig,
    IntegrationRun,
    build_integration_worker,
)
from core.engine.lifecycle import Finish
from core.engine.merge_queue import BatchPolicy
from core.engine.monitoring.metrics import Metrics
from core.engine.patch_ledger import verify
from core.engine.process_group import process_group_alive, terminate_group
from core.engine.recorder import Recorder
from core.engine.retention import pruned_keys
from core.engine.run_watcher import RunWatcher
from core.engine.state_files import PATCH_LEDGER, STATE_DIR
from core.engine.task_log import find_task_log, read_records
from core.errors import OrchestratorError
from core.identity import TaskKey
from core.models import (
    CheckStatus,
    ExecutionResults,
    FailureClass,
    GateResult,
    IntegrationResults,
    TaskState,
)

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
app.command("export")(export)
app.command("gc")(gc)

_WIDTH = None if sys.stdout.isatty() else 160  # pipes and CI get full lines, not 80 columns
CWD = Path(".")  # resolved by typer (resolve_path=True) when the command runs
console = Console(soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, soft_wrap=True)

Workdir = Annotated[
    Path,
    typer.Option(
        "--workdir",
        "-w",
        help="Phase-4 work dir (.state/, logs/, orchestrator.db). Default: current directory.",
        file_okay=False,
        resolve_path=True,
        show_default=False,
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="ORCHESTRATOR_DATABASE_URL",
        help="SQLAlchemy URL, e.g. postgresql://user:pw@host/db. Default: SQLite in the work dir.",
        show_envvar=True,
    ),
]
RunId = Annotated[str, typer.Option("--run", "-r", help="Run id, as in .state/task_queue.json.")]


class Backend(StrEnum):
    local = "local"
    kubernetes = "kubernetes"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _store(workdir: Path, database_url: str | None) -> Store:
    url = database_url or default_url(workdir)
    engine = make_engine(url)
    where = f"--database-url {redact(url)}" if database_url else f"--workdir {workdir}"
    try:
        check_schema(engine, url, f"run `orchestrator db upgrade {where}`")
    except OrchestratorError as exc:
        raise _fail(str(exc)) from exc
    return Store(engine)


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


@app.command()
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
    kubeconfig: Annotated[
        str | None,
        typer.Option(envvar="KUBECONFIG", help="kubernetes backend: kubeconfig file."),
    ] = None,
    follow_timeout: Annotated[
        float | None,
        typer.Option(help="kubernetes backend: stop following after this many seconds."),
    ] = None,
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
            raise _fail("the kubernetes backend needs --run and does not --watch")
        _execute_on_kubernetes(run, workdir, namespace, kubeconfig, follow_timeout)
        if integrate_after:
            from core.kube.integration_submit import integration_resource

            body = integration_resource(run)
            _integrate_on_kubernetes(run, workdir, namespace, kubeconfig, follow_timeout, body)
        return
    if run is None and not watch:
        raise _fail("which run? pass --run <id> (or --watch to execute every run that arrives)")
    if integrate_after and (watch or run is None):
        raise _fail("--integrate needs --run <id> and does not --watch")
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
        raise _fail(str(exc)) from exc
    if metrics_port is not None:
        metrics.serve(metrics_port)
    _stop_on_signals(stop, "stopping after the current attempt")
    try:
        results = executor.run()
        while integrate_after and run is not None and not stop.is_set():
            integration = _integrate(
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
        raise _fail(str(exc)) from exc
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
        raise _fail(str(exc)) from exc
    console.print("stopped", highlight=False)


def _integrate(
    config: IntegrationConfig, database_url: str | None, metrics: Metrics
) -> IntegrationRun:
    """Run the integration worker and print what it did (raises OrchestratorError)."""
    done = build_integration_worker(config, database_url=database_url, metrics=metrics).run()
    _print_integration(done.results)
    return done


def _print_integration(r: IntegrationResults) -> None:
    st = r.stats
    for task in r.tasks:
        commit = task.commit[:12] if task.commit else ""
        note = f"  {task.reason}" if task.reason else ""
        console.print(
            f"  {task.task_id:<24} {task.outcome.value:<11} {commit:<12}{note}",
            highlight=False,
            markup=False,
        )
    per_merge = f"{st.gate_runs_per_merge:g}" if st.gate_runs_per_merge is not None else "-"
    console.print(
        f"integration of run {r.run_id}: {st.merged} merged, {st.conflict} conflict, "
        f"{st.gate_failed} gate_failed, {st.skipped} skipped; merged-tree gate runs: "
        f"{st.gate_runs} in {st.batches} batch(es), {per_merge} per merged change "
        f"(one-by-one: {st.one_by_one_gate_runs})",
        highlight=False,
    )
    where = r.repository if r.pushed else r.local_repository
    console.print(f"branch {r.branch} at {r.head_commit[:12]} in {where}", highlight=False)
    if Path(r.local_repository).is_dir():
        console.print(
            f"  git -C {r.local_repository} log --oneline {r.base_commit[:12]}..{r.branch}",
            highlight=False,
            markup=False,
        )


def _integrate_on_kubernetes(
    run: str,
    workdir: Path,
    namespace: str,
    kubeconfig: str | None,
    timeout: float | None,
    body: dict[str, Any],
) -> None:
    """Apply the run's Integration, follow it, write .state/integration_results.json."""
    from core.kube.integration_submit import IntegrationSubmitter

    try:
        submitter = IntegrationSubmitter(workdir, run, namespace, kubeconfig=kubeconfig)
        created = submitter.submit(body)
        console.print(
            f"Integration {namespace}/{run} {'created' if created else 'exists (kept)'}; "
            "following",
            highlight=False,
        )
        status = submitter.follow(timeout)
        if status.state == "Failed":
            raise _fail(f"integration of run {run} failed: {status.reason}: {status.message}", 1)
        if status.state != "Succeeded":
            console.print(f"integration of run {run}: {status.state}: {status.message}")
            raise typer.Exit(3)
        _print_integration(submitter.write(status))
    except OrchestratorError as exc:
        raise _fail(str(exc)) from exc


@app.command()
def integrate(
    run: RunId,
    workdir: Workdir = CWD,
    database_url: DatabaseUrl = None,
    branch: Annotated[
        str | None,
        typer.Option(help="Branch name. Default: orchestrator/integration/<run>."),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="Commit the branch starts from (first integration of a run only). Default: "
            "the tasks' common base; when bases differ, the newest all others are ancestors of."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=256, help="Changes gated at once (the first batch).")
    ] = 4,
    adaptive: Annotated[
        bool,
        typer.Option(help="Double the batch after a passing one, halve it after a failing one."),
    ] = True,
    max_batch_size: Annotated[int, typer.Option(min=1, max=256, help="Adaptive limit.")] = 32,
    push: Annotated[
        bool,
        typer.Option(help="Push the branch to the tasks' repository (a URL), fast-forward only."),
    ] = False,
    keep_worktrees: Annotated[
        bool, typer.Option(help="Keep the gate's worktrees under .work/ for debugging.")
    ] = False,
    backend: Annotated[
        Backend,
        typer.Option(
            help="local: merge and gate here; kubernetes: apply the run's Integration resource "
            "(the operator merges, gates in Jobs and pushes) and follow it."
        ),
    ] = Backend.local,
    namespace: Annotated[
        str, typer.Option(help="kubernetes backend: namespace of the run's TaskExecutions.")
    ] = "default",
    kubeconfig: Annotated[
        str | None,
        typer.Option(envvar="KUBECONFIG", help="kubernetes backend: kubeconfig file."),
    ] = None,
    follow_timeout: Annotated[
        float | None,
        typer.Option(help="kubernetes backend: stop following after this many seconds."),
    ] = None,
) -> None:
    """Merge the run's COMPLETED tasks in queue order onto an integration branch, re-gated.

    Each task's patch (from the ledger) is applied three-way onto the ones before it; the
    test gate runs on the merged tree, for batches of changes at once (a failing batch is
    bisected). Verdict per task: merged, conflict, gate_failed or skipped. Tasks whose retry
    policy lists merge_conflict / merge_gate_failed are sent back to their adapter with the
    conflict or failure in the prompt. Writes .state/integration_results.json, one ledger
    entry per verdict, the database and events; incremental: run it again after more tasks
    completed. Exit code: 0 done, 3 tasks were sent back (run execute, then integrate again).
    With --backend kubernetes the operator does it (an Integration resource; the branch is
    pushed to the tasks' repository); exit 1 when it failed, 3 when it did not settle in time.
    """
    if max_batch_size < batch_size:
        raise _fail(f"--max-batch-size {max_batch_size} is below --batch-size {batch_size}")
    if backend is Backend.kubernetes:
        from core.kube.integration_submit import integration_resource

        body = integration_resource(
            run,
            branch=branch,
            base_commit=base,
            batch_size=batch_size,
            adaptive=adaptive,
            max_batch_size=max_batch_size,
        )
        _integrate_on_kubernetes(run, workdir, namespace, kubeconfig, follow_timeout, body)
        return
    config = IntegrationConfig(
        run_id=run,
        workdir=workdir,
        branch=branch,
        base_commit=base,
        batch=BatchPolicy(size=batch_size, adaptive=adaptive, max_size=max_batch_size),
        push=push,
        keep_worktrees=keep_worktrees,
    )
    try:
        done = _integrate(config, database_url, Metrics())
    except OrchestratorError as exc:
        raise _fail(str(exc)) from exc
    if done.reopened:
        console.print(
            f"sent back to their adapters: {', '.join(done.reopened)}; run `orchestrator "
            f"execute --run {run}`, then integrate again (or `execute --integrate`)",
            highlight=False,
        )
        raise typer.Exit(3)


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
        raise _fail(str(exc)) from exc
    s = results.summary
    console.print(
        f"run {run}: {s['COMPLETED']} completed, {s['FAILED']} failed, {s['TIMEOUT']} timeout, "
        f"{s['CANCELLED']} cancelled, {s['PENDING'] + s['IN_PROGRESS'] + s['VALIDATING']} "
        f"unfinished (of {s['total']})",
        highlight=False,
    )
    if not results.finished:
        raise typer.Exit(3)


@app.command()
def status(
    run: RunId,
    workdir: Workdir = CWD,
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each task's state, adapter, attempts, failure class, diff and gate of a run.

    The gate column names new failing tests; below the table, the run's flaky tests with how
    often each was flaky in any run.
    """
    store = _store(workdir, database_url)
    records = store.tasks(run)
    if not records:
        raise _fail(f"no tasks recorded for run {run!r} (known runs: {store.runs() or 'none'})")
    if as_json:
        console.print_json(json.dumps([r.result().model_dump(mode="json") for r in records]))
        return
    table = Table(title=f"run {run}")
    for col in ("task", "state", "class", "adapter", "att.", "diff", "gate", "note"):
        table.add_column(col)
    for r in records:
        res = r.result()
        last = res.last
        diff = gate = ""
        if last and last.diff and not last.diff.empty:
            d = last.diff
            diff = f"{d.files_changed}f +{d.insertions}/-{d.deletions}"
            diff += f" {d.binary_files}bin" if d.binary_files else ""
        if last and last.gate:
            gate = _gate_cell(last.gate)
        table.add_row(
            r.key.display,
            r.status.value,
            r.failure_class.value if r.failure_class else "",
            r.current_adapter_id or r.adapter_id,
            str(r.attempts),
            diff,
            gate,
            r.wait_reason or (r.failure_message or "").split("\n")[0][:60],
        )
    console.print(table)
    breakers = [a for a in store.adapters() if a.breaker_state != "CLOSED"]
    for a in breakers:
        name = f"{a.scope}/{a.id}" if a.scope else a.id
        console.print(f"circuit breaker {name}: {a.breaker_state}", highlight=False)
    flaky = TestHistory(store.engine).flaky_tests(run_id=run)
    if flaky:
        console.print(
            "flaky tests (passed when rerun alone; history of all runs):", highlight=False
        )
        for f in flaky:
            console.print(
                f"  {f.check}: {f.test_id}  {f.times}x, last {f.last_run}/{f.last_task} "
                f"{f.last_seen:%Y-%m-%d %H:%M}",
                highlight=False,
                markup=False,
            )


def _gate_cell(gate: GateResult) -> str:
    """The gate in one cell: what failed and why, or what passed with a caveat.

    Escaped for rich: test ids carry brackets (``test_x[1-2]``) that are not markup.
    """
    tamper = ["tamper flagged"] if gate.tamper.flagged else []
    if not gate.applied:
        return "failed: diff does not apply"
    if not gate.passed:
        return escape("; ".join(["failed: " + "; ".join(gate.blamed), *tamper]))
    extras = []
    for label, count in (
        ("pre-existing", sum(c.pre_existing_failures.count for c in gate.checks)),
        ("flaky", sum(c.flaky.count for c in gate.checks)),
        ("fixed", sum(c.fixed.count for c in gate.checks)),
    ):
        if count:
            extras.append(f"{count} {label}")
    extras += [
        f"{c.name} failed before"
        for c in gate.checks
        if c.status is CheckStatus.PRE_EXISTING and c.granularity == "check"
    ]
    extras += tamper
    return escape("passed" + (f" ({', '.join(extras)})" if extras else ""))


@app.command()
def logs(
    task: Annotated[
        str, typer.Argument(help="Task id (on Kubernetes also <namespace>/<task id>).")
    ],
    workdir: Workdir = CWD,
    attempt: Annotated[int | None, typer.Option(help="Only this attempt.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Print the JSONL records as stored.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
) -> None:
    """Print a task's captured output (logs/execution/<task>.jsonl)."""
    path = find_task_log(workdir, task)
    if path is None:
        where = workdir / "logs" / "execution"
        raise _fail(f"{where}: no log for task {task!r} (has it run in this work dir?)")
    seen = 0
    while True:
        records = list(read_records(path))
        for rec in records[seen:]:
            if attempt is not None and rec.get("attempt") != attempt:
                continue
            if raw:
                print(json.dumps(rec, ensure_ascii=False))
            elif "line" in rec:
                print(f"[{rec['attempt']}] {rec['stream']}: {rec['line']}")
            else:
                extra = {k: v for k, v in rec.items() if k not in ("ts", "task_id", "attempt")}
                print(f"[{rec['attempt']}] -- {json.dumps(extra, ensure_ascii=False)}")
        seen = len(records)
        if not follow:
            return
        time.sleep(0.5)


@ledger_app.command("verify")
def ledger_verify(workdir: Workdir = CWD, database_url: DatabaseUrl = None) -> None:
    """Check the ledger's hash chain, its patches and the patch_history mirror.

    Exit code 0 when intact, 1 with the first broken line named otherwise.
    """
    path = workdir / STATE_DIR / PATCH_LEDGER
    if not path.exists():
        raise _fail(f"{path}: no ledger in this work dir")
    store = _store(workdir, database_url)
    anchor = store.ledger_anchor() + IntegrationRows(store.engine).ledger_anchor()
    evidence = local_store(workdir)
    pruned = pruned_keys(evidence)
    report = verify(path, evidence, anchor, pruned)
    if report.ok:
        note = f" ({len(pruned)} pruned by gc)" if pruned else ""
        console.print(
            f"ledger OK: {report.entries} entries, chain and patches intact{note}",
            highlight=False,
        )
        return
    err.print(f"ledger BROKEN ({len(report.problems)} problems):", highlight=False)
    for problem in report.problems:
        err.print(f"  {problem}", highlight=False)
    raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(
    workdir: Workdir = CWD,
    database_url: DatabaseUrl = None,
    revision: Annotated[str, typer.Option(help="Target Alembic revision.")] = "head",
) -> None:
    """Create or migrate the database schema (idempotent)."""
    url = database_url or default_url(workdir)
    try:
        upgrade(url, revision, evidence_root=local_store(workdir).root)
    except Exception as exc:
        raise _fail(f"migration of {redact(url)} failed: {exc}") from exc
    console.print(f"database {redact(url)} at revision {revision}", highlight=False)


@app.command()
def adapters(workdir: Workdir = CWD, database_url: DatabaseUrl = None) -> None:
    """List adapters with their circuit breaker and last health check."""
    store = _store(workdir, database_url)
    table = Table(title="adapters")
    for col in ("id", "kind", "breaker", "failures", "health", "checked"):
        table.add_column(col)
    for a in store.adapters():
        table.add_row(
            f"{a.scope}/{a.id}" if a.scope else a.id,
            a.kind,
            a.breaker_state,
            str(a.breaker_failures),
            a.health_status or "-",
            a.health_checked_at.isoformat(timespec="seconds") if a.health_checked_at else "-",
        )
    console.print(table)


@manual_app.command("submit")
def manual_submit(
    task: Annotated[str, typer.Argument(help="Task id routed to a manual adapter.")],
    patch: Annotated[
        Path, typer.Argument(help="Unified diff (git diff --binary) against the base commit.")
    ],
    run: RunId,
    workdir: Workdir = CWD,
    database_url: DatabaseUrl = None,
) -> None:
    """Hand in a human-made patch for a task waiting on a manual adapter."""
    store = _store(workdir, database_url)
    try:
        record = store.task(TaskKey(run, task))
    except KeyError:
        raise _fail(f"run {run!r} has no task {task!r}") from None
    if record.status.terminal:
        raise _fail(f"task {task} is already {record.status.value}; nothing to submit")
    if not patch.is_file():
        raise _fail(f"{patch}: patch file not found")
    _, target = manual_paths(workdir, run, task)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(patch.read_bytes())
    console.print(
        f"patch stored at {target}; run `orchestrator execute --run {run}` to test and record it",
        highlight=False,
    )


@app.command()
def cancel(
    task: Annotated[str, typer.Argument(help="Task id.")],
    run: RunId,
    workdir: Workdir = CWD,
    database_url: DatabaseUrl = None,
    reason: Annotated[str, typer.Option(help="Why (recorded with the task).")] = (
        "cancelled with `orchestrator cancel`"
    ),
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also a task recorded IN_PROGRESS/VALIDATING: only when no executor runs it "
            "(its process group, if alive, is ended).",
        ),
    ] = False,
) -> None:
    """Cancel a task that is not running (waiting for a breaker, a human, a retry): it ends
    CANCELLED, class `cancelled`, with a TASK_FAILED event; nothing else is touched."""
    store = _store(workdir, database_url)
    key = TaskKey(run, task)
    try:
        record = store.task(key)
    except KeyError:
        raise _fail(f"run {run!r} has no task {task!r}") from None
    if record.status.terminal:
        raise _fail(f"task {task} is already {record.status.value}; nothing to cancel")
    if record.status in (TaskState.IN_PROGRESS, TaskState.VALIDATING):
        if not force:
            raise _fail(
                f"task {task} is {record.status.value}: an executor may be running it; stop "
                "the executor first (it records the attempt as interrupted), or pass --force "
                "if none is running"
            )
        if record.pid is not None and process_group_alive(record.pid):
            terminate_group(record.pid)
    recorder = Recorder(store, workdir, metrics=Metrics(), clock=lambda: datetime.now(UTC))
    ended = recorder.end(key, Finish(TaskState.CANCELLED, FailureClass.CANCELLED, reason))
    console.print(f"task {task} of run {run}: {ended.status.value}", highlight=False)


@schema_app.command("generate")
def schema_generate(
    check: Annotated[
        bool, typer.Option(help="Fail if the files differ instead of writing.")
    ] = False,
    root: Annotated[Path, typer.Option(help="Repository root.")] = CWD,
) -> None:
    """Write schema/*.json from the pydantic models (``--check``: exit 1 on drift)."""
    from core.schemas import generated_files

    drift = []
    for rel, content in generated_files().items():
        path = root / rel
        if path.exists() and path.read_text(encoding="utf-8") == content:
            continue
        drift.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
    if check and drift:
        raise _fail(
            "generated files are out of date: "
            + ", ".join(drift)
            + "\n  fix: run `orchestrator schema generate`",
            1,
        )
    console.print("up to date" if not drift else "wrote " + ", ".join(drift), highlight=False)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except OrchestratorError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""``orchestrator integrate``: merge a run's completed tasks onto an integration branch.

Locally the integration worker runs here; with ``--backend kubernetes`` the run's Integration
resource is applied and followed (:func:`integrate_on_kubernetes`). ``execute --integrate`` in
:mod:`core.cli` shares both and the printing of an integration, so every path reports an
integration the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from core.cli_common import (
    CWD,
    Backend,
    DatabaseUrl,
    FollowTimeout,
    Kubeconfig,
    RunId,
    Workdir,
    console,
    fail,
)
from core.engine.integration_worker import (
    IntegrationConfig,
    IntegrationRun,
    build_integration_worker,
)
from core.engine.merge_queue import BatchPolicy
from core.engine.monitoring.metrics import Metrics
from core.errors import OrchestratorError
from core.models import IntegrationResults


def run_integration(
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


def integrate_on_kubernetes(
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
            f"Integration {namespace}/{run} {'created' if created else 'exists (kept)'}; following",
            highlight=False,
        )
        status = submitter.follow(timeout)
        if status.state == "Failed":
            raise fail(f"integration of run {run} failed: {status.reason}: {status.message}", 1)
        if status.state != "Succeeded":
            console.print(f"integration of run {run}: {status.state}: {status.message}")
            raise typer.Exit(3)
        _print_integration(submitter.write(status))
    except OrchestratorError as exc:
        raise fail(str(exc)) from exc


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
    kubeconfig: Kubeconfig = None,
    follow_timeout: FollowTimeout = None,
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
        raise fail(f"--max-batch-size {max_batch_size} is below --batch-size {batch_size}")
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
        integrate_on_kubernetes(run, workdir, namespace, kubeconfig, follow_timeout, body)
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
        done = run_integration(config, database_url, Metrics())
    except OrchestratorError as exc:
        raise fail(str(exc)) from exc
    if done.reopened:
        console.print(
            f"sent back to their adapters: {', '.join(done.reopened)}; run `orchestrator "
            f"execute --run {run}`, then integrate again (or `execute --integrate`)",
            highlight=False,
        )
        raise typer.Exit(3)

"""The commands that look at or act on a run's tasks: status, logs, adapters, cancel, manual submit.

Registered on the app by :mod:`core.cli`; they read the work dir's database and task logs and
change a task only through the recorder (``cancel``) or the manual adapter's inbox (``submit``).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from core.cli_common import CWD, DatabaseUrl, RunId, Workdir, console, fail, open_store
from core.db.test_history import TestHistory
from core.engine.adapters import manual_paths
from core.engine.lifecycle import Finish
from core.engine.monitoring.metrics import Metrics
from core.engine.process_group import process_group_alive, terminate_group
from core.engine.recorder import Recorder
from core.engine.task_log import find_task_log, read_records
from core.identity import TaskKey
from core.models import CheckStatus, FailureClass, GateResult, TaskState


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
    store = open_store(workdir, database_url)
    records = store.tasks(run)
    if not records:
        raise fail(f"no tasks recorded for run {run!r} (known runs: {store.runs() or 'none'})")
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
        raise fail(f"{where}: no log for task {task!r} (has it run in this work dir?)")
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


def adapters(workdir: Workdir = CWD, database_url: DatabaseUrl = None) -> None:
    """List adapters with their circuit breaker and last health check."""
    store = open_store(workdir, database_url)
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
    store = open_store(workdir, database_url)
    try:
        record = store.task(TaskKey(run, task))
    except KeyError:
        raise fail(f"run {run!r} has no task {task!r}") from None
    if record.status.terminal:
        raise fail(f"task {task} is already {record.status.value}; nothing to submit")
    if not patch.is_file():
        raise fail(f"{patch}: patch file not found")
    _, target = manual_paths(workdir, run, task)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(patch.read_bytes())
    console.print(
        f"patch stored at {target}; run `orchestrator execute --run {run}` to test and record it",
        highlight=False,
    )


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
    store = open_store(workdir, database_url)
    key = TaskKey(run, task)
    try:
        record = store.task(key)
    except KeyError:
        raise fail(f"run {run!r} has no task {task!r}") from None
    if record.status.terminal:
        raise fail(f"task {task} is already {record.status.value}; nothing to cancel")
    if record.status in (TaskState.IN_PROGRESS, TaskState.VALIDATING):
        if not force:
            raise fail(
                f"task {task} is {record.status.value}: an executor may be running it; stop "
                "the executor first (it records the attempt as interrupted), or pass --force "
                "if none is running"
            )
        if record.pid is not None and process_group_alive(record.pid):
            terminate_group(record.pid)
    recorder = Recorder(store, workdir, metrics=Metrics(), clock=lambda: datetime.now(UTC))
    ended = recorder.end(key, Finish(TaskState.CANCELLED, FailureClass.CANCELLED, reason))
    console.print(f"task {task} of run {run}: {ended.status.value}", highlight=False)

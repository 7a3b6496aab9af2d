"""``orchestrator export`` and ``orchestrator gc``: the evidence store from the command line.

Apart from :mod:`core.cli` (which registers these commands) to keep each module one concept:
these two read and prune the evidence store, the ledger and the task logs of a work dir. Their
``--workdir`` / ``--database-url`` are declared here, not with :mod:`core.cli_common`'s types,
because those carry help texts these two commands have never shown.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Annotated

import typer

from core.cli_common import console, err, fail, open_store
from core.db.store import Store, TaskRecord
from core.engine.evidence import EvidenceStore, local_store
from core.engine.evidence_s3 import store_from_env
from core.engine.patch_ledger import PatchLedger
from core.engine.retention import RetentionPolicy, collect
from core.engine.state_files import PATCH_LEDGER, STATE_DIR
from core.errors import EvidenceError
from core.identity import TaskKey
from core.models import AttemptResult

_CHUNK = 1024 * 1024


def _evidence(workdir: Path) -> EvidenceStore:
    """The work dir's store, or the operator's S3 bucket when the environment names it
    (``ORCHESTRATOR_EVIDENCE_BACKEND=s3`` and ``ORCHESTRATOR_S3_*``, as the operator's)."""
    try:
        return store_from_env(os.environ) or local_store(workdir)
    except EvidenceError as exc:
        raise fail(str(exc)) from exc


def _find_task(store: Store, run: str, task: str) -> TaskRecord:
    record = store.find_task(TaskKey(run, task))
    if record is not None:
        return record
    matches = [r for r in store.tasks(run) if task in (r.key.display, r.task_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(f"{m.key.display} ({m.key.uid})" for m in matches)
        raise fail(f"run {run!r} has several tasks named {task!r}: {names}; name one")
    raise fail(f"run {run!r} has no task {task!r} (known runs: {store.runs() or 'none'})")


def _pick_attempt(record: TaskRecord, attempt: int | None) -> AttemptResult:
    results = record.attempt_results
    if attempt is not None:
        for result in results:
            if result.attempt == attempt:
                return result
        raise fail(f"task {record.key.display} has no recorded attempt {attempt}")
    with_diff = [r for r in results if r.diff is not None and not r.diff.empty]
    if not with_diff:
        raise fail(f"task {record.key.display} has no recorded attempt with a diff")
    return with_diff[-1]


def export(
    run: Annotated[str, typer.Option("--run", "-r", help="Run id.")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task id (or <namespace>/<task>).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the diff ('-': stdout).")
    ],
    attempt: Annotated[
        int | None, typer.Option(help="Attempt number. Default: the last one with a diff.")
    ] = None,
    workdir: Annotated[
        Path, typer.Option("--workdir", "-w", file_okay=False, resolve_path=True)
    ] = Path("."),
    database_url: Annotated[
        str | None, typer.Option("--database-url", envvar="ORCHESTRATOR_DATABASE_URL")
    ] = None,
) -> None:
    """Write the full diff of a task's attempt, as recorded, from the evidence store.

    The bytes are checked against the sha256 recorded for the attempt: `git apply` of the
    file reproduces exactly the change that was judged. Exit 1 when the stored copy does not
    match (a copy cut by a version before the evidence store), 2 when there is none.
    """
    store = open_store(workdir, database_url)
    record = _find_task(store, run, task)
    result = _pick_attempt(record, attempt)
    diff = result.diff
    if diff is None:
        raise fail(f"attempt {result.attempt} of {record.key.display} captured no diff")
    if diff.truncated:
        raise fail(
            f"attempt {result.attempt} of {record.key.display}: its diff ({diff.bytes} bytes "
            "seen) exceeded the hard limit and was not kept"
        )
    if diff.empty:
        raise fail(f"attempt {result.attempt} of {record.key.display}: the diff is empty")
    key = diff.patch_ref or store.patch_ref(record.key, result.attempt)
    if key is None:
        raise fail(f"attempt {result.attempt} of {record.key.display}: no stored copy")
    evidence = _evidence(workdir)
    digest, size = hashlib.sha256(), 0
    target = None if str(output) == "-" else output.resolve()
    tmp: IO[bytes]
    if target is None:
        tmp = sys.stdout.buffer
    else:
        tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=".export-", delete=False)
    try:
        with evidence.open(key) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                tmp.write(chunk)
        tmp.flush()
    except EvidenceError as exc:
        if target is not None:
            tmp.close()
            Path(tmp.name).unlink(missing_ok=True)
        raise fail(f"{exc} (pruned by `orchestrator gc --include-referenced`?)") from exc
    if target is not None:
        tmp.close()
    if digest.hexdigest() != diff.sha256:
        if target is not None:
            Path(tmp.name).unlink(missing_ok=True)
        raise fail(
            f"the stored copy {key} ({size} bytes, sha256 {digest.hexdigest()}) does not match "
            f"the recorded diff ({diff.bytes} bytes, sha256 {diff.sha256})",
            1,
        )
    if target is not None:
        os.replace(tmp.name, target)
        err.print(
            f"wrote {target}: {size} bytes, sha256 {diff.sha256} (attempt {result.attempt} of "
            f"{record.key.display}, base {record.spec.base_commit})",
            highlight=False,
        )


def _size(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = raw[-1:] if raw[-1:] in units and not raw[-1:].isdigit() else ""
    try:
        return int(float(raw.removesuffix(unit)) * units[unit])
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a size (e.g. 500M, 2G)") from None


def gc(
    older_than_days: Annotated[
        float | None,
        typer.Option("--older-than-days", min=0, help="Delete what is older than this."),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size", help="Then delete oldest first until evidence + logs fit (e.g. 2G)."
        ),
    ] = None,
    include_referenced: Annotated[
        bool,
        typer.Option(
            help="Also delete patches the ledger references (export and verify then report "
            "them as pruned)."
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Only list what would be deleted.")] = False,
    workdir: Annotated[
        Path, typer.Option("--workdir", "-w", file_okay=False, resolve_path=True)
    ] = Path("."),
    database_url: Annotated[
        str | None, typer.Option("--database-url", envvar="ORCHESTRATOR_DATABASE_URL")
    ] = None,
) -> None:
    """Apply a retention policy to the work dir's evidence store and task logs.

    The operator's work dir too: its store also holds runner requests and pod uploads
    (requests/, incoming/), temporary, deleted like orphans. With
    ORCHESTRATOR_EVIDENCE_BACKEND=s3 (and the operator's ORCHESTRATOR_S3_* settings) the
    store is that bucket. Never deletes a patch the ledger or the database references unless
    --include-referenced is given; never deletes the log of a task that is running or
    waiting; never touches state files, the ledger, the database or logs/*.jsonl.
    Unreferenced patches (a crash between storing and recording) go once an hour old.
    """
    if older_than_days is None and max_size is None:
        raise fail("give --older-than-days and/or --max-size (nothing to do otherwise)")
    store = open_store(workdir, database_url)
    evidence = _evidence(workdir)
    ledger = PatchLedger(workdir / STATE_DIR / PATCH_LEDGER, evidence)
    referenced = {e.patch_ref for e in ledger.entries() if e.patch_ref} | store.patch_refs()
    active = {r.key.log_name for r in store.unfinished()}
    policy = RetentionPolicy(
        older_than=timedelta(days=older_than_days) if older_than_days is not None else None,
        max_bytes=_size(max_size) if max_size is not None else None,
        include_referenced=include_referenced,
        dry_run=dry_run,
    )
    report = collect(
        evidence,
        workdir / "logs" / "execution",
        referenced=referenced,
        active_logs=active,
        policy=policy,
        now=datetime.now(UTC),
        tombstones_dir=local_store(workdir).root,
    )
    verb = "would delete" if dry_run else "deleted"
    for item, why in report.removed:
        console.print(f"{verb} {item.kind} {item.name} ({item.size} bytes): {why}", highlight=False)
    console.print(
        f"{verb} {len(report.removed)} item(s), {report.freed_bytes} bytes; "
        f"{report.remaining_bytes} bytes remain; {report.kept_referenced} referenced patch(es) "
        "kept",
        highlight=False,
    )

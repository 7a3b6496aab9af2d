"""Keeping the durable artifacts sound: ``db upgrade``, ``ledger verify``, ``schema generate``.

Registered under the ``db``, ``ledger`` and ``schema`` groups by :mod:`core.cli`: migrating the
database, checking the ledger's hash chain against the database and the evidence store, and
writing the JSON Schemas generated from the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.cli_common import CWD, DatabaseUrl, Workdir, console, err, fail, open_store
from core.db.database import default_url, redact, upgrade
from core.db.integration_rows import IntegrationRows
from core.engine.evidence import local_store
from core.engine.patch_ledger import verify
from core.engine.retention import pruned_keys
from core.engine.state_files import PATCH_LEDGER, STATE_DIR


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
        raise fail(f"migration of {redact(url)} failed: {exc}") from exc
    console.print(f"database {redact(url)} at revision {revision}", highlight=False)


def ledger_verify(workdir: Workdir = CWD, database_url: DatabaseUrl = None) -> None:
    """Check the ledger's hash chain, its patches and the patch_history mirror.

    Exit code 0 when intact, 1 with the first broken line named otherwise.
    """
    path = workdir / STATE_DIR / PATCH_LEDGER
    if not path.exists():
        raise fail(f"{path}: no ledger in this work dir")
    store = open_store(workdir, database_url)
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
        raise fail(
            "generated files are out of date: "
            + ", ".join(drift)
            + "\n  fix: run `orchestrator schema generate`",
            1,
        )
    console.print("up to date" if not drift else "wrote " + ", ".join(drift), highlight=False)

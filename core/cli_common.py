"""What every ``orchestrator`` command shares: the consoles, the option types, failing, the store.

Apart from the commands so that each command module (tasks, integration, evidence, admin) and
the app in :mod:`core.cli` use one definition: the same ``--workdir`` / ``--database-url`` /
``--run`` options, the same ``error:`` line with exit code 2, and the same schema check with a
fix that names the command to run.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from core.db.database import check_schema, default_url, make_engine, redact
from core.db.store import Store
from core.errors import OrchestratorError

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
Kubeconfig = Annotated[
    str | None, typer.Option(envvar="KUBECONFIG", help="kubernetes backend: kubeconfig file.")
]
FollowTimeout = Annotated[
    float | None,
    typer.Option(help="kubernetes backend: stop following after this many seconds."),
]


class Backend(StrEnum):
    local = "local"
    kubernetes = "kubernetes"


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned exit (code 2: fixable)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def open_store(workdir: Path, database_url: str | None) -> Store:
    """The work dir's store, or exit 2 naming `orchestrator db upgrade` when the schema is old."""
    url = database_url or default_url(workdir)
    engine = make_engine(url)
    where = f"--database-url {redact(url)}" if database_url else f"--workdir {workdir}"
    try:
        check_schema(engine, url, f"run `orchestrator db upgrade {where}`")
    except OrchestratorError as exc:
        raise fail(str(exc)) from exc
    return Store(engine)

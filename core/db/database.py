"""Database connection, migrations and the entry check for required tables.

SQLite (a file under the work dir) is the embedded default; PostgreSQL is chosen by URL
(``ORCHESTRATOR_DATABASE_URL`` or ``--database-url``). The schema is owned by Alembic:
``orchestrator db upgrade`` migrates, and the executor refuses to start on a database that is
missing the seed's tables rather than creating them behind the user's back.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url

from core.db.tables import REQUIRED_TABLES
from core.errors import DatabaseSchemaError

DEFAULT_DB_FILE = "orchestrator.db"


def default_url(workdir: Path) -> str:
    return f"sqlite:///{(workdir / DEFAULT_DB_FILE).resolve()}"


def sqlite_files(url: str) -> list[Path]:
    """The files of a SQLite database (with its journal, WAL and shared-memory files); empty
    for a server database. The embedded sandbox hides them from adapters."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return []
    if parsed.database == ":memory:":
        return []
    db = Path(parsed.database).resolve()
    return [db, *(db.with_name(db.name + suffix) for suffix in ("-journal", "-wal", "-shm"))]


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("core.db") / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", *, evidence_root: Path | None = None) -> None:
    """Run Alembic migrations up to ``revision`` (creates the SQLite file if needed).

    ``evidence_root``: the work dir's evidence store (``<workdir>/.ledger``), for migrations
    that move bulk out of the database (``0004``); default for a SQLite file: beside it.
    """
    parsed = make_url(url)
    cfg = alembic_config(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        evidence_root = evidence_root or Path(parsed.database).resolve().parent / ".ledger"
    if evidence_root is not None:
        cfg.attributes["evidence_root"] = str(evidence_root)
    command.upgrade(cfg, revision)


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine, url: str, fix: str | None = None) -> None:
    """Refuse to run on a database without the seed's tables or at an old migration."""
    fix = fix or f"run `orchestrator db upgrade --database-url {redact(url)}`"
    names = set(inspect(engine).get_table_names())
    for table, columns in REQUIRED_TABLES.items():
        if table not in names:
            raise DatabaseSchemaError(
                f"database {redact(url)}: required table `{table}` is missing\n  fix: {fix}"
            )
        have = {c["name"] for c in inspect(engine).get_columns(table)}
        if missing := columns - have:
            raise DatabaseSchemaError(
                f"database {redact(url)}: table `{table}` lacks column(s) "
                f"{', '.join(sorted(missing))}\n  fix: {fix}"
            )
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise DatabaseSchemaError(
            f"database {redact(url)} is at migration {current or 'none'}, this version needs "
            f"{head}\n  fix: {fix}"
        )

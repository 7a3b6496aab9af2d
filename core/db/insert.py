"""INSERT ... ON CONFLICT DO NOTHING that says whether it inserted, on SQLite and PostgreSQL.

Why not the cursor's ``rowcount``: psycopg reports -1 for such an insert, so a duplicate
looked new on PostgreSQL and a replayed event, flake or verdict was counted twice. The
insert returns the new row's primary key instead: a row back means it was added.

The statement is built once per (dialect, table) and the values travel as parameters: a
statement built with the values in it costs SQLAlchemy a new cache key (every value coerced)
on every call, several times the cost of the insert itself on SQLite.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert


@cache
def _statement(dialect: str, table: Table) -> Insert:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing().returning(*table.primary_key)


def insert_ignore(db: Session | Connection, table: Table, values: dict[str, Any]) -> bool:
    """Insert ``values`` unless a unique key already holds them; True if a row was added."""
    dialect = db.dialect if isinstance(db, Connection) else db.get_bind().dialect
    statement = _statement(dialect.name, table)
    return db.execute(statement, values).first() is not None

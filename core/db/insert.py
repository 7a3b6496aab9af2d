"""INSERT ... ON CONFLICT DO NOTHING that says whether it inserted, on SQLite and PostgreSQL.

Why not the cursor's ``rowcount``: psycopg reports -1 for such an insert, so a duplicate
looked new on PostgreSQL and a replayed event, flake or verdict was counted twice. The
insert returns the new row's primary key instead: a row back means it was added.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(session: Session, table: Table, values: dict[str, Any]) -> bool:
    """Insert ``values`` unless a unique key already holds them; True if a row was added."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(table).values(**values).on_conflict_do_nothing().returning(*table.primary_key)
    )
    return session.execute(statement).first() is not None

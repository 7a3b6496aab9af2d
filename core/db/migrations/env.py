"""Alembic environment: runs migrations on the URL the caller put in the config."""

from __future__ import annotations

from alembic import context

from core.db.database import make_engine
from core.db.tables import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set by core.db.database.alembic_config()"

connectable = make_engine(url)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()

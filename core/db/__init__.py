"""SQL persistence: SQLAlchemy 2 tables, Alembic migrations and idempotent writes."""

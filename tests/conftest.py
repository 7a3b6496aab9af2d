"""Shared test fixtures: repository paths and a real PostgreSQL when one is needed."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """URL of a real PostgreSQL: $ORCHESTRATOR_TEST_POSTGRES_URL, else hack/postgres/up."""
    url = os.environ.get("ORCHESTRATOR_TEST_POSTGRES_URL")
    if not url:
        url = subprocess.run(
            [str(ROOT / "hack/postgres/up")], check=True, capture_output=True, text=True
        ).stdout.strip()
    return url


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the test server, dropped afterwards."""
    name = f"orch_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        postgres_server_url.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = postgres_server_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()

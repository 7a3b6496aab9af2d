"""Integration fixtures: a copy of the demo work dir and a migrated database of each kind."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from core.db.database import default_url, upgrade
from core.engine.executor import Clocks, Executor, ExecutorConfig, build_executor
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress


@pytest.fixture
def demo_dir(tmp_path: Path, repo_root: Path) -> Path:
    target = tmp_path / "demo"
    shutil.copytree(repo_root / "examples/demo", target)
    return target


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, demo_dir: Path) -> str:
    if request.param == "sqlite":
        url = default_url(demo_dir)
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


@pytest.fixture
def make_executor(demo_dir: Path, db_url: str) -> Callable[..., Executor]:
    def make(run_id: str = "demo", workdir: Path | None = None, **config: object) -> Executor:
        cfg = ExecutorConfig(
            run_id=run_id, workdir=workdir or demo_dir, database_url=db_url, **config
        )  # type: ignore[arg-type]
        return build_executor(
            cfg, progress=SilentProgress(), metrics=Metrics(), clocks=Clocks(sleep=lambda _: None)
        )

    return make

"""Issue 14 end to end on the embedded backend: a real pytest project with a failing test at
its base commit, patches applied by the `patch` adapter, the gate judged test by test.

What the issue asks to show: a patch that breaks another test ends FAILED (gate_failed) and
names it, listing the old failure as pre-existing; a harmless patch over the same base is
COMPLETED; a test failing once then passing is flaky and the task still COMPLETED; a patch
deleting the failing test is flagged (and fails the gate under on_tamper: fail). Recorded in
the results file, the database (SQLite and PostgreSQL), the metric and `orchestrator status`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from core.db.database import make_engine, upgrade
from core.db.test_history import TestHistory
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress
from core.engine.workspace import add_worktree, capture_diff, remove_worktree
from core.models import CheckStatus, FailureClass, TaskState
from tests.gate_projects import CALC_PY, PYTEST_TESTS, pytest_project
from tests.workdirs import make_workdir

RUN = "gate"
SUB = "tests/test_calc.py::test_sub"
MUL = "tests/test_calc.py::test_mul"
FLAKY = "tests/test_flaky.py::test_flaky"
CHECK = {"name": "pytest", "command": ["{python}", "-m", "pytest", "-q", "tests"]}


def patch_against(repo: Path, base: str, files: dict[str, str], scratch: Path) -> str:
    tree = add_worktree(repo, scratch, base)
    try:
        for rel, text in files.items():
            (tree / rel).write_text(text)
        return capture_diff(tree, base, 10_000_000).patch.decode()
    finally:
        remove_worktree(tree)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orchestrator.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_gate_per_test_through_the_executor(tmp_path: Path, database: str) -> None:
    edits = {
        "break-sub": {"calc.py": CALC_PY.replace("return a - b", "return a + b")},
        "harmless": {"calc.py": CALC_PY + "\n\ndef div(a, b):\n    return a / b\n"},
        "delete-failing": {
            "tests/test_calc.py": PYTEST_TESTS[: PYTEST_TESTS.index("def test_mul")]
        },
    }
    tasks = [
        {"task_id": tid, "prompt": f"Apply {tid}.", "gate": [CHECK], "gate_baseline": True}
        for tid in edits
    ]
    tasks.append(
        {
            "task_id": "delete-failing-strict",
            "prompt": "Apply delete-failing, strict.",
            "gate": [CHECK],
            "gate_baseline": True,
            "gate_policy": {"on_tamper": "fail"},
        }
    )
    workdir = make_workdir(
        tmp_path / "w",
        run_id=RUN,
        tasks=tasks,
        adapters=[{"id": "patcher", "kind": "patch"}],
        routes={t["task_id"]: "patcher" for t in tasks},
        files=pytest_project(flaky=True),
    )
    queue_file = workdir / ".state/task_queue.json"
    queue = json.loads(queue_file.read_text())
    base = queue["tasks"][0]["base_commit"]
    for i, task in enumerate(queue["tasks"]):
        edit = edits[task["task_id"].removesuffix("-strict")]
        task["patch"] = patch_against(workdir / "repo", base, edit, tmp_path / f"author{i}")
    queue_file.write_text(json.dumps(queue))

    upgrade(database)
    metrics = Metrics()
    executor = build_executor(
        ExecutorConfig(run_id=RUN, workdir=workdir, database_url=database),
        progress=SilentProgress(),
        metrics=metrics,
        clocks=Clocks(sleep=lambda _: None),
    )
    results = executor.run()
    by_id = {t.task_id: t for t in results.tasks}

    broken = by_id["break-sub"]
    assert broken.state is TaskState.FAILED
    assert broken.failure_class is FailureClass.GATE_FAILED
    assert broken.failure_message == f"test gate failed: pytest (new failures: {SUB})"
    check = broken.attempts[-1].gate.checks[0]  # type: ignore[union-attr]
    assert check.new_failures.names == [SUB]
    assert check.pre_existing_failures.names == [MUL]
    assert check.flaky.names == [FLAKY]
    assert len(broken.attempts) == 1  # gate_failed is not retried by default

    harmless = by_id["harmless"]
    assert harmless.state is TaskState.COMPLETED
    gate = harmless.attempts[-1].gate
    assert gate is not None and gate.passed
    assert gate.checks[0].status is CheckStatus.PRE_EXISTING
    assert gate.checks[0].pre_existing_failures.names == [MUL]
    assert gate.checks[0].flaky.names == [FLAKY]  # failed once, passed alone: not blamed

    deleted = by_id["delete-failing"]
    assert deleted.state is TaskState.COMPLETED
    gate = deleted.attempts[-1].gate
    assert gate is not None and gate.tamper.flagged and not gate.tamper.fails_gate
    assert gate.checks[0].removed_failing.names == [MUL]

    strict = by_id["delete-failing-strict"]
    assert strict.state is TaskState.FAILED
    assert strict.failure_class is FailureClass.GATE_FAILED
    assert "removed failing tests: 1" in strict.failure_message

    # the results file holds the same per-test results
    on_disk = json.loads((workdir / ".state/execution_results.json").read_text())
    disk_check = next(t for t in on_disk["tasks"] if t["task_id"] == "break-sub")
    assert disk_check["attempts"][0]["gate"]["checks"][0]["new_failures"]["names"] == [SUB]

    # the database: every non-passing test of every attempt, and the flake history
    history = TestHistory(make_engine(database))
    rows = set(history.results(RUN))
    assert ("break-sub", 1, "pytest", SUB, "new_failure") in rows
    assert ("break-sub", 1, "pytest", MUL, "pre_existing") in rows
    assert ("delete-failing", 1, "pytest", MUL, "removed") in rows
    flaky_rows = {r for r in rows if r[4] == "flaky"}
    assert {r[0] for r in flaky_rows} == set(by_id)  # every task's gate saw the flake
    flaky = history.flaky_tests(run_id=RUN)
    assert [(f.check, f.test_id) for f in flaky][:1] == [("pytest", FLAKY)]
    assert flaky[0].times == 8  # four tasks, baseline and patched tree each
    text = generate_latest(metrics.registry).decode()
    assert 'gate_flaky_tests_total{check="pytest"} 8.0' in text
    assert 'gate_test_results_total{check="pytest",outcome="new_failure"} 1.0' in text

    # what a user sees (cells wrap in the table: the words are checked, not the layout)
    argv = ["status", "--run", RUN, "--workdir", str(workdir), "--database-url", database]
    status = subprocess.run(
        [sys.executable, "-m", "core.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    words = status.stdout.split()
    assert "tests/test_calc.py::test_sub)" in words  # the gate cell of break-sub
    assert "flagged)" in words  # delete-failing: "passed (1 flaky, tamper flagged)"
    assert "flaky tests (passed when rerun alone; history of all runs):" in status.stdout
    assert f"pytest: {FLAKY}  8x, last {RUN}/" in status.stdout

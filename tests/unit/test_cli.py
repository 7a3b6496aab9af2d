"""The `orchestrator` command as a user meets it: help, entry-contract errors, status, logs, ledger."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=cwd or ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    target = tmp_path / "demo"
    shutil.copytree(ROOT / "examples/demo", target)
    return target


def test_help_texts_describe_every_command() -> None:
    top = cli("--help")
    assert top.returncode == 0
    for command in ("execute", "status", "logs", "ledger", "db", "adapters", "manual", "schema"):
        assert command in top.stdout
    execute = cli("execute", "--help")
    for option in ("--run", "--workdir", "--database-url", "--backend", "--metrics-port"):
        assert option in execute.stdout
    assert "ORCHESTRATOR_DATABASE_URL" in execute.stdout
    for option in ("--watch", "--poll-seconds", "--escalation-webhook", "--escalation-format"):
        assert option in execute.stdout
    assert "ORCHESTRATOR_ESCALATION_WEBHOOK" in execute.stdout


def test_execute_needs_a_run_unless_it_watches(tmp_path: Path) -> None:
    result = cli("execute", "--workdir", str(tmp_path))
    assert result.returncode == 2
    assert "pass --run <id> (or --watch" in result.stderr


def test_missing_database_is_refused_before_any_work(demo: Path) -> None:
    result = cli("execute", "--run", "demo", "--workdir", str(demo))
    assert result.returncode == 2
    assert "required table `tasks` is missing" in result.stderr
    assert f"orchestrator db upgrade --workdir {demo}" in result.stderr
    assert not (demo / "logs").exists() and not (demo / ".state/patch_ledger.jsonl").exists()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: (d / ".state/ROUTING_COMPLETE").unlink(),
            "ROUTING_COMPLETE: required file is missing",
        ),
        (
            lambda d: (d / ".state/task_queue.json").write_text("{not json"),
            "task_queue.json: field",
        ),
        (
            lambda d: (d / ".state/routing_decisions.json").write_text(
                (d / ".state/routing_decisions.json")
                .read_text()
                .replace('"adapter_id": "human"', '"adapter_id": "robot"')
            ),
            "field `decisions.7.adapter_id`: task 'human-docs' names unknown adapter 'robot'",
        ),
        (
            lambda d: (d / ".state/ROUTING_COMPLETE").write_text(
                '{"run_id": "other", "completed_at": "2026-01-01T00:00:00Z"}'
            ),
            "is 'other', but this execution is for run 'demo'",
        ),
    ],
    ids=["no-flag", "bad-json", "unknown-adapter", "run-mismatch"],
)
def test_entry_contract_errors_name_file_field_and_fix(demo: Path, mutate, expected: str) -> None:
    assert cli("db", "upgrade", "--workdir", str(demo)).returncode == 0
    mutate(demo)
    result = cli("execute", "--run", "demo", "--workdir", str(demo))
    assert result.returncode == 2, result.stdout
    message = " ".join(result.stderr.split())
    assert expected in message
    assert "fix:" in message
    assert not (demo / ".state/patch_ledger.jsonl").exists()


def test_status_logs_and_ledger_after_a_run(demo: Path) -> None:
    assert cli("db", "upgrade", "--workdir", str(demo)).returncode == 0
    run = cli("execute", "--run", "demo", "--workdir", str(demo))
    assert run.returncode == 3  # one task waits for a human
    assert "3 completed, 3 failed, 1 timeout, 0 cancelled, 1 waiting (of 8)" in run.stdout

    status = cli("status", "--run", "demo", "--workdir", str(demo), "--json")
    assert status.returncode == 0
    states = {t["task_id"]: t["state"] for t in json.loads(status.stdout)}
    assert states["slow-tool"] == "TIMEOUT" and states["human-docs"] == "PENDING"
    table = cli("status", "--run", "demo", "--workdir", str(demo))
    assert "gate_failed" in table.stdout and "unit-tests" in table.stdout

    logs = cli("logs", "tool-crash", "--workdir", str(demo))
    assert logs.returncode == 0
    assert "[1] stderr: fake-ai: giving up with exit code 3" in logs.stdout

    assert cli("ledger", "verify", "--workdir", str(demo)).returncode == 0
    ledger = demo / ".state/patch_ledger.jsonl"
    lines = ledger.read_text().splitlines()
    lines[2] = lines[2].replace('"adapter_error"', '"gate_failed"')
    ledger.write_text("\n".join(lines) + "\n")
    broken = cli("ledger", "verify", "--workdir", str(demo))
    assert broken.returncode == 1
    assert "line 3 (seq 3): content edited" in broken.stderr

    unknown = cli("status", "--run", "nope", "--workdir", str(demo))
    assert unknown.returncode == 2 and "known runs: ['demo']" in unknown.stderr


def test_module_entry_point_runs_the_executor(demo: Path) -> None:
    assert cli("db", "upgrade", "--workdir", str(demo)).returncode == 0
    result = subprocess.run(
        [sys.executable, "-m", "core.engine.executor", "--run", "demo", "--workdir", str(demo)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    data = json.loads((demo / ".state/execution_results.json").read_text())
    assert data["summary"]["COMPLETED"] == 3 and data["finished"] is False


def test_an_unusable_kubeconfig_is_an_error_naming_the_option(demo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kubeconfig"
    args = ("--backend", "kubernetes", "--kubeconfig", str(missing), "--run", "demo")
    done = cli("integrate", *args, "--workdir", str(demo))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"no usable Kubernetes configuration in {missing}" in done.stderr
    assert "fix: pass --kubeconfig" in done.stderr

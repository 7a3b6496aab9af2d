"""Retries, fallbacks, breakers, health probes and safe mode on the embedded backend.

Real processes and repositories; time is injected only for backoff sleeps (none happen for
real), breaker cool-downs use the wall clock with policies short enough for a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.tables import Adapter
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress
from core.models import FailureClass, TaskState
from tests.workdirs import fake_ai_adapter, make_workdir

GOOD = "fake-ai: write out.txt :: ok"


def run(
    workdir: Path, run_id: str, sleeps: list[float] | None = None, *, frozen: bool = False, **config
):
    """``frozen``: the executor's wall clock moves only by what it sleeps (attempts take no
    time), so the backoffs it sleeps are exactly the planned ones, whatever the machine's load."""
    upgrade(default_url(workdir))
    metrics = Metrics()
    clocks = Clocks(sleep=(sleeps.append if sleeps is not None else (lambda _: None)))
    if frozen:
        assert sleeps is not None
        start = datetime.now(UTC)
        clocks = Clocks(sleep=sleeps.append, wall=lambda: start + timedelta(seconds=sum(sleeps)))
    executor = build_executor(
        ExecutorConfig(run_id=run_id, workdir=workdir, **config),
        progress=SilentProgress(),
        metrics=metrics,
        clocks=clocks,
    )
    return executor.run(), executor


def resilience_log(workdir: Path) -> list[dict]:
    path = workdir / "logs/resilience.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_flaky_adapter_completes_on_the_third_attempt(tmp_path: Path) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="flaky",
        # the sandbox keeps nothing between attempts: the tool counts on $ORCHESTRATOR_ATTEMPT
        tasks=[{"task_id": "t1", "prompt": f"fake-ai: fail-until-attempt 3\n{GOOD}"}],
        adapters=[fake_ai_adapter(retry={"max_attempts": 3, "backoff_initial_seconds": 2})],
        routes={"t1": "fake-ai"},
    )
    sleeps: list[float] = []
    results, executor = run(workdir, "flaky", sleeps, frozen=True)
    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED
    assert [a.failure_class for a in task.attempts] == [
        FailureClass.ADAPTER_ERROR,
        FailureClass.ADAPTER_ERROR,
        None,
    ]
    assert [a.final for a in task.attempts] == [False, False, True]
    # exponential backoff with jitter in [0, 1]: 2 then 4 seconds, never slept for real
    assert len(sleeps) == 2 and 2 <= sleeps[0] <= 3 and 4 <= sleeps[1] <= 5
    retries = [r for r in resilience_log(workdir) if r["event"] == "retry_scheduled"]
    assert len(retries) == 2
    from prometheus_client import generate_latest

    text = generate_latest(executor.metrics.registry).decode()
    assert 'retry_attempts_total{adapter="fake-ai",failure_class="adapter_error"} 2.0' in text


def test_failing_adapter_opens_its_breaker_and_the_fallback_takes_over(tmp_path: Path) -> None:
    tasks = [{"task_id": f"t{i}", "prompt": f"Task {i}.\n{GOOD}"} for i in range(1, 7)]
    broken = {
        "id": "broken",
        "kind": "process",
        "command": [sys.executable, "-c", "import sys; sys.exit('tool crashed')"],
        "retry": {"max_attempts": 2, "jitter_seconds": 0},
        "breaker": {"failure_threshold": 3, "cooldown_seconds": 3600},
    }
    workdir = make_workdir(
        tmp_path / "w",
        run_id="fallback",
        tasks=tasks,
        adapters=[broken, fake_ai_adapter("backup")],
        routes={t["task_id"]: ["broken", "backup"] for t in tasks},
    )
    results, _ = run(workdir, "fallback")
    assert all(t.state is TaskState.COMPLETED for t in results.tasks)
    chains = {t.task_id: [a.adapter_id for a in t.attempts] for t in results.tasks}
    # the first three tasks fail once on `broken`, then the breaker is open: straight to backup
    assert chains == {
        "t1": ["broken", "backup"],
        "t2": ["broken", "backup"],
        "t3": ["broken", "backup"],
        "t4": ["backup"],
        "t5": ["backup"],
        "t6": ["backup"],
    }
    engine = make_engine(default_url(workdir))
    with Session(engine) as s:
        row = s.get(Adapter, ("", "broken"))
        assert row is not None and row.breaker_state == "OPEN" and row.breaker_failures == 3
    engine.dispose()
    transitions = [r for r in resilience_log(workdir) if r["event"] == "circuit_breaker"]
    assert [(t["from"], t["to"]) for t in transitions] == [("CLOSED", "OPEN")]

    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.cli",
            "status",
            "--run",
            "fallback",
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "circuit breaker broken: OPEN" in status.stdout


def test_open_breaker_without_fallback_parks_tasks_with_a_reason(tmp_path: Path) -> None:
    tasks = [{"task_id": f"t{i}", "prompt": "nothing"} for i in range(1, 4)]
    broken = {
        "id": "broken",
        "kind": "process",
        "command": [sys.executable, "-c", "import sys; sys.exit(1)"],
        "retry": {"max_attempts": 1},
        "breaker": {"failure_threshold": 2, "cooldown_seconds": 3600},
    }
    workdir = make_workdir(
        tmp_path / "w",
        run_id="parked",
        tasks=tasks,
        adapters=[broken, fake_ai_adapter("unused")],  # not *all* adapters down: no safe mode
        routes={t["task_id"]: "broken" for t in tasks},
    )
    results, _ = run(workdir, "parked", wait_for_breakers=False)
    states = [(t.state, t.wait_reason) for t in results.tasks]
    assert states[0][0] is TaskState.FAILED and states[1][0] is TaskState.FAILED
    assert states[2][0] is TaskState.PENDING
    assert "circuit breaker" in (states[2][1] or "")
    assert results.tasks[2].attempts == []


def test_gate_failure_retry_feeds_the_gate_summary_to_the_next_attempt(tmp_path: Path) -> None:
    prompt = (
        "Write answer.txt.\n"
        "fake-ai: write answer.txt :: 41\n"
        "fake-ai: on-feedback write answer.txt :: 42\n"
    )
    check = {
        "name": "answer",
        "command": [
            sys.executable,
            "-c",
            "import sys; sys.exit(open('answer.txt').read().strip() != '42')",
        ],
    }
    workdir = make_workdir(
        tmp_path / "w",
        run_id="feedback",
        tasks=[{"task_id": "t1", "prompt": prompt}],
        adapters=[
            fake_ai_adapter(gate=[check], retry={"max_attempts": 2, "retry_on": ["gate_failed"]})
        ],
        routes={"t1": "fake-ai"},
    )
    results, _ = run(workdir, "feedback")
    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED
    assert [a.failure_class for a in task.attempts] == [FailureClass.GATE_FAILED, None]


def test_unhealthy_adapters_put_the_executor_in_safe_mode_until_they_recover(
    tmp_path: Path,
) -> None:
    # in the work dir, where the sandboxed probe can read it (not in the host's private /tmp)
    flag = tmp_path / "w" / "healthy"
    probe = {
        "command": [
            sys.executable,
            "-c",
            f"import os, sys; sys.exit(not os.path.exists({str(flag)!r}))",
        ],
        "timeout_seconds": 10,
        "interval_seconds": 1,
    }
    workdir = make_workdir(
        tmp_path / "w",
        run_id="safe",
        tasks=[{"task_id": "t1", "prompt": GOOD}, {"task_id": "t2", "prompt": GOOD}],
        adapters=[fake_ai_adapter(health_check=probe)],
        routes={"t1": "fake-ai", "t2": "fake-ai"},
    )
    results, _ = run(workdir, "safe", wait_for_breakers=False)
    assert [t.state for t in results.tasks] == [TaskState.PENDING, TaskState.PENDING]
    assert all(t.attempts == [] for t in results.tasks)
    log = resilience_log(workdir)
    assert [r["event"] for r in log if r["event"].startswith("safe_mode")] == ["safe_mode_entered"]
    assert any(r["event"] == "adapter_health_check" and not r["healthy"] for r in log)
    assert "safe mode: all adapters unavailable" in (results.tasks[1].wait_reason or "")

    adapters = subprocess.run(
        [sys.executable, "-m", "core.cli", "adapters", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert "unhealthy" in adapters.stdout

    flag.write_text("yes")
    results, _ = run(workdir, "safe", wait_for_breakers=False)
    assert [t.state for t in results.tasks] == [TaskState.COMPLETED, TaskState.COMPLETED]
    events = [
        json.loads(x)["event"] for x in (workdir / "logs/executor.jsonl").read_text().splitlines()
    ]
    assert "SAFE_MODE_ENTERED" in events

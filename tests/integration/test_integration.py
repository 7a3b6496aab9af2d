"""The integration worker with real git, real processes and real databases.

Each test executes a small run on the embedded backend, then integrates it; assertions are on
what git, the ledger and the database hold, not on log text (the one exception: the adapter's
own output, which is how we see what its prompt said).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.integration_rows import IntegrationRows
from core.db.store import Store
from core.db.tables import ExecutionLog, Integration, IntegrationTask
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.integration_gate import LocalTreeGate, TreeGateRequest
from core.engine.integration_worker import (
    IntegrationConfig,
    IntegrationRun,
    build_integration_worker,
)
from core.engine.merge_queue import BatchPolicy
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress
from core.engine.patch_ledger import verify
from core.engine.task_log import read_records
from core.identity import TaskKey
from core.models import (
    ExecutionResults,
    FailureClass,
    GateResult,
    IntegrationOutcome,
    LedgerEntry,
    TaskState,
)
from tests.workdirs import fake_ai_adapter, git, make_workdir

UNITTEST = {
    "name": "unit",
    "command": ["{python}", "-m", "unittest", "discover", "-s", "tests", "-t", "."],
}
OK_TEST = (
    "import unittest\n\n\nclass Ok(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
)
BRANCH = "orchestrator/integration/{}"


@pytest.fixture(params=["sqlite", "postgres"])
def url_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def database(
    workdir: Path, kind: str = "sqlite", request: pytest.FixtureRequest | None = None
) -> str:
    if kind == "sqlite" or request is None:
        url = default_url(workdir)
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    return str(url)


def execute(workdir: Path, run_id: str, url: str) -> ExecutionResults:
    executor = build_executor(
        ExecutorConfig(run_id=run_id, workdir=workdir, database_url=url),
        progress=SilentProgress(),
        metrics=Metrics(),
        clocks=Clocks(sleep=lambda _: None),
    )
    return executor.run()


def integrate(workdir: Path, run_id: str, url: str, **config: object) -> IntegrationRun:
    gate = config.pop("gate", None)
    metrics = config.pop("metrics", None) or Metrics()
    worker = build_integration_worker(
        IntegrationConfig(run_id=run_id, workdir=workdir, **config),  # type: ignore[arg-type]
        database_url=url,
        metrics=metrics,  # type: ignore[arg-type]
        gate=gate,  # type: ignore[arg-type]
    )
    return worker.run()


def ledger(workdir: Path) -> list[LedgerEntry]:
    path = workdir / ".state/patch_ledger.jsonl"
    return [LedgerEntry.model_validate_json(x) for x in path.read_text().splitlines()]


def verdicts(workdir: Path) -> list[LedgerEntry]:
    return [e for e in ledger(workdir) if e.kind == "integration"]


def branch_log(run: IntegrationRun) -> list[str]:
    """Subjects of the branch's commits above its base, oldest first."""
    r = run.results
    out = git(
        "log", "--reverse", "--format=%s", f"{r.base_commit}..{r.branch}",
        cwd=Path(r.local_repository),
    )  # fmt: skip
    return out.splitlines()


def show(run: IntegrationRun, path: str) -> str:
    r = run.results
    return git("show", f"{r.branch}:{path}", cwd=Path(r.local_repository))


def assert_ledger_ok(workdir: Path, url: str) -> None:
    engine = make_engine(url)
    store = Store(engine)
    anchor = store.ledger_anchor() + IntegrationRows(engine).ledger_anchor()
    engine.dispose()
    report = verify(workdir / ".state/patch_ledger.jsonl", workdir / ".ledger/patches", anchor)
    assert report.ok, report.problems
    assert len(anchor) == len(ledger(workdir))


def assert_results_file(workdir: Path, repo_root: Path) -> dict[str, object]:
    raw = json.loads((workdir / ".state/integration_results.json").read_text())
    schema = json.loads((repo_root / "schema/integration_results.schema.json").read_text())
    jsonschema.validate(raw, schema)
    return raw  # type: ignore[no-any-return]


def events(url: str) -> list[tuple[str | None, int | None, str]]:
    engine = make_engine(url)
    with Session(engine) as s:
        rows = s.scalars(select(ExecutionLog).order_by(ExecutionLog.id)).all()
        found = [(r.task_id, r.attempt, r.event) for r in rows]
    engine.dispose()
    return found


# --------------------------------------------------------------------------- conflicts


def test_a_conflicting_change_is_sent_back_with_feedback_and_merged_on_the_head(
    tmp_path: Path, url_kind: str, request: pytest.FixtureRequest, repo_root: Path
) -> None:
    retry = {
        "max_attempts": 3,
        "retry_on": ["infrastructure", "merge_conflict"],
        "jitter_seconds": 0,
        "backoff_initial_seconds": 0.1,
    }
    workdir = make_workdir(
        tmp_path / "w",
        run_id="clash",
        tasks=[
            {
                "task_id": "a",
                "title": "Note from A",
                "prompt": "fake-ai: write notes.txt :: from A",
            },
            {
                "task_id": "b",
                "title": "Note from B",
                "prompt": "fake-ai: echo-feedback\n"
                "fake-ai: write notes.txt :: from B\n"
                "fake-ai: on-feedback write notes.txt :: from A\\nfrom B",
            },
        ],
        adapters=[fake_ai_adapter(gate=[UNITTEST], retry=retry)],
        routes={"a": "fake-ai", "b": "fake-ai"},
        files={"notes.txt": "base\n", "tests/__init__.py": "", "tests/test_ok.py": OK_TEST},
    )
    url = database(workdir, url_kind, request)
    first = execute(workdir, "clash", url)
    assert [t.state for t in first.tasks] == [TaskState.COMPLETED, TaskState.COMPLETED]

    run = integrate(workdir, "clash", url)
    assert [(t.task_id, t.outcome) for t in run.results.tasks] == [
        ("a", IntegrationOutcome.MERGED),
        ("b", IntegrationOutcome.CONFLICT),
    ]
    assert run.reopened == ["b"]
    a_commit = run.results.tasks[0].commit
    assert a_commit and branch_log(run) == ["a: Note from A"]
    conflict = verdicts(workdir)[-1]
    assert conflict.task_id == "b" and conflict.state is TaskState.PENDING
    assert conflict.failure_class is FailureClass.MERGE_CONFLICT
    assert conflict.integration and conflict.integration.conflict_files == ["notes.txt"]
    sent = conflict.integration.sent_back
    assert sent is not None and sent.rebase_commit == a_commit
    assert "Conflicting files:\n- notes.txt" in sent.feedback and "a: Note from A" in sent.feedback

    # the task is PENDING again, its completed attempt carries the verdict
    engine = make_engine(url)
    record = Store(engine).task(TaskKey("clash", "b"))
    engine.dispose()
    assert (
        record.status is TaskState.PENDING and record.failure_class is FailureClass.MERGE_CONFLICT
    )
    assert record.attempt_results[0].integration == sent and not record.attempt_results[0].final

    # the next execution runs attempt 2 from the integration head, the feedback in its prompt
    second = execute(workdir, "clash", url)
    b = {t.task_id: t for t in second.tasks}["b"]
    assert b.state is TaskState.COMPLETED and [a.attempt for a in b.attempts] == [1, 2]
    attempt2 = next(e for e in ledger(workdir) if e.task_id == "b" and e.attempt == 2)
    assert attempt2.kind == "attempt" and attempt2.base_commit == a_commit
    said = [
        r["line"]
        for r in read_records(workdir / "logs/execution/b.jsonl")
        if r.get("attempt") == 2 and r.get("stream") == "stdout"
    ]
    assert "feedback: Conflicting files:" in said and "feedback: - notes.txt" in said
    assert any("does not apply onto the integration branch" in line for line in said)

    again = integrate(workdir, "clash", url)
    assert again.reopened == []
    outcome = {t.task_id: (t.outcome, t.attempt) for t in again.results.tasks}
    assert outcome == {"a": (IntegrationOutcome.MERGED, 1), "b": (IntegrationOutcome.MERGED, 2)}
    assert branch_log(again) == ["a: Note from A", "b: Note from B"]
    assert show(again, "notes.txt") == "from A\nfrom B"

    names = [e for _, _, e in events(url)]
    assert names.count("TASK_REOPENED") == 1 and names.count("INTEGRATION_CONFLICT") == 1
    assert names.count("INTEGRATION_MERGED") == 2 and names.count("INTEGRATION_FINISHED") == 2
    assert_ledger_ok(workdir, url)
    raw = assert_results_file(workdir, repo_root)
    assert raw["head_commit"] == again.results.head_commit


# --------------------------------------------------------------------------- gate on the merged tree


def test_two_changes_that_pass_alone_and_fail_together(tmp_path: Path, repo_root: Path) -> None:
    calc = "def add(a, b):\n    return a + b\n"
    use_add = "import unittest\\n\\nimport calc\\n\\n\\nclass Double(unittest.TestCase):\\n    def test_double(self):\\n        self.assertEqual(calc.add(2, 2), 4)"
    plus = "def plus(a, b):\\n    return a + b"
    use_plus = "import unittest\\n\\nfrom calc import plus\\n\\n\\nclass Calc(unittest.TestCase):\\n    def test_plus(self):\\n        self.assertEqual(plus(1, 2), 3)"
    workdir = make_workdir(
        tmp_path / "w",
        run_id="together",
        tasks=[
            {
                "task_id": "double",
                "title": "Test doubling",
                "prompt": f"fake-ai: write tests/test_double.py :: {use_add}",
            },
            {
                "task_id": "rename",
                "title": "Rename add to plus",
                "prompt": f"fake-ai: write calc.py :: {plus}\n"
                f"fake-ai: write tests/test_calc.py :: {use_plus}",
            },
        ],
        adapters=[fake_ai_adapter(gate=[UNITTEST])],
        routes={"double": "fake-ai", "rename": "fake-ai"},
        files={
            "calc.py": calc,
            "tests/__init__.py": "",
            "tests/test_calc.py": "import unittest\n\nfrom calc import add\n\n\n"
            "class Calc(unittest.TestCase):\n    def test_add(self):\n"
            "        self.assertEqual(add(1, 2), 3)\n",
        },
    )
    url = database(workdir)
    executed = execute(workdir, "together", url)
    # each passed its own gate, alone on the base commit
    assert all(
        t.state is TaskState.COMPLETED and t.attempts[-1].gate.passed for t in executed.tasks
    )  # type: ignore[union-attr]

    run = integrate(workdir, "together", url)
    assert [(t.task_id, t.outcome) for t in run.results.tasks] == [
        ("double", IntegrationOutcome.MERGED),
        ("rename", IntegrationOutcome.GATE_FAILED),
    ]
    assert run.reopened == []  # merge_gate_failed is not in the default retry_on
    rename = run.results.tasks[1]
    assert rename.task_state == "COMPLETED" and rename.commit is None
    assert "tests.test_double" in rename.reason and "not sent back" in rename.reason
    verdict = verdicts(workdir)[-1].integration
    assert verdict is not None and verdict.gate is not None and not verdict.gate.passed
    failing = [c for c in verdict.gate.checks if c.new_failures.count]
    assert [n for c in failing for n in c.new_failures.names] == [
        "tests.test_double.Double.test_double"
    ]
    assert verdict.parent_commit == run.results.tasks[0].commit == run.results.head_commit
    # one gate run for the batch of two, one to clear the first: 2 in all
    assert run.report.gate_runs == 2 and run.results.stats.gate_runs == 2
    assert branch_log(run) == ["double: Test doubling"]
    assert_ledger_ok(workdir, url)
    assert_results_file(workdir, repo_root)


class RecordingGate:
    """The embedded gate, with every request it got kept (what a Job would receive)."""

    def __init__(self, workdir: Path) -> None:
        self.inner = LocalTreeGate(workdir)
        self.requests: list[TreeGateRequest] = []
        self.results: list[GateResult] = []

    def run(self, request: TreeGateRequest) -> GateResult:
        self.requests.append(request)
        self.results.append(self.inner.run(request))
        return self.results[-1]


def test_a_batch_of_8_with_one_culprit_is_bisected_in_at_most_4_gate_runs(
    tmp_path: Path, repo_root: Path
) -> None:
    limit = (
        "import os\\nimport unittest\\n\\n\\nclass Limit(unittest.TestCase):\\n"
        "    def test_few_features(self):\\n"
        "        self.assertLessEqual(len(os.listdir('features')), 3)"
    )
    tasks = []
    for i in range(1, 9):
        prompt = f"fake-ai: write features/f{i}.txt :: feature {i}"
        if i == 6:  # passes alone (one feature), fails with the five before it
            prompt += f"\nfake-ai: write tests/test_limit.py :: {limit}"
        tasks.append({"task_id": f"t{i}", "title": f"Feature {i}", "prompt": prompt})
    workdir = make_workdir(
        tmp_path / "w",
        run_id="batch",
        tasks=tasks,
        adapters=[fake_ai_adapter(gate=[UNITTEST])],
        routes={t["task_id"]: "fake-ai" for t in tasks},
        files={"tests/__init__.py": "", "tests/test_ok.py": OK_TEST},
    )
    url = database(workdir)
    assert all(t.state is TaskState.COMPLETED for t in execute(workdir, "batch", url).tasks)

    gate = RecordingGate(workdir)
    metrics = Metrics()
    policy = BatchPolicy(size=8, adaptive=False)
    run = integrate(workdir, "batch", url, batch=policy, gate=gate, metrics=metrics)
    outcome = {t.task_id: t.outcome for t in run.results.tasks}
    assert outcome == {
        **{f"t{i}": IntegrationOutcome.MERGED for i in (1, 2, 3, 4, 5, 7, 8)},
        "t6": IntegrationOutcome.GATE_FAILED,
    }
    culprit = next(e for e in verdicts(workdir) if e.task_id == "t6").integration
    assert culprit is not None and culprit.gate_runs <= 4
    assert culprit.gate is not None and "test_few_features" in " ".join(culprit.gate.blamed)
    # the runs: all 8 (fail), t1-t4 (pass), t1-t6 (fail), t1-t5 (pass); then t7, t8 on t1-t5
    assert [(r.number, r.task_ids) for r in gate.requests] == [
        (1, tuple(f"t{i}" for i in range(1, 9))),
        (2, ("t1", "t2", "t3", "t4")),
        (3, ("t1", "t2", "t3", "t4", "t5", "t6")),
        (4, ("t1", "t2", "t3", "t4", "t5")),
        (5, ("t7", "t8")),
    ]
    assert [r.passed for r in gate.results] == [False, True, False, True, True]
    # the seam's payload: the patch turns the good head into the judged tree
    repo = Path(run.results.local_repository)
    for request in gate.requests:
        diff = subprocess.run(
            ["git", "diff", "--binary", "--full-index", "--find-renames", request.base_commit,
             request.head_commit],
            cwd=repo, capture_output=True, check=True,
        ).stdout  # fmt: skip
        assert diff == request.patch
    assert gate.requests[4].base_commit == run.results.tasks[4].commit  # t5's: the new good head

    stats = run.results.stats
    assert (stats.gate_runs, stats.one_by_one_gate_runs, stats.merged) == (5, 8, 7)
    exposition = generate_latest(metrics.registry).decode()
    assert "integration_gate_runs_total 5.0" in exposition
    assert 'integration_outcomes_total{outcome="merged"} 7.0' in exposition
    assert 'integration_outcomes_total{outcome="gate_failed"} 1.0' in exposition
    assert "integration_merge_latency_seconds_count 7.0" in exposition
    assert "integration_queue_depth 0.0" in exposition
    assert stats.gate_runs_per_merge == round(5 / 7, 3)
    assert branch_log(run) == [f"t{i}: Feature {i}" for i in (1, 2, 3, 4, 5, 7, 8)]
    engine = make_engine(url)
    with Session(engine) as s:
        row = s.get(Integration, ("batch", ""))
        assert row is not None and row.gate_runs == 5 and row.batches == 2
        assert s.scalar(select(func.count()).select_from(IntegrationTask)) == 8
    engine.dispose()
    assert_ledger_ok(workdir, url)
    assert_results_file(workdir, repo_root)


# --------------------------------------------------------------------------- crash and replay


def test_a_crash_between_ledger_and_database_is_replayed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="crash",
        tasks=[
            {"task_id": "one", "title": "One", "prompt": "fake-ai: write one.txt :: 1"},
            {"task_id": "two", "title": "Two", "prompt": "fake-ai: write two.txt :: 2"},
        ],
        adapters=[fake_ai_adapter()],
        routes={"one": "fake-ai", "two": "fake-ai"},
    )
    url = database(workdir)
    execute(workdir, "crash", url)

    def crash(self: IntegrationRows, key: TaskKey, entry: LedgerEntry) -> list[object]:
        raise RuntimeError("killed after the ledger append")

    with monkeypatch.context() as m:
        m.setattr(IntegrationRows, "record", crash)
        with pytest.raises(RuntimeError):
            integrate(workdir, "crash", url)
    written = verdicts(workdir)
    assert [e.task_id for e in written] == ["one"]  # the ledger has it, the database does not

    run = integrate(workdir, "crash", url)
    assert [(t.task_id, t.outcome) for t in run.results.tasks] == [
        ("one", IntegrationOutcome.MERGED),
        ("two", IntegrationOutcome.MERGED),
    ]
    after = verdicts(workdir)
    assert [e.task_id for e in after] == ["one", "two"] and after[0] == written[0]
    assert run.results.tasks[0].commit == written[0].integration.commit  # type: ignore[union-attr]
    assert branch_log(run) == ["one: One", "two: Two"]
    before = (workdir / ".state/patch_ledger.jsonl").read_text(), events(url)
    integrate(workdir, "crash", url)  # nothing new: nothing written
    assert ((workdir / ".state/patch_ledger.jsonl").read_text(), events(url)) == before
    assert_ledger_ok(workdir, url)


# --------------------------------------------------------------------------- skipped


def test_changes_that_cannot_be_integrated_are_skipped_with_the_reason(tmp_path: Path) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="skips",
        tasks=[
            {"task_id": "fine", "prompt": "fake-ai: write a.txt :: a"},
            {"task_id": "empty", "prompt": "fake-ai: say nothing", "allow_empty_diff": True},
            {"task_id": "broken", "prompt": "fake-ai: exit 2"},
        ],
        adapters=[fake_ai_adapter(retry={"max_attempts": 1})],
        routes={"fine": "fake-ai", "empty": "fake-ai", "broken": "fake-ai"},
    )
    url = database(workdir)
    execute(workdir, "skips", url)
    run = integrate(workdir, "skips", url)
    got = {t.task_id: (t.outcome, t.reason) for t in run.results.tasks}
    assert got == {
        "fine": (IntegrationOutcome.MERGED, ""),
        "empty": (IntegrationOutcome.SKIPPED, "the change is empty: nothing to merge"),
        "broken": (IntegrationOutcome.SKIPPED, "the task is FAILED"),
    }
    # a completed change gets a ledger verdict; a task that did not complete is not a candidate
    assert [(e.task_id, e.integration.outcome) for e in verdicts(workdir)] == [  # type: ignore[union-attr]
        ("empty", IntegrationOutcome.SKIPPED),
        ("fine", IntegrationOutcome.MERGED),
    ]


def test_push_needs_a_url(tmp_path: Path) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="local",
        tasks=[{"task_id": "t", "prompt": "fake-ai: write a.txt :: a"}],
        adapters=[fake_ai_adapter()],
        routes={"t": "fake-ai"},
    )
    upgrade(default_url(workdir))
    cli = [sys.executable, "-m", "core.cli"]
    subprocess.run([*cli, "execute", "--run", "local", "--workdir", str(workdir)], check=True)
    out = subprocess.run(
        [*cli, "integrate", "--run", "local", "--workdir", str(workdir), "--push"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "--push needs a repository URL" in out.stderr
    assert not (workdir / ".state/integration_results.json").exists()

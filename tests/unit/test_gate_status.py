"""How a per-test gate result is shown: the status table cell, and the TaskExecution status
(bounded: exact counts, at most STATUS_TEST_NAMES names a list) and back."""

from __future__ import annotations

import io

from rich.console import Console

from core.cli_tasks import _gate_cell
from core.kube.attempts import gate_result, gate_summary
from core.models import CheckResult, CheckStatus, GateResult, TamperReport, TestNames
from core.resources import STATUS_TEST_NAMES, GateSummary


def check(status: CheckStatus = CheckStatus.FAILED, **lists: list[str]) -> CheckResult:
    return CheckResult(
        name="pytest",
        status=status,
        exit_code=1,
        duration_seconds=2.5,
        granularity="test",
        note="a note",
        **{k: TestNames.of(v) for k, v in lists.items()},  # type: ignore[arg-type]
    )


def shown(cell: str) -> str:
    """What the table shows for a cell (rich markup applied)."""
    out = io.StringIO()
    Console(file=out, width=300).print(cell)
    return out.getvalue().strip()


def test_gate_cell_names_new_failures_and_keeps_brackets() -> None:
    failed = GateResult(
        passed=False,
        applied=True,
        checks=[check(new_failures=["t.py::test_x[red]"], pre_existing_failures=["t.py::old"])],
    )
    assert shown(_gate_cell(failed)) == "failed: pytest (new failures: t.py::test_x[red])"
    passed = GateResult(
        passed=True,
        applied=True,
        checks=[
            check(CheckStatus.PRE_EXISTING, pre_existing_failures=["a"], flaky=["b", "c"]),
            CheckResult(
                name="lint", status=CheckStatus.PRE_EXISTING, exit_code=1, duration_seconds=0
            ),
        ],
        tamper=TamperReport(flagged=True, deleted_test_files=["tests/test_a.py"]),
    )
    assert (
        _gate_cell(passed) == "passed (1 pre-existing, 2 flaky, lint failed before, tamper flagged)"
    )
    assert _gate_cell(GateResult(passed=False, applied=False)) == "failed: diff does not apply"


def test_status_summary_is_bounded_and_round_trips_what_it_keeps() -> None:
    many = [f"tests/test_a.py::test_{i:03d}" for i in range(250)]
    gate = GateResult(
        passed=False,
        applied=True,
        apply_method="git apply --3way --binary",
        checks=[check(new_failures=many, flaky=["f"])],
        tamper=TamperReport(
            flagged=True,
            modified_files=[f"f{i}" for i in range(30)],
            removed_failing_tests=TestNames.of(["pytest: x"]),
        ),
    )
    summary = gate_summary(gate)
    assert summary is not None
    # what the API server gets is what the CRD schema admits (maxItems included)
    GateSummary.model_validate(summary.model_dump(by_alias=True))
    listed = summary.checks[0]
    assert listed.new_failures is not None and listed.new_failures.count == 250
    assert listed.new_failures.names == many[:STATUS_TEST_NAMES]
    assert listed.flaky is not None and listed.flaky.names == ["f"]
    assert listed.pre_existing_failures is None and listed.granularity == "test"
    assert summary.tamper is not None and len(summary.tamper.modified_files) == STATUS_TEST_NAMES
    back = gate_result(summary)
    assert back.checks[0].new_failures.count == 250
    assert back.checks[0].new_failures.names == many[:STATUS_TEST_NAMES]
    assert back.blamed == [
        "pytest (new failures: tests/test_a.py::test_000, tests/test_a.py::test_001, "
        "tests/test_a.py::test_002 +247 more)"
    ]
    quiet = gate_summary(GateResult(passed=True, applied=True, checks=[check(CheckStatus.PASSED)]))
    assert quiet is not None and quiet.tamper is None


def test_progress_line_mentions_flaky_tests_and_tamper() -> None:
    from datetime import UTC, datetime

    from core.engine.monitoring.progress import outcome_line
    from core.models import AttemptResult, TaskResult, TaskState

    now = datetime(2026, 1, 1, tzinfo=UTC)
    gate = GateResult(
        passed=True,
        applied=True,
        checks=[check(CheckStatus.PASSED, flaky=["t::a", "t::b"])],
        tamper=TamperReport(flagged=True, modified_files=["x"]),
    )
    attempt = AttemptResult(
        attempt=1,
        adapter_id="a",
        state=TaskState.COMPLETED,
        started_at=now,
        finished_at=now,
        duration_seconds=0,
        gate=gate,
    )
    result = TaskResult(task_id="t", state=TaskState.COMPLETED, adapter_id="a", attempts=[attempt])
    line = outcome_line(result)
    assert line.endswith("adapter=a attempts=1 flaky tests: 2 tamper flagged")


def test_submitted_task_execution_carries_the_gate_policy_and_check_fields() -> None:
    from core.engine.inputs import RoutedTask
    from core.kube.submit import task_resource
    from core.models import GateCheck, GatePolicy, RoutingDecision, TaskSpec
    from core.resources import TaskExecutionSpec, task_spec

    spec = TaskSpec(
        task_id="t1",
        prompt="p",
        repo="git://server/repo",
        base_commit="a" * 40,
        gate=[
            GateCheck(
                name="tool",
                command=["./run", "--junit", "{report}"],
                report="junit",
                report_path="out/*.xml",
                rerun=["./run", "--only", "{test}"],
                env={"SOME_VAR": "1"},
            )
        ],
        gate_baseline=True,
        gate_policy=GatePolicy(flaky_reruns=3, on_tamper="fail", fuzzy_apply=True),
    )
    body = task_resource("r", RoutedTask(1, spec, RoutingDecision(task_id="t1", adapter_id="a")))
    assert body["spec"]["gate"]["onTamper"] == "fail"
    assert body["spec"]["gate"]["checks"][0]["reportPath"] == "out/*.xml"
    back = task_spec("r-t1", TaskExecutionSpec.model_validate(body["spec"]))
    assert back.gate_policy == spec.gate_policy
    assert back.gate == spec.gate and back.gate_baseline

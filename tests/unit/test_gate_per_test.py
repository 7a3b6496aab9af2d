"""The gate judged test by test, with real pytest, unittest, go test and a JUnit-writing tool.

Each project (tests/gate_projects.py) has a test failing at its base commit (``mul``) and a
test that fails the first time it runs in a tree. The patches break another test, leave
everything alone, fix the old failure, or delete/skip it; real git checkouts, real processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.engine.test_gate import run_gate
from core.engine.workspace import add_worktree, capture_diff
from core.models import CheckStatus, GateCheck, GatePolicy, ReportFormat
from tests.gate_projects import (
    CALC_PY,
    GO_CALC,
    JUNIT_TOOL,
    PYTEST_TESTS,
    go_check,
    go_project,
    pytest_check,
    pytest_project,
    unittest_check,
    unittest_project,
)

BIG = 10 * 1024 * 1024
BROKEN_SUB = CALC_PY.replace("return a - b", "return a + b")
HARMLESS = CALC_PY + "\n\ndef div(a, b):\n    return a / b\n"
FIXED_MUL = CALC_PY.replace("a * b + 1", "a * b")


class Sinks:
    """A SinkFactory that keeps one recording sink per name (reruns append to theirs)."""

    def __init__(self, make_sink: Any) -> None:
        self._make = make_sink
        self.by_name: dict[str, Any] = {}
        self.order: list[str] = []

    def __call__(self, name: str) -> Any:
        self.order.append(name)
        return self.by_name.setdefault(name, self._make())


@pytest.fixture
def sinks(make_sink: Any) -> Sinks:
    return Sinks(make_sink)


@pytest.fixture(scope="session")
def gocache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gocache")


def patch_of(repo: Any, tmp_path: Path, gt: Any, files: dict[str, Any]) -> bytes:
    tree = add_worktree(repo.path, tmp_path / f"author-{len(list(tmp_path.iterdir()))}", repo.base)
    gt.write_files(tree, files)
    return capture_diff(tree, repo.base, BIG).patch


def gate_for(repo: Any, worktree_checkout: Any, sinks: Sinks) -> Callable[..., Any]:
    def run(check: GateCheck, patch: bytes, **kw: Any) -> Any:
        return run_gate(
            [check],
            patch=patch,
            checkout=worktree_checkout(repo.path, repo.base),
            sinks=sinks,
            **{"baseline": True, **kw},
        )

    return run


# --------------------------------------------------------------------------- pytest


def test_pytest_patch_breaking_another_test_is_blamed_by_name(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project(flaky=True))
    patch = patch_of(repo, tmp_path, gt, {"calc.py": BROKEN_SUB})
    gate = gate_for(repo, worktree_checkout, sinks)(pytest_check(), patch)

    assert not gate.passed and gate.failed_checks == ["pytest"]
    check = gate.checks[0]
    assert check.status is CheckStatus.FAILED and check.baseline_status is CheckStatus.FAILED
    assert check.granularity == "test" and check.report == "junit"
    assert check.new_failures.names == ["tests/test_calc.py::test_sub"]
    assert check.pre_existing_failures.names == ["tests/test_calc.py::test_mul"]
    # the flaky test failed once in each tree and passed alone: recorded, not blamed
    assert check.flaky.names == ["tests/test_flaky.py::test_flaky"]
    assert check.baseline_flaky.names == ["tests/test_flaky.py::test_flaky"]
    assert check.tests is not None and (check.tests.total, check.tests.failed) == (4, 3)
    assert gate.blamed == ["pytest (new failures: tests/test_calc.py::test_sub)"]
    assert not gate.tamper.flagged
    # reruns ran alone and showed in their own sinks: test_sub twice (still failing)
    reruns = sinks.by_name["pytest:rerun"].texts()
    assert sum("1 failed" in line for line in reruns) == 2
    assert sum("1 passed" in line for line in reruns) == 1
    # the baseline reran its failures too (test_mul twice, the flaky test once)
    base_reruns = sinks.by_name["baseline:pytest:rerun"].texts()
    assert sum("1 failed" in line for line in base_reruns) == 2


def test_pytest_harmless_patch_over_the_same_base_passes(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project())
    patch = patch_of(repo, tmp_path, gt, {"calc.py": HARMLESS})
    gate = gate_for(repo, worktree_checkout, sinks)(pytest_check(), patch)

    assert gate.passed
    check = gate.checks[0]
    assert check.status is CheckStatus.PRE_EXISTING
    assert check.new_failures.count == 0
    assert check.pre_existing_failures.names == ["tests/test_calc.py::test_mul"]
    assert check.fixed.count == 0 and check.removed_failing.count == 0


def test_pytest_patch_fixing_the_old_failure_lists_it_as_fixed(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project())
    patch = patch_of(repo, tmp_path, gt, {"calc.py": FIXED_MUL})
    gate = gate_for(repo, worktree_checkout, sinks)(pytest_check(), patch)
    assert gate.passed
    check = gate.checks[0]
    assert check.status is CheckStatus.PASSED
    assert check.fixed.names == ["tests/test_calc.py::test_mul"]
    assert check.tests is not None and check.tests.failed == 0


def test_patch_deleting_the_failing_test_is_flagged_and_can_fail_the_gate(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project())
    without_mul = PYTEST_TESTS[: PYTEST_TESTS.index("def test_mul")]
    patch = patch_of(repo, tmp_path, gt, {"tests/test_calc.py": without_mul})
    run = gate_for(repo, worktree_checkout, sinks)

    flagged = run(pytest_check(), patch)
    assert flagged.passed  # on_tamper: flag (the default) reports, does not fail
    check = flagged.checks[0]
    assert check.status is CheckStatus.PASSED
    assert check.removed_failing.names == ["tests/test_calc.py::test_mul"]
    assert flagged.tamper.flagged and not flagged.tamper.fails_gate
    assert flagged.tamper.removed_failing_tests.names == ["pytest: tests/test_calc.py::test_mul"]
    assert flagged.tamper.test_count_drops == ["pytest: 3 -> 2"]
    assert "removed or skipped" in check.note

    strict = run(pytest_check(), patch, policy=GatePolicy(on_tamper="fail"))
    assert not strict.passed and strict.tamper.fails_gate
    assert strict.checks[0].status is CheckStatus.FAILED
    assert strict.blamed == ["pytest (removed failing tests: 1)"]


def test_patch_skipping_the_failing_test_or_deleting_its_file_is_flagged(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project())
    skipped = PYTEST_TESTS.replace(
        "def test_mul", "import pytest\n\n\n@pytest.mark.skip('later')\ndef test_mul"
    )
    run = gate_for(repo, worktree_checkout, sinks)
    gate = run(pytest_check(), patch_of(repo, tmp_path, gt, {"tests/test_calc.py": skipped}))
    check = gate.checks[0]
    assert check.removed_failing.names == ["tests/test_calc.py::test_mul"]
    assert check.tests is not None and check.tests.skipped == 1
    assert gate.tamper.flagged

    gone = run(
        pytest_check(),
        patch_of(
            repo,
            tmp_path,
            gt,
            {"tests/test_calc.py": None, "tests/test_other.py": "def test_x():\n    pass\n"},
        ),
    )
    assert gone.tamper.deleted_test_files == ["tests/test_calc.py"]
    assert gone.checks[0].removed_failing.names == ["tests/test_calc.py::test_mul"]
    assert gone.checks[0].status is CheckStatus.PASSED


def test_without_baseline_every_failure_is_blamed_but_a_flaky_one_is_not(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project(flaky=True))
    run = gate_for(repo, worktree_checkout, sinks)
    gate = run(pytest_check(), patch_of(repo, tmp_path, gt, {"calc.py": FIXED_MUL}), baseline=False)
    assert gate.passed and gate.checks[0].status is CheckStatus.PASSED
    assert gate.checks[0].flaky.names == ["tests/test_flaky.py::test_flaky"]
    assert gate.checks[0].baseline_status is None

    no_reruns = run(
        pytest_check(),
        patch_of(repo, tmp_path, gt, {"calc.py": FIXED_MUL}),
        baseline=False,
        policy=GatePolicy(flaky_reruns=0),
    )
    assert not no_reruns.passed
    assert no_reruns.checks[0].new_failures.names == ["tests/test_flaky.py::test_flaky"]


def test_report_none_judges_by_exit_status_and_says_so(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project())
    patch = patch_of(repo, tmp_path, gt, {"calc.py": BROKEN_SUB})
    gate = gate_for(repo, worktree_checkout, sinks)(pytest_check(report=ReportFormat.NONE), patch)
    check = gate.checks[0]
    # failed on both trees, no per-test results: pre-existing at check granularity, with the
    # caveat spelled out (the per-test run above blames test_sub for the same patch)
    assert check.granularity == "check" and check.status is CheckStatus.PRE_EXISTING
    assert check.new_failures.count == 0 and check.tests is None
    assert "failures may differ" in check.note


def test_user_junit_path_in_the_tree_is_read_and_not_tamper(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(pytest_project())
    check = GateCheck(
        name="pytest",
        command=["{python}", "-m", "pytest", "-q", "tests", "--junitxml=out/junit.xml"],
    )
    patch = patch_of(repo, tmp_path, gt, {"calc.py": BROKEN_SUB})
    gate = gate_for(repo, worktree_checkout, sinks)(check, patch)
    assert gate.checks[0].new_failures.names == ["tests/test_calc.py::test_sub"]
    assert not gate.tamper.flagged  # an untracked report file is not a change to the tree


# --------------------------------------------------------------------------- unittest


def test_unittest_patch_breaking_another_test_is_blamed_by_name(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo(unittest_project())
    run = gate_for(repo, worktree_checkout, sinks)
    gate = run(unittest_check(), patch_of(repo, tmp_path, gt, {"calc.py": BROKEN_SUB}))
    assert not gate.passed
    check = gate.checks[0]
    assert check.report == "unittest" and check.granularity == "test"
    assert check.new_failures.names == ["tests.test_calc.TestCalc.test_sub"]
    assert check.pre_existing_failures.names == ["tests.test_calc.TestCalc.test_mul"]
    assert check.flaky.names == ["tests.test_calc.TestCalc.test_flaky"]
    assert check.tests is not None and check.tests.total == 4
    # -v was added for per-test results: the log shows every test's line
    assert any(
        line.startswith("test_add (tests.test_calc.TestCalc")
        for line in sinks.by_name["unittest"].texts()
    )

    harmless = run(unittest_check(), patch_of(repo, tmp_path, gt, {"calc.py": HARMLESS}))
    assert harmless.passed
    assert harmless.checks[0].status is CheckStatus.PRE_EXISTING
    assert harmless.checks[0].flaky.names == ["tests.test_calc.TestCalc.test_flaky"]


# --------------------------------------------------------------------------- go test


def test_go_test_patch_breaking_another_test_is_blamed_by_name(
    git_repo: Any,
    worktree_checkout: Any,
    sinks: Sinks,
    tmp_path: Path,
    gt: Any,
    gocache: Path,
) -> None:
    repo = git_repo(go_project())
    run = gate_for(repo, worktree_checkout, sinks)
    broken = GO_CALC.replace("return a - b", "return a + b")
    gate = run(go_check(gocache), patch_of(repo, tmp_path, gt, {"calc.go": broken}))
    assert not gate.passed
    check = gate.checks[0]
    assert check.report == "go-json" and check.granularity == "test"
    assert check.new_failures.names == ["example.com/calc.TestSub"]
    assert check.pre_existing_failures.names == ["example.com/calc.TestMul"]
    assert check.flaky.names == ["example.com/calc.TestFlaky"]
    # the log shows go test's text, not the JSON events the gate asked for
    texts = sinks.by_name["go-test"].texts()
    assert "--- FAIL: TestSub (0.00s)" in texts
    assert not any(line.startswith("{") for line in texts)

    harmless = run(
        go_check(gocache),
        patch_of(
            repo, tmp_path, gt, {"calc.go": GO_CALC + "\nfunc Div(a, b int) int { return a / b }\n"}
        ),
    )
    assert harmless.passed
    assert harmless.checks[0].pre_existing_failures.names == ["example.com/calc.TestMul"]

    no_build = run(
        go_check(gocache),
        patch_of(repo, tmp_path, gt, {"calc.go": GO_CALC.replace("return a - b", "return a - ")}),
    )
    assert not no_build.passed
    assert no_build.checks[0].new_failures.names == ["example.com/calc (package)"]


# --------------------------------------------------------------------------- any JUnit tool


def test_any_tool_writing_junit_with_its_own_rerun_command(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    cases = {"alpha": True, "beta": False, "gamma": True}
    repo = git_repo({"tool.py": JUNIT_TOOL, "cases.json": json.dumps(cases)})
    check = GateCheck(
        name="tool",
        command=["{python}", "tool.py", "--out", "{report}"],
        report=ReportFormat.JUNIT,
        rerun=["{python}", "tool.py", "--out", "{report}", "--only", "{test_name}"],
    )
    patch = patch_of(repo, tmp_path, gt, {"cases.json": json.dumps({**cases, "alpha": False})})
    gate = gate_for(repo, worktree_checkout, sinks)(check, patch)
    result = gate.checks[0]
    assert result.report == "junit" and not gate.passed
    assert result.new_failures.names == ["suite.alpha"]
    assert result.pre_existing_failures.names == ["suite.beta"]
    # reruns ran with --only for the failing ones: still failing, so not flaky
    assert result.flaky.count == 0
    assert sinks.order.count("tool:rerun") == 2  # alpha twice (beta is pre-existing)

    # without a rerun command the tool's tests cannot be rerun alone: said, and still blamed
    plain = check.model_copy(update={"rerun": None})
    again = gate_for(repo, worktree_checkout, sinks)(plain, patch)
    assert again.checks[0].new_failures.names == ["suite.alpha"]
    assert "no rerun command for 1 failing test(s)" in again.checks[0].note


def test_declared_report_that_is_never_written_falls_back_to_the_check(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo({"a.txt": "x\n"})
    check = GateCheck(
        name="quiet", command=["/bin/sh", "-c", "exit 1", "{report}"], report=ReportFormat.JUNIT
    )
    gate = gate_for(repo, worktree_checkout, sinks)(check, b"")
    result = gate.checks[0]
    assert result.granularity == "check" and result.status is CheckStatus.PRE_EXISTING
    assert "no per-test report was written" in result.note


# --------------------------------------------------------------------------- tamper


def test_a_check_that_changes_tracked_files_is_reported(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    repo = git_repo({"a.txt": "x\n", "b.txt": "y\n"})
    checks = [
        GateCheck(name="clean", command=["/bin/sh", "-c", "echo out > untracked.log"]),
        GateCheck(name="rewrites", command=["/bin/sh", "-c", "echo z >> a.txt; rm b.txt"]),
        GateCheck(name="stages", command=["/bin/sh", "-c", "echo w > c.txt; git add c.txt"]),
    ]
    checkout = worktree_checkout(repo.path, repo.base)
    gate = run_gate(checks, patch=b"", checkout=checkout, sinks=sinks)
    by_name = {c.name: c for c in gate.checks}
    assert by_name["clean"].modified_files == []
    assert by_name["rewrites"].modified_files == ["a.txt", "b.txt"]
    assert by_name["stages"].modified_files == ["c.txt"]
    assert gate.tamper.flagged and gate.tamper.modified_files == ["a.txt", "b.txt", "c.txt"]
    assert gate.passed  # flagged only

    strict = run_gate(
        checks, patch=b"", checkout=checkout, sinks=sinks, policy=GatePolicy(on_tamper="fail")
    )
    assert not strict.passed and strict.failed_checks == ["rewrites", "stages"]
    assert strict.blamed[0] == "rewrites (changed tracked files: a.txt, b.txt)"


def test_fuzzy_application_is_off_by_default_and_recorded_when_used(
    git_repo: Any, worktree_checkout: Any, sinks: Sinks
) -> None:
    lines = "".join(f"line {i}\n" for i in range(1, 12))
    repo = git_repo({"f.txt": lines})
    # written against a copy whose context lines differ from the base (no blobs for --3way)
    stale = (
        b"diff --git a/f.txt b/f.txt\n--- a/f.txt\n+++ b/f.txt\n"
        b"@@ -4,5 +4,5 @@\n line 4\n line 5\n-line 6\n+line six\n line 7\n line 8 (edited)\n"
    )
    checkout = worktree_checkout(repo.path, repo.base)
    check = GateCheck(name="see", command=["/bin/sh", "-c", "grep -q 'line six' f.txt"])
    strict = run_gate([check], patch=stale, checkout=checkout, sinks=sinks)
    assert not strict.applied and strict.apply_method is None
    fuzzy = run_gate(
        [check], patch=stale, checkout=checkout, sinks=sinks, policy=GatePolicy(fuzzy_apply=True)
    )
    assert fuzzy.applied and fuzzy.passed
    assert fuzzy.apply_method == "git apply --index --binary -C1 --ignore-whitespace"

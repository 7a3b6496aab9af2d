"""The gate's judgement of one check: the patched tree's run against the baseline's, per test.

Pure functions over what the runs produced (no processes, no git), so every rule here is
unit-tested on its own:

* per-test results on both trees (or on the patched tree without a baseline): a test failing
  after the patch and not before is a *new failure* and fails the check; failing on both is
  *pre-existing*; failing before and passing after is *fixed*; failing before and gone or
  skipped after is *removed* (tamper). A test that passed when rerun alone is *flaky* and
  counts on neither side. A check that exits non-zero with no failing test in its report fails
  the pseudo-test :data:`~core.engine.test_reports.OUTSIDE_TESTS`, compared the same way.
* no per-test results on a tree: granularity ``check``, judged by status. A check failing on
  both trees is still ``pre_existing`` only when *neither* tree had per-test results, and the
  note says that the failures may differ: "it failed before" never stands for "the same
  tests failed before" when the tests could have been compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from core.engine.test_reports import OUTSIDE_TESTS, Outcome, TestReport, is_pseudo
from core.models import (
    MAX_TEST_NAMES,
    CheckResult,
    CheckStatus,
    GatePolicy,
    TamperReport,
    TestNames,
)

MAX_LISTED_FILES = 50


@dataclass(frozen=True)
class CheckRun:
    """One run of a check on one tree, with its reruns and what it did to the tree."""

    name: str
    status: CheckStatus
    exit_code: int | None
    duration_seconds: float
    output_tail: str = ""
    report: TestReport | None = None
    #: Failed in the run, passed when rerun alone.
    flaky: frozenset[str] = frozenset()
    modified_files: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def failing(self) -> set[str]:
        """Tests this run counts as failing: flaky ones excluded, the pseudo-test included."""
        if self.report is None:
            return set()
        failing = self.report.failing()
        if self.status is CheckStatus.FAILED and not failing:
            failing = {OUTSIDE_TESTS}
        return failing - self.flaky


def judge(
    patched: CheckRun,
    base: CheckRun | None,
    policy: GatePolicy,
) -> CheckResult:
    notes = list(patched.notes)
    base_status = base.status if base else None
    report, base_report = patched.report, base.report if base else None
    fields: dict[str, object] = {
        "tests": report.counts() if report else None,
        "baseline_tests": base_report.counts() if base_report else None,
        "report": report.format if report else None,
        "flaky": TestNames.of(patched.flaky),
        "baseline_flaky": TestNames.of(base.flaky if base else ()),
        "modified_files": list(patched.modified_files[:MAX_LISTED_FILES]),
    }
    status = patched.status
    per_test = report is not None and (base is None or base_report is not None)
    removed: set[str] = set()
    if not per_test:
        fields["granularity"] = "check"
        if base is not None and (report is None) != (base_report is None):
            notes.append(
                "per-test results on one tree only ("
                + ("patched" if report is not None else "baseline")
                + "): not compared test by test"
            )
        both_failed = status is CheckStatus.FAILED and base_status is CheckStatus.FAILED
        if both_failed and report is None and base_report is None:
            status = CheckStatus.PRE_EXISTING
            notes.append(
                "failed on the baseline too; without per-test results the failures may differ"
            )
    else:
        assert report is not None
        fields["granularity"] = "test"
        failing = patched.failing()
        if base is not None and base_report is not None:
            before = base.failing()
            new, pre = failing - before, failing & before
            fixed = {t for t in before - failing if is_pseudo(t) or _passed(report, t, patched)}
            gone = before - failing - fixed
            if report.complete:
                removed = {t for t in gone if report.outcomes.get(t) in (None, Outcome.SKIPPED)}
            elif base_report.counts().total > report.counts().total:
                removed = gone  # failures-only output: a missing test may have been deleted
            else:
                fixed |= gone
        else:
            new, pre, fixed = failing, set(), set()
        fields |= {
            "new_failures": TestNames.of(new),
            "pre_existing_failures": TestNames.of(pre),
            "fixed": TestNames.of(fixed),
            "removed_failing": TestNames.of(removed),
        }
        if status in (CheckStatus.PASSED, CheckStatus.FAILED):
            status = (
                CheckStatus.FAILED
                if new
                else CheckStatus.PRE_EXISTING
                if pre
                else CheckStatus.PASSED
            )
        if OUTSIDE_TESTS in new:
            notes.append(f"exited {patched.exit_code} although no test in its report failed")
    tampered = bool(removed) or bool(patched.modified_files)
    if tampered and policy.on_tamper == "fail" and status in _OK:
        status = CheckStatus.FAILED
        notes.append("tamper evidence fails the gate (on_tamper: fail)")
    if removed:
        notes.append(f"{len(removed)} test(s) failing at baseline were removed or skipped")
    if patched.modified_files:
        notes.append("changed tracked files: " + ", ".join(patched.modified_files[:5]))
    return CheckResult(
        name=patched.name,
        status=status,
        exit_code=patched.exit_code,
        duration_seconds=round(patched.duration_seconds, 3),
        output_tail=patched.output_tail,
        baseline_status=base_status,
        note="; ".join(notes),
        **fields,
    )


def _passed(report: TestReport, test: str, run: CheckRun) -> bool:
    if test == OUTSIDE_TESTS:
        return run.status is CheckStatus.PASSED
    return report.outcomes.get(test) is Outcome.PASSED or test in run.flaky


_OK = frozenset({CheckStatus.PASSED, CheckStatus.PRE_EXISTING})


def tamper_report(
    results: Sequence[CheckResult],
    runs: Sequence[CheckRun],
    deleted_test_files: Sequence[str],
    policy: GatePolicy,
) -> TamperReport:
    modified = sorted({f for r in runs for f in r.modified_files})
    removed = [f"{c.name}: {t}" for c in results for t in c.removed_failing.names]
    removed_count = sum(c.removed_failing.count for c in results)
    drops = [
        f"{c.name}: {c.baseline_tests.executed} -> {c.tests.executed}"
        for c in results
        if c.tests is not None
        and c.baseline_tests is not None
        and c.tests.executed < c.baseline_tests.executed
    ]
    flagged = bool(modified or removed_count or deleted_test_files)
    return TamperReport(
        flagged=flagged,
        fails_gate=policy.on_tamper == "fail" and bool(modified or removed_count),
        modified_files=modified[:MAX_LISTED_FILES],
        deleted_test_files=list(deleted_test_files[:MAX_LISTED_FILES]),
        removed_failing_tests=TestNames(count=removed_count, names=removed[:MAX_TEST_NAMES]),
        test_count_drops=drops,
    )

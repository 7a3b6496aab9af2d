"""The test gate's models: checks, the gate policy, and what the gate reports per check and
per test.

Apart from :mod:`core.models` (which re-exports every name here) because the gate's result
grew per-test lists, counts and tamper evidence; both modules are the bottom layer and import
nothing from the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator

from core.argv import (
    ENV_NAMES_RULE,
    MAX_CHECKS,
    MAX_ENV,
    EnvValue,
    GateArgv,
    RerunArgv,
    argv_description,
)
from core.argv import GATE_PLACEHOLDERS as GATE_PLACEHOLDERS
from core.argv import RERUN_PLACEHOLDERS as RERUN_PLACEHOLDERS
from core.rules import RuledModel, Unique

CHECK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Model(RuledModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- configuration


class ReportFormat(StrEnum):
    """Where a check's per-test results come from (see ``core.engine.test_reports``)."""

    AUTO = "auto"
    JUNIT = "junit"
    GO_JSON = "go-json"
    UNITTEST = "unittest"
    NONE = "none"


class GateCheck(_Model):
    """One acceptance check: a command (argv, no shell) run on the patched tree."""

    name: str = Field(pattern=CHECK_NAME_PATTERN, description="Name shown in results.")
    command: GateArgv = Field(
        description=argv_description("The check, run in the patched tree", GATE_PLACEHOLDERS)
        + " {report} is a fresh file outside the tree for the check's JUnit XML or go test "
        "-json report."
    )
    timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Per-check limit, reruns of flaky tests included.",
    )
    env: Annotated[dict[str, EnvValue], Field(max_length=MAX_ENV), ENV_NAMES_RULE] = Field(
        default_factory=dict, description="Extra environment variables."
    )
    report: ReportFormat = Field(
        default=ReportFormat.AUTO,
        description="Per-test results: junit (XML in {report} or report_path), go-json "
        "(go test -json on stdout), unittest (verbose output), none, or auto: detected from "
        "the command (pytest gets --junitxml, go test gets -json, python -m unittest gets -v) "
        "and the output.",
    )
    report_path: str | None = Field(
        default=None,
        description="JUnit XML written inside the tree, relative path or glob (e.g. "
        "build/test-results/**/*.xml), for tools that cannot write to {report}.",
    )
    rerun: RerunArgv | None = Field(
        default=None,
        description="argv that runs one test in isolation, to tell flaky tests from broken "
        "ones; placeholders: {test} (id as reported), {test_suite}, {test_name}, {report}, "
        "{python}, {workspace}. Default: derived for pytest, go test and python -m unittest.",
    )

    @field_validator("report_path")
    @classmethod
    def _relative_report_path(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or ".." in value.split("/") or not value):
            raise ValueError(f"report_path {value!r} must be relative and stay in the tree")
        return value


#: A list of gate checks: names unique (results are reported by name).
GateChecks = Annotated[list[GateCheck], Field(max_length=MAX_CHECKS), Unique("name")]


class GatePolicy(_Model):
    """How the gate treats flaky tests, tampering and patches that need fuzz."""

    flaky_reruns: int = Field(
        default=2,
        ge=0,
        le=10,
        description="A test failing on the patched tree is rerun alone up to this many times; "
        "passing on a rerun makes it flaky (recorded, not blamed). 0: no reruns.",
    )
    on_tamper: Literal["flag", "fail"] = Field(
        default="flag",
        description="Tests that failed at baseline and are removed or skipped by the patch, and "
        "tracked files changed by a check, are flagged in the result; 'fail' also fails the "
        "gate.",
    )
    fuzzy_apply: bool = Field(
        default=False,
        description="Let the diff apply with reduced context and whitespace differences when "
        "git apply --index and --3way both refuse it.",
    )


# --------------------------------------------------------------------------- results


class CheckStatus(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    ERROR = "error"
    PRE_EXISTING = "pre_existing"


#: How many test names one list of a result keeps (the count is always exact).
MAX_TEST_NAMES = 200


class TestNames(_Model):
    """A set of tests: the exact count and the first :data:`MAX_TEST_NAMES` ids, sorted."""

    __test__ = False  # not a pytest test class

    count: int = Field(default=0, ge=0)
    names: list[str] = Field(default_factory=list)

    @classmethod
    def of(cls, ids: Iterable[str], limit: int = MAX_TEST_NAMES) -> TestNames:
        unique = sorted(set(ids))
        return cls(count=len(unique), names=unique[:limit])

    @property
    def truncated(self) -> bool:
        return self.count > len(self.names)

    def __bool__(self) -> bool:
        return self.count > 0


class TestCounts(_Model):
    """What one run of a check reported, test by test (errors count as failed)."""

    __test__ = False

    total: int = Field(default=0, ge=0)
    passed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    skipped: int = Field(default=0, ge=0)

    @property
    def executed(self) -> int:
        return self.total - self.skipped


class CheckResult(_Model):
    name: str
    status: CheckStatus
    exit_code: int | None
    duration_seconds: float
    output_tail: str = ""
    baseline_status: CheckStatus | None = None
    granularity: Literal["test", "check"] = Field(
        default="check",
        description="test: judged test by test; check: no per-test results on both trees, "
        "judged by exit status only (a failure on both trees is then pre_existing, though the "
        "failures may differ).",
    )
    report: str | None = Field(default=None, description="Format the per-test results came in.")
    tests: TestCounts | None = Field(default=None, description="Per-test counts, patched tree.")
    baseline_tests: TestCounts | None = None
    new_failures: TestNames = Field(
        default_factory=TestNames,
        description="Failing on the patched tree and not on the baseline (every failing test "
        "when there is no baseline); these fail the gate.",
    )
    pre_existing_failures: TestNames = Field(
        default_factory=TestNames, description="Failing on the baseline and the patched tree."
    )
    fixed: TestNames = Field(
        default_factory=TestNames, description="Failing on the baseline, passing after the patch."
    )
    flaky: TestNames = Field(
        default_factory=TestNames,
        description="Failed on the patched tree, passed when rerun alone: not blamed.",
    )
    baseline_flaky: TestNames = Field(
        default_factory=TestNames,
        description="Failed on the baseline, passed when rerun there: not counted as failing.",
    )
    removed_failing: TestNames = Field(
        default_factory=TestNames,
        description="Failing on the baseline, absent or skipped after the patch (tamper).",
    )
    modified_files: list[str] = Field(
        default_factory=list, description="Tracked files this check changed (tamper)."
    )
    note: str = Field(default="", description="Why the check was judged as it was.")


class TamperReport(_Model):
    """Signs that a patch or a check bent the gate rather than passed it."""

    flagged: bool = False
    fails_gate: bool = Field(default=False, description="on_tamper=fail and something flagged.")
    modified_files: list[str] = Field(
        default_factory=list, description="Tracked files the checks changed."
    )
    deleted_test_files: list[str] = Field(
        default_factory=list, description="Test files the patch deletes."
    )
    removed_failing_tests: TestNames = Field(
        default_factory=TestNames,
        description="'check: test' for tests failing at baseline, removed/skipped by the patch.",
    )
    test_count_drops: list[str] = Field(
        default_factory=list, description="'check: before -> after' executed tests."
    )


class GateResult(_Model):
    passed: bool
    applied: bool = Field(description="Whether the diff applied to a fresh base checkout.")
    apply_method: str | None = Field(
        default=None,
        description="git apply --index, --3way or (policy fuzzy_apply) fuzzy; 'empty'.",
    )
    checks: list[CheckResult] = Field(default_factory=list)
    duration_seconds: float = 0.0
    tamper: TamperReport = Field(default_factory=TamperReport)

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.status not in _GATE_OK]

    @property
    def blamed(self) -> list[str]:
        """Failed checks, each with the new failing tests it names (for messages)."""
        out = []
        for c in self.checks:
            if c.status in _GATE_OK:
                continue
            bits = []
            if c.new_failures:
                more = c.new_failures.count - 3
                names = ", ".join(c.new_failures.names[:3]) + (f" +{more} more" if more > 0 else "")
                bits.append(f"new failures: {names}")
            if c.removed_failing:
                bits.append(f"removed failing tests: {c.removed_failing.count}")
            if c.modified_files:
                bits.append(f"changed tracked files: {', '.join(c.modified_files[:3])}")
            out.append(f"{c.name} ({'; '.join(bits)})" if bits else c.name)
        return out


_GATE_OK = frozenset({CheckStatus.PASSED, CheckStatus.PRE_EXISTING})

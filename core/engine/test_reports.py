"""Per-test results of a gate check: JUnit XML, ``go test -json`` and unittest's output.

The gate compares test by test, so every format is reduced to the same thing: a map from a
stable test id to passed / failed / skipped (an error is a failure, an expected failure a
pass, an unexpected success a failure). Ids follow each tool's own naming, so a user can paste
them into the tool: pytest node ids (``tests/test_calc.py::test_add``) when the JUnit XML came
from pytest and the module is found in the tree, ``classname.name`` for other JUnit
producers, ``package.TestName/sub`` for Go, ``package.module.Class.test`` for unittest.

Parsing is hand-written because the formats are small and fixed; the one library that could
help (junitparser) adds nothing over :mod:`xml.etree.ElementTree`, which we use with
``iterparse`` so a huge report is streamed, after refusing reports over
:data:`MAX_REPORT_BYTES`. The XML is written by code under test: expat (2.4+, which Python
bundles) refuses entity-expansion bombs and ElementTree never fetches external entities.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO

from core.models import TestCounts

MAX_REPORT_BYTES = 64 * 1024 * 1024
#: The pseudo-test a check fails when it exits non-zero although no test in its report failed
#: (a build error, a crash before the tests, a coverage threshold).
OUTSIDE_TESTS = "(failed outside any test)"
#: Suffix of the pseudo-test a Go package fails when it fails without a failing test.
PACKAGE_FAILURE = " (package)"


def is_pseudo(test_id: str) -> bool:
    """A failure that stands for a whole check or package, never "removed" by a patch."""
    return test_id == OUTSIDE_TESTS or test_id.endswith(PACKAGE_FAILURE)


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


_RANK = {Outcome.PASSED: 0, Outcome.SKIPPED: 1, Outcome.FAILED: 2}


@dataclass(frozen=True)
class TestTarget:
    """What a rerun needs to select one test: the suite (module, package) and the name."""

    __test__ = False

    suite: str
    name: str


@dataclass(frozen=True)
class TestReport:
    """Per-test outcomes of one run of a check.

    ``complete`` is False when the source lists failures only (unittest without ``-v``): a
    test missing from such a report may have passed.
    """

    __test__ = False

    format: str
    outcomes: Mapping[str, Outcome]
    targets: Mapping[str, TestTarget] = field(default_factory=dict)
    complete: bool = True
    #: Tests the tool says it ran, where it says so (unittest's "Ran N tests").
    declared_total: int | None = None

    def failing(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o is Outcome.FAILED}

    def counts(self) -> TestCounts:
        values = list(self.outcomes.values())
        total = max(len(values), self.declared_total or 0)
        failed = values.count(Outcome.FAILED)
        skipped = values.count(Outcome.SKIPPED)
        return TestCounts(
            total=total, passed=total - failed - skipped, failed=failed, skipped=skipped
        )


class _Outcomes:
    """Collects outcomes; a test reported twice keeps its worst outcome."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.targets: dict[str, TestTarget] = {}

    def add(self, test_id: str, outcome: Outcome, target: TestTarget | None = None) -> None:
        old = self.outcomes.get(test_id)
        if old is None or _RANK[outcome] > _RANK[old]:
            self.outcomes[test_id] = outcome
        if target is not None:
            self.targets.setdefault(test_id, target)


# --------------------------------------------------------------------------- JUnit XML


class ReportError(Exception):
    """A report file exists but cannot be read as the declared format."""


def parse_junit(paths: Iterable[Path], *, tree: Path | None = None) -> TestReport:
    """Merge the JUnit XML files ``paths``; pytest's classnames become node ids in ``tree``."""
    out = _Outcomes()
    pytest_made = False
    for path in paths:
        try:
            # expat >= 2.4 refuses entity bombs; no external entities (see the docstring)
            with open_report(path) as fh:
                events = list(_testcases(fh))
        except ET.ParseError as exc:
            raise ReportError(f"{path.name}: not JUnit XML ({exc})") from exc
        for elem_tag, suite_name, classname, name, outcome in events:
            if elem_tag == "testsuite":
                pytest_made = pytest_made or suite_name == "pytest"
                continue
            out.add(
                f"{classname}.{name}" if classname else name, outcome, TestTarget(classname, name)
            )
    if pytest_made and tree is not None:
        return _as_pytest_ids(out, tree)
    return TestReport("junit", out.outcomes, out.targets)


def _testcases(fh: IO[bytes]) -> Iterator[tuple[str, str, str, str, Outcome]]:
    for _, elem in ET.iterparse(fh, events=("end",)):  # noqa: S314
        if elem.tag == "testsuite":
            yield "testsuite", elem.get("name") or "", "", "", Outcome.PASSED
        elif elem.tag == "testcase":
            classname, name = elem.get("classname") or "", elem.get("name") or ""
            yield "testcase", "", classname, name, _junit_outcome(elem)
            elem.clear()


def open_report(path: Path) -> IO[bytes]:
    """Open a report the code under test wrote: a regular file, not through a symlink, not
    over :data:`MAX_REPORT_BYTES` (a FIFO or device there must not hang or flood the gate)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ReportError(f"{path.name}: cannot open ({exc.strerror})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ReportError(f"{path.name}: not a regular file")
    if info.st_size > MAX_REPORT_BYTES:
        os.close(fd)
        raise ReportError(f"{path.name}: {info.st_size} bytes, over the {MAX_REPORT_BYTES} limit")
    return os.fdopen(fd, "rb")


def _junit_outcome(case: ET.Element) -> Outcome:
    tags = {child.tag for child in case}
    if tags & {"failure", "error"}:
        return Outcome.FAILED
    if "skipped" in tags:
        return Outcome.SKIPPED
    return Outcome.PASSED


def _as_pytest_ids(out: _Outcomes, tree: Path) -> TestReport:
    """``tests.test_calc.TestX`` + ``test_a[1]`` -> ``tests/test_calc.py::TestX::test_a[1]``."""
    modules: dict[str, tuple[str, list[str]] | None] = {}
    outcomes: dict[str, Outcome] = {}
    targets: dict[str, TestTarget] = {}
    for test_id, outcome in out.outcomes.items():
        target = out.targets[test_id]
        if target.suite not in modules:
            modules[target.suite] = _module_file(tree, target.suite)
        found = modules[target.suite]
        node = "::".join([found[0], *found[1], target.name]) if found is not None else test_id
        merged = outcomes.get(node)
        if merged is None or _RANK[outcome] > _RANK[merged]:
            outcomes[node] = outcome
        targets[node] = TestTarget(found[0] if found else target.suite, node)
    return TestReport("junit", outcomes, targets)


def _module_file(tree: Path, classname: str) -> tuple[str, list[str]] | None:
    parts = classname.split(".") if classname else []
    for cut in range(len(parts), 0, -1):
        rel = "/".join(parts[:cut]) + ".py"
        if (tree / rel).is_file():
            return rel, parts[cut:]
    return None


# --------------------------------------------------------------------------- go test -json


class GoJsonCollector:
    """Reads ``go test -json`` events line by line (as the check runs, nothing is kept whole).

    A package that fails without a failing test (a build error, a panic in TestMain) counts as
    the failed pseudo-test ``<package> (package)``. A test with failing subtests is not
    counted separately: the subtests are what failed.
    """

    def __init__(self) -> None:
        self._out = _Outcomes()
        self._failed_packages: list[str] = []
        self.events = 0

    @staticmethod
    def event(line: str) -> dict[str, object] | None:
        if not line.startswith("{"):
            return None
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return None
        if isinstance(value, dict) and isinstance(value.get("Action"), str):
            return value
        return None

    def feed(self, line: str) -> None:
        ev = self.event(line)
        if ev is not None:
            self.feed_event(ev)

    def feed_event(self, ev: dict[str, object]) -> None:
        self.events += 1
        action, package, test = ev["Action"], ev.get("Package"), ev.get("Test")
        if not isinstance(package, str):
            return  # build-output / build-fail: the package's own fail event follows
        outcome = {"pass": Outcome.PASSED, "fail": Outcome.FAILED, "skip": Outcome.SKIPPED}.get(
            str(action)
        )
        if outcome is None:
            return
        if isinstance(test, str):
            self._out.add(f"{package}.{test}", outcome, TestTarget(package, test))
        elif outcome is Outcome.FAILED:
            self._failed_packages.append(package)

    def report(self) -> TestReport | None:
        if not self.events:
            return None
        out = _Outcomes()
        failed_parents = {
            tid.rsplit("/", 1)[0]
            for tid, o in self._out.outcomes.items()
            if o is Outcome.FAILED and "/" in self._out.targets[tid].name
        }
        for tid, outcome in self._out.outcomes.items():
            if tid in failed_parents:
                continue
            out.add(tid, outcome, self._out.targets[tid])
        for package in self._failed_packages:
            prefix = package + "."
            if not any(
                t.startswith(prefix) and o is Outcome.FAILED for t, o in out.outcomes.items()
            ):
                out.add(package + PACKAGE_FAILURE, Outcome.FAILED, TestTarget(package, ""))
        return TestReport("go-json", out.outcomes, out.targets)


def parse_go_json(lines: Iterable[str]) -> TestReport | None:
    collector = GoJsonCollector()
    for line in lines:
        collector.feed(line)
    return collector.report()


# --------------------------------------------------------------------------- unittest

_ID = r"(?P<name>[A-Za-z_]\w*) \((?P<where>[A-Za-z_][\w.]*)\)(?P<sub> \(.*\))?"
_STATUS = r"(?P<status>ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)"
_VERBOSE = re.compile(rf"^\s*{_ID}(?P<dots> \.\.\.(?: (?P<rest>.*))?)?$")
_DOC_STATUS = re.compile(rf"^.* \.\.\. {_STATUS}$")
_BARE_STATUS = re.compile(rf"^{_STATUS}$")
_HEADER = re.compile(rf"^(?P<kind>FAIL|ERROR|UNEXPECTED SUCCESS): {_ID}$")
_RAN = re.compile(r"^Ran (?P<n>\d+) tests? in ")


def _unittest_outcome(status: str) -> Outcome:
    if status in ("ok", "expected failure"):
        return Outcome.PASSED
    if status.startswith("skipped"):
        return Outcome.SKIPPED
    return Outcome.FAILED


def _unittest_id(name: str, where: str) -> str:
    # Python 3.11+ prints "test_a (pkg.mod.Class.test_a)", older ones "test_a (pkg.mod.Class)"
    return where if where.rsplit(".", 1)[-1] == name else f"{where}.{name}"


class UnittestCollector:
    """Reads unittest's output: ``-v`` lines give every test, the failure headers the failures.

    Handles what unittest actually prints: a docstring on the line after the test's name, test
    output between ``...`` and the status, and subtests (a failing subtest fails its test).
    """

    def __init__(self) -> None:
        self._out = _Outcomes()
        self._pending: str | None = None
        self.verbose = False
        self.ran: int | None = None

    def feed(self, line: str) -> None:
        text = line.rstrip()
        if m := _HEADER.match(text):
            test = _unittest_id(m["name"], m["where"])
            self._out.add(test, Outcome.FAILED, _unittest_target(test))
            return
        if m := _RAN.match(text):
            self.ran = int(m["n"])
            return
        if m := _VERBOSE.match(text):
            test = _unittest_id(m["name"], m["where"])
            rest = m["rest"] or ""
            self.verbose = self.verbose or m["dots"] is not None
            if s := _BARE_STATUS.match(rest):
                self._settle(test, _unittest_outcome(s["status"]))
            elif m["sub"] is None:
                self._pending = test  # docstring, test output or subtests follow
            return
        if self._pending is not None:
            m2 = _DOC_STATUS.match(text) or _BARE_STATUS.match(text)
            if m2 is not None:
                self.verbose = True
                self._settle(self._pending, _unittest_outcome(m2["status"]))

    def _settle(self, test: str, outcome: Outcome) -> None:
        self._out.add(test, outcome, _unittest_target(test))
        self._pending = None

    def report(self) -> TestReport | None:
        if not self._out.outcomes and self.ran is None:
            return None
        return TestReport(
            "unittest",
            dict(self._out.outcomes),
            dict(self._out.targets),
            complete=self.verbose,
            declared_total=self.ran,
        )


def _unittest_target(test: str) -> TestTarget:
    suite, _, name = test.rpartition(".")
    return TestTarget(suite, name)


def parse_unittest(lines: Iterable[str]) -> TestReport | None:
    collector = UnittestCollector()
    for line in lines:
        collector.feed(line)
    return collector.report()


# --------------------------------------------------------------------------- a report file


def sniff_file(path: Path, tree: Path | None) -> TestReport | None:
    """A ``{report}`` file of either kind: XML is JUnit, JSON lines are go test events."""
    with open_report(path) as fh:
        head = fh.read(512).lstrip()
        if not head:
            return None
        if not head.startswith(b"<"):
            fh.seek(0)
            text = io.TextIOWrapper(fh, encoding="utf-8", errors="replace")
            return parse_go_json(text)
    return parse_junit([path], tree=tree)


def find_reports(tree: Path, pattern: str, limit: int = 1000) -> list[Path]:
    """Files in ``tree`` matching the glob ``pattern`` (``**`` spans directories).

    Walks the tree without following symlinks, so a check cannot point the gate at the rest
    of the file system (``glob`` follows symlinked directories); ``.git`` is skipped.
    """
    regex = re.compile(_glob_regex(pattern))
    found: list[Path] = []
    for root, dirs, files in os.walk(tree, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        rel_root = Path(root).relative_to(tree)
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if regex.fullmatch(rel) and not Path(root, name).is_symlink():
                found.append(Path(root, name))
                if len(found) >= limit:
                    return found
    return found


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)

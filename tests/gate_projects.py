"""Small real test projects (pytest, unittest, go test, a JUnit-writing tool) for gate tests.

Each project has one test failing at its base commit (``mul`` is off by one) and one flaky
test that fails the first time it runs in a tree and passes after (it leaves an untracked
marker file in the tree). The edits are what patches do to them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from core.models import GateCheck

CALC_PY = """\
def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b + 1  # the bug every baseline has
"""

PYTEST_TESTS = """\
import pathlib

from calc import add, mul, sub


def test_add():
    assert add(2, 3) == 5


def test_sub():
    assert sub(5, 3) == 2


def test_mul():
    assert mul(2, 3) == 6
"""

PYTEST_FLAKY = """\
import pathlib


def test_flaky():
    marker = pathlib.Path(".flaky-ran")
    if not marker.exists():
        marker.write_text("ran once")
        raise AssertionError("fails on the first run in this tree")
"""

UNITTEST_TESTS = """\
import pathlib
import unittest

from calc import add, mul, sub


class TestCalc(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_sub(self):
        self.assertEqual(sub(5, 3), 2)

    def test_mul(self):
        self.assertEqual(mul(2, 3), 6)

    def test_flaky(self):
        marker = pathlib.Path(".flaky-ran")
        if not marker.exists():
            marker.write_text("ran once")
            self.fail("fails on the first run in this tree")
"""

GO_MOD = "module example.com/calc\n\ngo 1.21\n"
GO_CALC = """\
package calc

func Add(a, b int) int { return a + b }

func Sub(a, b int) int { return a - b }

func Mul(a, b int) int { return a*b + 1 } // the bug every baseline has
"""
GO_TESTS = """\
package calc

import (
\t"os"
\t"testing"
)

func TestAdd(t *testing.T) {
\tif Add(2, 3) != 5 {
\t\tt.Fatal("add")
\t}
}

func TestSub(t *testing.T) {
\tif Sub(5, 3) != 2 {
\t\tt.Fatal("sub")
\t}
}

func TestMul(t *testing.T) {
\tif Mul(2, 3) != 6 {
\t\tt.Fatal("mul")
\t}
}

func TestFlaky(t *testing.T) {
\tif _, err := os.Stat(".flaky-ran"); err != nil {
\t\t_ = os.WriteFile(".flaky-ran", []byte("ran once"), 0o644)
\t\tt.Fatal("fails on the first run in this tree")
\t}
}
"""

#: A test tool that is none of the known runners: it writes JUnit XML where it is told.
JUNIT_TOOL = """\
import argparse
import json
from xml.sax.saxutils import quoteattr

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--only")
args = parser.parse_args()
cases = json.load(open("cases.json"))
rows = []
failed = 0
for name, ok in sorted(cases.items()):
    if args.only and name != args.only:
        continue
    body = "" if ok else "<failure message='no'/>"
    failed += not ok
    rows.append(f"<testcase classname='suite' name={quoteattr(name)}>{body}</testcase>")
with open(args.out, "w") as fh:
    fh.write("<testsuites><testsuite name='tool'>" + "".join(rows) + "</testsuite></testsuites>")
raise SystemExit(1 if failed else 0)
"""


def pytest_project(flaky: bool = False) -> dict[str, str]:
    files = {"calc.py": CALC_PY, "tests/test_calc.py": PYTEST_TESTS}
    if flaky:
        files["tests/test_flaky.py"] = PYTEST_FLAKY
    return files


def unittest_project() -> dict[str, str]:
    return {"calc.py": CALC_PY, "tests/__init__.py": "", "tests/test_calc.py": UNITTEST_TESTS}


def go_project() -> dict[str, str]:
    return {"go.mod": GO_MOD, "calc.go": GO_CALC, "calc_test.go": GO_TESTS}


def pytest_check(**extra: object) -> GateCheck:
    return GateCheck(name="pytest", command=["{python}", "-m", "pytest", "-q", "tests"], **extra)  # type: ignore[arg-type]


def unittest_check() -> GateCheck:
    return GateCheck(
        name="unittest",
        command=["{python}", "-m", "unittest", "discover", "-s", "tests", "-t", "."],
    )


def go_binary() -> str:
    found = shutil.which("go") or "/usr/local/go/bin/go"
    assert os.path.exists(found), "go is needed for the go test gate tests"
    return found


def go_check(gocache: Path) -> GateCheck:
    """``go test ./...`` offline, with a shared build cache (a cold one costs ~20 s)."""
    return GateCheck(
        name="go-test",
        command=[go_binary(), "test", "./..."],
        timeout_seconds=240,
        env={
            "GOCACHE": str(gocache),
            "GOTOOLCHAIN": "local",
            "GOPROXY": "off",
            "GOFLAGS": "-mod=mod -count=1",
        },
    )


def python() -> str:
    return sys.executable

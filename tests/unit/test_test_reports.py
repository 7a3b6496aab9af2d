"""Per-test report parsing, runner recognition and the per-check verdict, as pure logic.

The samples are what the real tools print (Python 3.11 unittest, pytest 8 JUnit XML, Go 1.2x
``go test -json``); tests/unit/test_gate_per_test.py runs the tools themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.engine.gate_verdict import CheckRun, judge, tamper_report
from core.engine.test_reports import (
    OUTSIDE_TESTS,
    Outcome,
    ReportError,
    TestReport,
    TestTarget,
    find_reports,
    parse_go_json,
    parse_junit,
    parse_unittest,
    sniff_file,
)
from core.engine.test_tools import default_rerun, recognise, with_report_flags
from core.models import CheckStatus, GatePolicy, GateResult, TestNames

UNITTEST_VERBOSE = """\
test_doc (tests.test_u.TestA.test_doc)
Docstring line. ... FAIL
test_err (tests.test_u.TestA.test_err) ... noise
ERROR
test_ok (tests.test_u.TestA.test_ok) ... ok
test_skip (tests.test_u.TestA.test_skip) ... skipped 'why'
test_sub (tests.test_u.TestA.test_sub) ...
  test_sub (tests.test_u.TestA.test_sub) (i=1) ... FAIL
test_xf (tests.test_u.TestA.test_xf) ... expected failure

======================================================================
ERROR: test_err (tests.test_u.TestA.test_err)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/tmp/gx/tests/test_u.py", line 14, in test_err
    raise RuntimeError("x")
RuntimeError: x

======================================================================
FAIL: test_sub (tests.test_u.TestA.test_sub) (i=1)
----------------------------------------------------------------------
----------------------------------------------------------------------
Ran 6 tests in 0.001s

FAILED (failures=2, errors=1, skipped=1, expected failures=1)
"""

GO_JSON = """\
{"ImportPath":"example.com/m/broken [example.com/m/broken.test]","Action":"build-output","Output":"# example.com/m/broken\\n"}
{"ImportPath":"example.com/m/broken [example.com/m/broken.test]","Action":"build-fail"}
{"Action":"start","Package":"example.com/m/broken"}
{"Action":"fail","Package":"example.com/m/broken","Elapsed":0,"FailedBuild":"example.com/m/broken"}
{"Action":"run","Package":"example.com/m/calc","Test":"TestOK"}
{"Action":"output","Package":"example.com/m/calc","Test":"TestOK","Output":"--- PASS: TestOK\\n"}
{"Action":"pass","Package":"example.com/m/calc","Test":"TestOK","Elapsed":0}
{"Action":"fail","Package":"example.com/m/calc","Test":"TestFail","Elapsed":0}
{"Action":"pass","Package":"example.com/m/calc","Test":"TestSub/a","Elapsed":0}
{"Action":"fail","Package":"example.com/m/calc","Test":"TestSub/b_c","Elapsed":0}
{"Action":"fail","Package":"example.com/m/calc","Test":"TestSub","Elapsed":0}
{"Action":"skip","Package":"example.com/m/calc","Test":"TestSkip","Elapsed":0}
{"Action":"fail","Package":"example.com/m/calc","Elapsed":0.006}
{"Action":"pass","Package":"example.com/m/other","Elapsed":0.001}
not json at all
"""

PYTEST_XML = """\
<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest">
<testcase classname="tests.test_u.TestA" name="test_doc"><failure message="x">...</failure></testcase>
<testcase classname="tests.test_u.TestA" name="test_ok" />
<testcase classname="tests.test_u.TestA" name="test_skip"><skipped type="pytest.skip"/></testcase>
<testcase classname="tests.test_u" name="test_plain[1-2]"><error message="setup"/></testcase>
<testcase classname="tests.test_u" name="test_plain[1-2]" />
<testcase classname="gone.module" name="test_x" />
</testsuite></testsuites>
"""


def test_unittest_verbose_output_with_docstrings_noise_and_subtests() -> None:
    report = parse_unittest(UNITTEST_VERBOSE.splitlines())
    assert report is not None and report.complete and report.declared_total == 6
    assert dict(report.outcomes) == {
        "tests.test_u.TestA.test_doc": Outcome.FAILED,
        "tests.test_u.TestA.test_err": Outcome.FAILED,
        "tests.test_u.TestA.test_ok": Outcome.PASSED,
        "tests.test_u.TestA.test_skip": Outcome.SKIPPED,
        "tests.test_u.TestA.test_sub": Outcome.FAILED,
        "tests.test_u.TestA.test_xf": Outcome.PASSED,
    }
    assert report.targets["tests.test_u.TestA.test_sub"] == TestTarget(
        "tests.test_u.TestA", "test_sub"
    )
    assert report.counts().model_dump() == {"total": 6, "passed": 2, "failed": 3, "skipped": 1}


def test_unittest_without_verbose_knows_failures_only() -> None:
    text = [
        ".F.s",
        "FAIL: test_b (pkg.test_m.T)",  # the pre-3.11 form: class without the method
        "ERROR: setUpClass (pkg.test_m.U)",
        "Ran 4 tests in 0.01s",
    ]
    report = parse_unittest(text)
    assert report is not None and not report.complete
    assert report.failing() == {"pkg.test_m.T.test_b", "pkg.test_m.U.setUpClass"}
    assert report.counts().total == 4
    assert parse_unittest(["nothing like unittest here", "ok"]) is None


def test_pytest_junit_becomes_node_ids_worst_outcome_wins(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "tests").mkdir(parents=True)
    (tree / "tests/test_u.py").write_text("")
    xml = tmp_path / "r.xml"
    xml.write_text(PYTEST_XML)
    report = parse_junit([xml], tree=tree)
    assert dict(report.outcomes) == {
        "tests/test_u.py::TestA::test_doc": Outcome.FAILED,
        "tests/test_u.py::TestA::test_ok": Outcome.PASSED,
        "tests/test_u.py::TestA::test_skip": Outcome.SKIPPED,
        "tests/test_u.py::test_plain[1-2]": Outcome.FAILED,  # error in setup, then "passed"
        "gone.module.test_x": Outcome.PASSED,  # module not in the tree: kept as classname.name
    }


def test_generic_junit_and_bad_reports(tmp_path: Path) -> None:
    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    a.write_text("<testsuite name='x'><testcase classname='S' name='one'/></testsuite>")
    b.write_text(
        "<testsuites><testsuite><testcase name='two'><failure/></testcase></testsuite></testsuites>"
    )
    report = parse_junit([a, b], tree=tmp_path)
    assert dict(report.outcomes) == {"S.one": Outcome.PASSED, "two": Outcome.FAILED}
    broken = tmp_path / "broken.xml"
    broken.write_text("<testsuite><testcase name='x'>")
    with pytest.raises(ReportError, match="not JUnit XML"):
        parse_junit([broken])
    bomb = tmp_path / "bomb.xml"
    laughs = "".join(
        f'<!ENTITY l{i} "&l{i - 1};&l{i - 1};&l{i - 1};&l{i - 1};">' for i in range(1, 12)
    )
    bomb.write_text(f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY l0 "ha">{laughs}]><t>&l11;</t>')
    with pytest.raises(ReportError):
        parse_junit([bomb])


def test_go_json_subtests_package_failures_and_noise() -> None:
    report = parse_go_json(GO_JSON.splitlines())
    assert report is not None
    assert dict(report.outcomes) == {
        "example.com/m/calc.TestOK": Outcome.PASSED,
        "example.com/m/calc.TestFail": Outcome.FAILED,
        "example.com/m/calc.TestSub/a": Outcome.PASSED,
        "example.com/m/calc.TestSub/b_c": Outcome.FAILED,  # the parent's failure is implied
        "example.com/m/calc.TestSkip": Outcome.SKIPPED,
        "example.com/m/broken (package)": Outcome.FAILED,
    }
    assert report.targets["example.com/m/calc.TestSub/b_c"] == TestTarget(
        "example.com/m/calc", "TestSub/b_c"
    )
    assert parse_go_json(["PASS", "ok  \texample.com/m 0.1s"]) is None


def test_sniffing_a_report_file(tmp_path: Path) -> None:
    xml, events, empty = tmp_path / "x", tmp_path / "j", tmp_path / "e"
    xml.write_text("\n <testsuite><testcase name='t'/></testsuite>")
    events.write_text(GO_JSON)
    empty.write_text("")
    assert sniff_file(xml, tmp_path).format == "junit"  # type: ignore[union-attr]
    assert sniff_file(events, tmp_path).format == "go-json"  # type: ignore[union-attr]
    assert sniff_file(empty, tmp_path) is None


# --------------------------------------------------------------------------- runners


@pytest.mark.parametrize(
    ("argv", "runner", "prefix"),
    [
        (["pytest", "-q"], "pytest", ["pytest"]),
        (
            ["/venv/bin/python3", "-m", "pytest", "tests"],
            "pytest",
            ["/venv/bin/python3", "-m", "pytest"],
        ),
        (
            ["python", "-X", "dev", "-m", "unittest", "discover"],
            "unittest",
            ["python", "-X", "dev", "-m", "unittest"],
        ),
        (["/usr/local/go/bin/go", "test", "./..."], "go", ["/usr/local/go/bin/go", "test"]),
    ],
)
def test_runners_are_recognised_from_the_argv(
    argv: list[str], runner: str, prefix: list[str]
) -> None:
    call = recognise(argv)
    assert call is not None and call.runner == runner and list(call.prefix) == prefix


@pytest.mark.parametrize(
    "argv",
    [
        ["/bin/sh", "-c", "pytest"],
        ["go", "vet", "./..."],
        ["python", "script.py", "-m", "pytest"],
        [],
    ],
)
def test_other_commands_are_not_runners(argv: list[str]) -> None:
    assert recognise(argv) is None


def test_report_flags_are_added_where_each_runner_takes_them() -> None:
    def flags(argv: list[str]) -> tuple[list[str], bool]:
        call = recognise(argv)
        assert call is not None
        return with_report_flags(call, "/s/r.xml")

    assert flags(["pytest", "-q"]) == (["pytest", "-q", "--junitxml=/s/r.xml"], True)
    assert flags(["pytest", "--junitxml=o.xml"]) == (["pytest", "--junitxml=o.xml"], False)
    assert flags(["go", "test", "-race", "./..."]) == (
        ["go", "test", "-json", "-race", "./..."],
        False,
    )
    assert flags(["go", "test", "-json"]) == (["go", "test", "-json"], False)
    assert flags(["python3", "-m", "unittest", "discover", "-s", "t"])[0] == [
        "python3",
        "-m",
        "unittest",
        "discover",
        "-v",
        "-s",
        "t",
    ]
    assert flags(["python3", "-m", "unittest", "tests.test_a"])[0] == [
        "python3",
        "-m",
        "unittest",
        "-v",
        "tests.test_a",
    ]


def test_default_reruns_select_exactly_one_test() -> None:
    pytest_call = recognise(["python3", "-m", "pytest", "-x", "tests"])
    go_call = recognise(
        ["go", "test", "-tags=integration", "-race", "-run", "X", "-count=3", "./..."]
    )
    unit_call = recognise(["python3", "-m", "unittest", "discover"])
    assert pytest_call and go_call and unit_call
    node = "tests/test_a.py::TestX::test_y[1]"
    assert default_rerun(pytest_call, TestTarget("tests/test_a.py", node), "/r") == [
        "python3",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        node,
        "--junitxml=/r",
    ]
    assert default_rerun(pytest_call, TestTarget("gone", "gone.test_x"), "/r") is None
    assert default_rerun(go_call, TestTarget("example.com/m/calc", "TestSub/b.c"), "/r") == [
        "go",
        "test",
        "-tags=integration",
        "-race",
        "-json",
        "-count=1",
        "-run",
        "^TestSub$/^b\\.c$",
        "example.com/m/calc",
    ]
    assert default_rerun(go_call, TestTarget("example.com/m/broken", ""), "/r") is None
    assert default_rerun(unit_call, TestTarget("tests.test_a.T", "test_b"), "/r") == [
        "python3",
        "-m",
        "unittest",
        "-v",
        "tests.test_a.T.test_b",
    ]


# --------------------------------------------------------------------------- verdict


def report(outcomes: dict[str, str], complete: bool = True) -> TestReport:
    return TestReport("junit", {t: Outcome(o) for t, o in outcomes.items()}, complete=complete)


def run(status: str = "failed", rep: TestReport | None = None, **kw: object) -> CheckRun:
    code = 0 if status == "passed" else 1
    return CheckRun("unit", CheckStatus(status), code, 1.0, report=rep, **kw)  # type: ignore[arg-type]


POLICY = GatePolicy()


def test_new_pre_existing_fixed_and_removed_are_told_apart() -> None:
    base = run(
        rep=report({"a": "failed", "b": "passed", "c": "failed", "d": "failed", "e": "failed"})
    )
    patched = run(
        rep=report({"a": "failed", "b": "failed", "c": "passed", "e": "skipped", "f": "failed"})
    )
    result = judge(patched, base, POLICY)
    assert result.status is CheckStatus.FAILED and result.granularity == "test"
    assert result.new_failures.names == ["b", "f"]
    assert result.pre_existing_failures.names == ["a"]
    assert result.fixed.names == ["c"]
    assert result.removed_failing.names == ["d", "e"]
    assert result.baseline_tests and result.baseline_tests.executed == 5
    assert result.tests and result.tests.executed == 4


def test_only_pre_existing_failures_pass_and_flaky_ones_count_nowhere() -> None:
    base = run(rep=report({"a": "failed", "b": "passed", "c": "failed"}), flaky=frozenset({"c"}))
    patched = run(rep=report({"a": "failed", "b": "failed", "c": "failed"}), flaky=frozenset({"b"}))
    result = judge(patched, base, POLICY)
    # c failed at baseline only by chance, and fails for real after the patch: blamed
    assert result.new_failures.names == ["c"]
    assert result.flaky.names == ["b"] and result.baseline_flaky.names == ["c"]
    calm = judge(
        run(rep=report({"a": "failed", "b": "failed"}), flaky=frozenset({"b"})), base, POLICY
    )
    assert calm.status is CheckStatus.PRE_EXISTING and calm.new_failures.count == 0


def test_a_failure_outside_any_test_is_a_pseudo_test() -> None:
    base = run("passed", report({"a": "passed"}))
    crashed = run(rep=report({"a": "passed"}))  # exit 1, nothing failed in the report
    result = judge(crashed, base, POLICY)
    assert result.new_failures.names == [OUTSIDE_TESTS] and "no test in its report" in result.note
    both = judge(crashed, crashed, POLICY)
    assert both.status is CheckStatus.PRE_EXISTING
    healed = judge(run("failed", report({"a": "failed"})), crashed, POLICY)
    assert healed.fixed.names == [OUTSIDE_TESTS] and healed.removed_failing.count == 0


def test_check_granularity_only_when_neither_tree_has_per_test_results() -> None:
    neither = judge(run(), run(), POLICY)
    assert neither.granularity == "check" and neither.status is CheckStatus.PRE_EXISTING
    assert "failures may differ" in neither.note
    one_side = judge(run(rep=report({"a": "failed"})), run(), POLICY)
    assert one_side.granularity == "check" and one_side.status is CheckStatus.FAILED
    assert "one tree only (patched)" in one_side.note
    timeout = judge(
        run("timeout", report({"a": "failed"})), run(rep=report({"a": "failed"})), POLICY
    )
    assert timeout.status is CheckStatus.TIMEOUT


def test_failures_only_reports_cannot_prove_a_removal_unless_the_count_drops() -> None:
    base = run(rep=TestReport("unittest", {"a": Outcome.FAILED}, complete=False, declared_total=5))
    same_count = run("passed", TestReport("unittest", {}, complete=False, declared_total=5))
    assert judge(same_count, base, POLICY).fixed.names == ["a"]
    fewer = run("passed", TestReport("unittest", {}, complete=False, declared_total=4))
    assert judge(fewer, base, POLICY).removed_failing.names == ["a"]


def test_tamper_policy_and_report() -> None:
    base = run(rep=report({"a": "failed"}))
    patched = run("passed", report({}), modified_files=("x.py",))
    flagged = judge(patched, base, POLICY)
    assert flagged.status is CheckStatus.PASSED and flagged.modified_files == ["x.py"]
    strict = judge(patched, base, GatePolicy(on_tamper="fail"))
    assert strict.status is CheckStatus.FAILED and "on_tamper: fail" in strict.note
    tamper = tamper_report([strict], [patched], ["tests/test_a.py"], GatePolicy(on_tamper="fail"))
    assert tamper.flagged and tamper.fails_gate
    assert tamper.removed_failing_tests.names == ["unit: a"]
    assert tamper.test_count_drops == ["unit: 1 -> 0"]
    only_deleted = tamper_report([], [], ["t_test.go"], GatePolicy(on_tamper="fail"))
    assert only_deleted.flagged and not only_deleted.fails_gate


def test_blamed_names_new_failures_bounded() -> None:
    base = run(rep=report({}))
    many = run(rep=report({f"t{i}": "failed" for i in range(5)}))
    gate = GateResult(passed=False, applied=True, checks=[judge(many, base, POLICY)])
    assert gate.blamed == ["unit (new failures: t0, t1, t2 +2 more)"]
    names = TestNames.of(f"n{i:04d}" for i in range(1000))
    assert names.count == 1000 and len(names.names) == 200 and names.truncated


def test_report_files_must_be_regular_files_in_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "out/deep").mkdir(parents=True)
    (tree / ".git").mkdir()
    xml = "<testsuite><testcase classname='S' name='t'/></testsuite>"
    (tree / "out/a.xml").write_text(xml)
    (tree / "out/deep/b.xml").write_text(xml)
    (tree / ".git/c.xml").write_text(xml)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.xml").write_text(xml)
    (tree / "out/link").symlink_to(outside)  # a symlinked directory is not walked into
    (tree / "out/l.xml").symlink_to(outside / "secret.xml")  # nor is a symlinked file read
    found = find_reports(tree, "out/**/*.xml")
    assert [p.relative_to(tree).as_posix() for p in found] == ["out/a.xml", "out/deep/b.xml"]
    assert [p.name for p in find_reports(tree, "**/*.xml")] == ["a.xml", "b.xml"]
    assert find_reports(tree, "out/?.xml") == [tree / "out/a.xml"]
    with pytest.raises(ReportError, match="cannot open"):
        parse_junit([tree / "out/l.xml"])
    fifo = tree / "fifo.xml"
    os.mkfifo(fifo)  # a FIFO would block a plain open() forever
    with pytest.raises(ReportError, match="not a regular file"):
        sniff_file(fifo, tree)

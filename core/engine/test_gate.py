"""The test gate: acceptance checks (lint, unit tests, import checks) on the patched tree.

The gate never runs in the adapter's own worktree: it takes a fresh checkout of the base
commit and applies the captured diff (``git apply --index``, then ``--3way``, fuzz only when
the task's policy allows it), so it proves the diff applies and judges exactly what will be
recorded. Checks run in order, each with its own timeout, in a pinned environment (TZ,
PYTHONHASHSEED, LANG) so results do not depend on the machine.

Judged per test wherever the check reports per test (:mod:`core.engine.test_reports`,
:mod:`core.engine.test_tools`): with ``baseline`` the same checks first run on the unpatched
base, and only tests the patch broke fail the gate; the rules are in
:mod:`core.engine.gate_verdict`. A failing test is rerun alone (``flaky_reruns`` times, within
the check's timeout) before it is blamed, on the baseline too, so neither a flaky new failure
nor a flaky old one decides the outcome. Tracked files a check changes, test files the patch
deletes and baseline failures the patch removes or skips are reported as tamper evidence
(:mod:`core.engine.tree_guard`).

Both backends call :func:`run_gate`: the embedded one in-process, with every check in the
sandbox (:mod:`core.engine.sandbox`: only the tree and the check's scratch dir writable, the
work dir's state hidden, network as the adapter's ``sandbox.gate_network`` says), the
Kubernetes one in the gate pod's runner (the pod is the sandbox there).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path

from core.engine.command_line import base_path, expand_argv
from core.engine.gate_verdict import CheckRun, judge, tamper_report
from core.engine.process_group import LineSink, ProcessResult, run_process_group
from core.engine.sandbox import Confinement, Sandbox
from core.engine.test_reports import (
    GoJsonCollector,
    Outcome,
    ReportError,
    TestReport,
    TestTarget,
    UnittestCollector,
    find_reports,
    parse_junit,
    sniff_file,
)
from core.engine.test_tools import (
    GoOutputSink,
    RunnerCall,
    default_rerun,
    pytest_junit_path,
    recognise,
    with_report_flags,
)
from core.engine.tree_guard import TreeGuard, deleted_test_files
from core.engine.workspace import apply_patch, checkout_commit, shared_object_dirs
from core.models import (
    CheckResult,
    CheckStatus,
    GateCheck,
    GatePolicy,
    GateResult,
    ReportFormat,
)

PINNED_ENV = {
    "TZ": "UTC",
    "PYTHONHASHSEED": "0",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "CI": "true",
}
TAIL_CHARS = 4000
#: Failing tests rerun per check and tree; more failures than this are not flakiness.
MAX_RERUN_TESTS = 10
#: A rerun is not started with less of the check's timeout left than this.
MIN_RERUN_SECONDS = 1.0

Checkout = Callable[[], AbstractContextManager[Path]]
SinkFactory = Callable[[str], LineSink]

_JUDGED = frozenset({CheckStatus.PASSED, CheckStatus.FAILED})
_RUNNER_FOR = {
    ReportFormat.JUNIT: "pytest",
    ReportFormat.GO_JSON: "go",
    ReportFormat.UNITTEST: "unittest",
}


def gate_environment(check: GateCheck, home: Path) -> dict[str, str]:
    return {"PATH": base_path(), "HOME": str(home), **PINNED_ENV, **check.env}


class _Tee:
    """Hands each line to the check's sink and to a unittest collector."""

    def __init__(self, inner: LineSink, collector: UnittestCollector) -> None:
        self.inner, self.collector = inner, collector

    def line(self, stream: str, text: str) -> None:
        self.collector.feed(text)
        self.inner.line(stream, text)


@dataclass(frozen=True)
class _Invocation:
    """One process of a check (the run or a rerun) and how to read its per-test results."""

    argv: list[str]
    report_file: Path
    file_expected: bool
    report_path: str | None


@dataclass(frozen=True)
class _Confine:
    """The sandbox the checks run in (None: unconfined) and whether they get the network."""

    sandbox: Sandbox | None = None
    network: bool = True


class _CheckRunner:
    """Runs the checks of one tree; owns the scratch dir (HOME, report files)."""

    def __init__(
        self,
        scratch: Path,
        sinks: SinkFactory,
        policy: GatePolicy,
        python: str,
        clock: Callable[[], float],
        confine: _Confine = _Confine(),
    ) -> None:
        self.scratch, self.sinks, self.policy = scratch, sinks, policy
        self.python, self.clock, self.confine = python, clock, confine
        self.home = scratch / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self._numbers = count(1)

    def run(self, check: GateCheck, tree: Path, *, known_failing: set[str]) -> CheckRun:
        started = self.clock()
        report_file = self._report_file(check)
        values = {"python": self.python, "workspace": str(tree), "report": str(report_file)}
        argv = expand_argv(check.command, values)
        call = recognise(argv)
        placeholder = any("{report}" in arg for arg in check.command)
        file_expected = placeholder
        report_path = check.report_path
        if call is not None and pytest_junit_path(call) and report_path is None:
            report_path = pytest_junit_path(call)
        if self._inject(check, call, placeholder):
            assert call is not None
            argv, file_expected = with_report_flags(call, str(report_file))
        invocation = _Invocation(argv, report_file, file_expected, report_path)
        proc, report, notes = self._execute(check, tree, invocation, check.timeout_seconds, "")
        status, tail = _status(proc)
        run = CheckRun(
            name=check.name,
            status=status,
            exit_code=proc.exit_code,
            duration_seconds=proc.duration_seconds,
            output_tail=tail[-TAIL_CHARS:],
            report=report,
            notes=tuple(notes),
        )
        if report is None or status not in _JUDGED or not report.failing():
            return run
        flaky, rerun_notes = self._rerun(
            check, tree, call, report, known_failing, deadline=started + check.timeout_seconds
        )
        return replace(run, flaky=frozenset(flaky), notes=run.notes + tuple(rerun_notes))

    def _inject(self, check: GateCheck, call: RunnerCall | None, placeholder: bool) -> bool:
        if call is None or placeholder or check.report_path is not None:
            return False
        if check.report is ReportFormat.AUTO:
            return True
        return _RUNNER_FOR.get(check.report) == call.runner

    def _report_file(self, check: GateCheck) -> Path:
        return self.scratch / f"{next(self._numbers)}-{check.name}.report"

    def _execute(
        self,
        check: GateCheck,
        tree: Path,
        inv: _Invocation,
        timeout: float,
        suffix: str,
    ) -> tuple[ProcessResult, TestReport | None, list[str]]:
        sink: LineSink = self.sinks(check.name + suffix)
        go, unit = GoJsonCollector(), UnittestCollector()
        if check.report in (ReportFormat.AUTO, ReportFormat.GO_JSON):
            sink = GoOutputSink(sink, go)
        if check.report in (ReportFormat.AUTO, ReportFormat.UNITTEST):
            sink = _Tee(sink, unit)
        proc = run_process_group(
            inv.argv,
            cwd=tree,
            env=gate_environment(check, self.home),
            timeout=timeout,
            sink=sink,
            grace_seconds=2.0,
            clock=self.clock,
            sandbox=self.confine.sandbox,
            confinement=Confinement(
                writable=(tree, self.scratch),
                readable=shared_object_dirs(tree),
                network=self.confine.network,
            ),
        )
        if check.report is ReportFormat.NONE:
            return proc, None, []
        try:
            report = self._read_files(inv, tree)
        except (ReportError, OSError) as exc:
            return proc, None, [f"per-test report unreadable: {exc}"]
        report = report or go.report() or unit.report()
        if report is None:
            return proc, None, [_missing_report(check, inv)]
        return proc, report, []

    def _read_files(self, inv: _Invocation, tree: Path) -> TestReport | None:
        if inv.file_expected:
            return sniff_file(inv.report_file, tree) if inv.report_file.exists() else None
        if inv.report_path is not None and os.path.isabs(inv.report_path):
            # the user's own --junitxml=/abs/path: a file outside the tree, read as such
            path = Path(inv.report_path)
            return parse_junit([path], tree=tree) if os.path.lexists(path) else None
        if inv.report_path is not None:
            found = find_reports(tree, inv.report_path)
            return parse_junit(found, tree=tree) if found else None
        return None

    def _rerun(
        self,
        check: GateCheck,
        tree: Path,
        call: RunnerCall | None,
        report: TestReport,
        known_failing: set[str],
        *,
        deadline: float,
    ) -> tuple[set[str], list[str]]:
        if self.policy.flaky_reruns == 0:
            return set(), []
        candidates = sorted(report.failing() - known_failing)
        notes = []
        if len(candidates) > MAX_RERUN_TESTS:
            notes.append(
                f"{len(candidates)} failing tests: only the first {MAX_RERUN_TESTS} were rerun"
            )
            candidates = candidates[:MAX_RERUN_TESTS]
        flaky: set[str] = set()
        unselectable: list[str] = []
        for test in candidates:
            target = report.targets.get(test) or TestTarget("", test)
            for _ in range(self.policy.flaky_reruns):
                left = deadline - self.clock()
                if left < MIN_RERUN_SECONDS:
                    notes.append("the check's timeout left no time for more reruns")
                    return flaky, notes
                inv = self._rerun_invocation(check, tree, call, test, target)
                if inv is None:
                    unselectable.append(test)
                    break
                _, again, _ = self._execute(check, tree, inv, left, ":rerun")
                if again is not None and again.outcomes.get(test) is Outcome.PASSED:
                    flaky.add(test)
                    break
        if unselectable:
            notes.append(
                f"no rerun command for {len(unselectable)} failing test(s) (set `rerun`): "
                "not checked for flakiness"
            )
        return flaky, notes

    def _rerun_invocation(
        self,
        check: GateCheck,
        tree: Path,
        call: RunnerCall | None,
        test: str,
        target: TestTarget,
    ) -> _Invocation | None:
        report_file = self._report_file(check)
        if check.rerun is not None:
            values = {
                "python": self.python,
                "workspace": str(tree),
                "report": str(report_file),
                "test": test,
                "test_suite": target.suite,
                "test_name": target.name,
            }
            argv = expand_argv(check.rerun, values)
            placeholder = any("{report}" in arg for arg in check.rerun)
            return _Invocation(argv, report_file, placeholder, check.report_path)
        if call is None:
            return None
        argv_or_none = default_rerun(call, target, str(report_file))
        if argv_or_none is None:
            return None
        return _Invocation(argv_or_none, report_file, call.runner == "pytest", None)


def _status(proc: ProcessResult) -> tuple[CheckStatus, str]:
    if proc.start_error:
        return CheckStatus.ERROR, proc.start_error
    if proc.timed_out:
        return CheckStatus.TIMEOUT, proc.tail
    return (CheckStatus.PASSED if proc.exit_code == 0 else CheckStatus.FAILED), proc.tail


def _missing_report(check: GateCheck, inv: _Invocation) -> str:
    if inv.file_expected:
        return "no per-test report was written to {report}"
    if inv.report_path is not None:
        return f"no per-test report found at {inv.report_path}"
    if check.report is ReportFormat.AUTO:
        return "no per-test results recognised in the output"
    return f"no {check.report.value} per-test results found"


def run_checks(
    checks: Sequence[GateCheck],
    tree: Path,
    sinks: SinkFactory,
    *,
    python: str = sys.executable,
    policy: GatePolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
    sandbox: Sandbox | None = None,
    network: bool = True,
) -> list[CheckResult]:
    """Run ``checks`` on ``tree`` and judge them on their own (no baseline, no tamper guard)."""
    policy = policy or GatePolicy()
    with tempfile.TemporaryDirectory(prefix="gate-") as scratch:
        confine = _Confine(sandbox, network)
        runner = _CheckRunner(Path(scratch), sinks, policy, python, clock, confine)
        runs = [runner.run(c, tree, known_failing=set()) for c in checks]
    return [judge(run, None, policy) for run in runs]


@contextmanager
def _scratch(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="gate-") as scratch:
        yield Path(scratch)


def run_gate(
    checks: Sequence[GateCheck],
    *,
    patch: bytes | Path,
    checkout: Checkout,
    sinks: SinkFactory,
    baseline: bool = False,
    policy: GatePolicy | None = None,
    python: str = sys.executable,
    clock: Callable[[], float] = time.monotonic,
    sandbox: Sandbox | None = None,
    network: bool = True,
    scratch_dir: Path | None = None,
) -> GateResult:
    """Apply ``patch`` to a fresh checkout and run ``checks``; the outcome decides the task.

    ``sandbox``: every check runs in it, with the network when ``network``.
    ``scratch_dir``: a new directory for the checks' HOME and report files, which the caller
    removes (the embedded backend: with the attempt dir, off the attempt's path); default a
    temporary directory removed before this returns.
    """
    policy = policy or GatePolicy()
    started = clock()
    base_runs: dict[str, CheckRun] = {}
    confine = _Confine(sandbox, network)
    with _scratch(scratch_dir) as scratch:
        if baseline and checks:
            base_sinks: SinkFactory = lambda name: sinks(f"baseline:{name}")  # noqa: E731
            base_runner = _CheckRunner(
                Path(scratch, "base"), base_sinks, policy, python, clock, confine
            )
            with checkout() as base_tree:
                for check in checks:
                    base_runs[check.name] = base_runner.run(check, base_tree, known_failing=set())
        runner = _CheckRunner(Path(scratch, "patched"), sinks, policy, python, clock, confine)
        with checkout() as tree:
            method = apply_patch(tree, patch, fuzzy=policy.fuzzy_apply)
            if method is None:
                return GateResult(
                    passed=False,
                    applied=False,
                    apply_method=None,
                    duration_seconds=round(clock() - started, 3),
                )
            if method == "empty":
                # nothing applied: nothing deleted, and the index is the checkout's commit
                deleted: list[str] = []
                guard = TreeGuard(tree, snapshot=checkout_commit(tree))
            else:
                deleted = deleted_test_files(tree)
                guard = TreeGuard(tree)
            runs = []
            for check in checks:
                base = base_runs.get(check.name)
                run = runner.run(check, tree, known_failing=base.failing() if base else set())
                runs.append(replace(run, modified_files=tuple(guard.changed())))
    results = [judge(run, base_runs.get(run.name), policy) for run in runs]
    tamper = tamper_report(results, runs, deleted, policy)
    ok = {CheckStatus.PASSED, CheckStatus.PRE_EXISTING}
    return GateResult(
        passed=all(r.status in ok for r in results),
        applied=True,
        apply_method=method,
        checks=results,
        duration_seconds=round(clock() - started, 3),
        tamper=tamper,
    )

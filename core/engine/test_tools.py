"""What the gate knows about test runners: which one a check runs, how it reports per test,
and how to run one of its tests alone.

A check is an argv, never a shell string, so the runner is recognised from the argv itself:
``pytest``/``py.test`` or ``<python> -m pytest``, ``go test``, ``<python> -m unittest``. In
``report: auto`` the gate asks a recognised runner for per-test results in a form that does
not change what the user sees: pytest gets ``--junitxml=<file outside the tree>``, go test
gets ``-json`` (the log still shows the plain text: see :class:`GoOutputSink`), unittest gets
``-v``. A check run through a shell is left alone; its output is still sniffed.

Reruns (flaky-test detection) use the check's ``rerun`` argv when given, else one derived
here: the runner's own prefix (interpreter and module, or the go binary) plus a selector
for exactly one test. Options of the original command are dropped, except go's
``-name=value`` build flags (``-tags=...``): a rerun that needs more sets ``rerun``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from core.engine.process_group import LineSink
from core.engine.test_reports import GoJsonCollector, TestTarget

Runner = Literal["pytest", "go", "unittest"]

#: go test flags that must not be carried into a rerun (the rerun sets its own).
_GO_DROP = ("-run", "-json", "-count", "-failfast", "-shuffle", "-v", "-p", "-parallel")
_GO_BOOL_KEEP = ("-race", "-short", "-trimpath", "-cover", "-msan", "-asan")


@dataclass(frozen=True)
class RunnerCall:
    """Where in the argv a recognised runner starts: ``prefix`` runs it, ``args`` follow."""

    runner: Runner
    prefix: tuple[str, ...]
    args: tuple[str, ...]


def recognise(argv: Sequence[str]) -> RunnerCall | None:
    if not argv:
        return None
    exe = os.path.basename(argv[0])
    if exe in ("pytest", "py.test"):
        return RunnerCall("pytest", (argv[0],), tuple(argv[1:]))
    if exe == "go" and len(argv) > 1 and argv[1] == "test":
        return RunnerCall("go", tuple(argv[:2]), tuple(argv[2:]))
    if "python" in exe:
        i = 1
        while i < len(argv) - 1:
            if argv[i] == "-m":
                if argv[i + 1] not in ("pytest", "unittest"):
                    return None
                runner: Runner = "pytest" if argv[i + 1] == "pytest" else "unittest"
                return RunnerCall(runner, tuple(argv[: i + 2]), tuple(argv[i + 2 :]))
            if not argv[i].startswith("-") or argv[i] == "-c":
                return None
            i += 2 if argv[i] in ("-X", "-W") else 1
    return None


def with_report_flags(call: RunnerCall, report_file: str) -> tuple[list[str], bool]:
    """The argv with the runner's per-test output switched on; True if it writes ``report_file``."""
    args = list(call.args)
    if call.runner == "pytest":
        if any(a.startswith(("--junitxml", "--junit-xml")) for a in args):
            return [*call.prefix, *args], False
        return [*call.prefix, *args, f"--junitxml={report_file}"], True
    if call.runner == "go":
        if "-json" not in args and "--json" not in args:
            args.insert(0, "-json")
        return [*call.prefix, *args], False
    if not ({"-v", "--verbose"} & set(args)):
        at = args.index("discover") + 1 if "discover" in args else 0
        args.insert(at, "-v")
    return [*call.prefix, *args], False


def pytest_junit_path(call: RunnerCall) -> str | None:
    """The ``--junitxml`` path the user gave the check, if any (relative to the tree)."""
    args = list(call.args)
    for i, arg in enumerate(args):
        for flag in ("--junitxml", "--junit-xml"):
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
    return None


def default_rerun(call: RunnerCall, target: TestTarget, report_file: str) -> list[str] | None:
    """An argv running only ``target``, reporting in the runner's own format; None if unknown."""
    if call.runner == "pytest":
        if "::" not in target.name:
            return None  # not a node id (the module was not found): cannot select it
        return [
            *call.prefix,
            "-p",
            "no:cacheprovider",
            "-q",
            target.name,
            f"--junitxml={report_file}",
        ]
    if call.runner == "go":
        if not target.name:
            return None  # a package-level failure: rerunning the package is not isolation
        pattern = "/".join(f"^{_go_quote(part)}$" for part in target.name.split("/"))
        return [
            *call.prefix,
            *_go_build_flags(call.args),
            "-json",
            "-count=1",
            "-run",
            pattern,
            target.suite,
        ]
    return [*call.prefix, "-v", f"{target.suite}.{target.name}"]


def _go_build_flags(args: Sequence[str]) -> list[str]:
    keep = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _GO_DROP or not arg.startswith("-"):
            continue
        if "=" in arg or flag in _GO_BOOL_KEEP:
            keep.append(arg)
    return keep


def _go_quote(name: str) -> str:
    """Escape a test name for Go's RE2 ``-run`` pattern."""
    return "".join("\\" + ch if ch in r"\.+*?()|[]{}^$" else ch for ch in name)


class GoOutputSink:
    """Shows ``go test -json`` as the text go test would print, and collects the events.

    The check's log stays readable although the gate asked for JSON; lines that are not
    events (a wrapper's own output) pass through unchanged.
    """

    def __init__(self, inner: LineSink, collector: GoJsonCollector) -> None:
        self.inner, self.collector = inner, collector

    def line(self, stream: str, text: str) -> None:
        if stream == "stdout":
            event = self.collector.event(text)
            if event is not None:
                self.collector.feed_event(event)
                output = event.get("Output")
                if isinstance(output, str) and output.strip():
                    for part in output.rstrip("\n").split("\n"):
                        self.inner.line(stream, part)
                return
        self.inner.line(stream, text)

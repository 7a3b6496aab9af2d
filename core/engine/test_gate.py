"""The test gate: acceptance checks (lint, unit tests, import checks) on the patched tree.

The gate never runs in the adapter's own worktree: it takes a fresh checkout of the base
commit and applies the captured diff, so it proves the diff applies and judges exactly what
will be recorded, not files the adapter left lying around. Checks run in order, each with its
own timeout, in a pinned environment (TZ, PYTHONHASHSEED, LANG) so results do not depend on
the machine. With ``baseline`` the same checks first run on the unpatched base: a check that
already failed there is reported ``pre_existing`` and not blamed on the adapter.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from core.engine.command_line import base_path, expand_argv
from core.engine.process_group import LineSink, run_process_group
from core.engine.workspace import apply_patch
from core.models import CheckResult, CheckStatus, GateCheck, GateResult

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

Checkout = Callable[[], AbstractContextManager[Path]]
SinkFactory = Callable[[str], LineSink]


def gate_environment(check: GateCheck, home: Path) -> dict[str, str]:
    return {"PATH": base_path(), "HOME": str(home), **PINNED_ENV, **check.env}


def run_checks(
    checks: Sequence[GateCheck],
    tree: Path,
    sinks: SinkFactory,
    *,
    python: str = sys.executable,
    clock: Callable[[], float] = time.monotonic,
) -> list[CheckResult]:
    results: list[CheckResult] = []
    with tempfile.TemporaryDirectory(prefix="gate-home-") as home:
        for check in checks:
            argv = expand_argv(check.command, {"python": python, "workspace": str(tree)})
            proc = run_process_group(
                argv,
                cwd=tree,
                env=gate_environment(check, Path(home)),
                timeout=check.timeout_seconds,
                sink=sinks(check.name),
                grace_seconds=2.0,
                clock=clock,
            )
            if proc.start_error:
                status, tail = CheckStatus.ERROR, proc.start_error
            elif proc.timed_out:
                status, tail = CheckStatus.TIMEOUT, proc.tail
            else:
                status = CheckStatus.PASSED if proc.exit_code == 0 else CheckStatus.FAILED
                tail = proc.tail
            results.append(
                CheckResult(
                    name=check.name,
                    status=status,
                    exit_code=proc.exit_code,
                    duration_seconds=round(proc.duration_seconds, 3),
                    output_tail=tail[-TAIL_CHARS:],
                )
            )
    return results


def mark_pre_existing(
    patched: Sequence[CheckResult], baseline: Mapping[str, CheckResult]
) -> list[CheckResult]:
    out = []
    for result in patched:
        base = baseline.get(result.name)
        base_status = base.status if base else None
        status = result.status
        # Only a check that ran and failed on both trees is pre-existing; one that could not
        # run or timed out proves nothing and stays a failure of the gate.
        if status is CheckStatus.FAILED and base_status is CheckStatus.FAILED:
            status = CheckStatus.PRE_EXISTING
        out.append(result.model_copy(update={"status": status, "baseline_status": base_status}))
    return out


def run_gate(
    checks: Sequence[GateCheck],
    *,
    patch: bytes,
    checkout: Checkout,
    sinks: SinkFactory,
    baseline: bool = False,
    python: str = sys.executable,
    clock: Callable[[], float] = time.monotonic,
) -> GateResult:
    """Apply ``patch`` to a fresh checkout and run ``checks``; the outcome decides the task."""
    started = clock()
    base_results: dict[str, CheckResult] = {}
    if baseline and checks:
        with checkout() as base_tree:
            base_sinks: SinkFactory = lambda name: sinks(f"baseline:{name}")  # noqa: E731
            for r in run_checks(checks, base_tree, base_sinks, python=python, clock=clock):
                base_results[r.name] = r
    with checkout() as tree:
        method = apply_patch(tree, patch)
        if method is None:
            return GateResult(
                passed=False,
                applied=False,
                apply_method=None,
                duration_seconds=round(clock() - started, 3),
            )
        results = run_checks(checks, tree, sinks, python=python, clock=clock)
    if baseline:
        results = mark_pre_existing(results, base_results)
    ok = {CheckStatus.PASSED, CheckStatus.PRE_EXISTING}
    return GateResult(
        passed=all(r.status in ok for r in results),
        applied=True,
        apply_method=method,
        checks=results,
        duration_seconds=round(clock() - started, 3),
    )

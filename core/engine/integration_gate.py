"""The seam "run the gate on this tree", and its embedded implementation.

The integration worker judges merged trees, not attempts, but with the same gate
(:func:`core.engine.test_gate.run_gate`) and the same payload as an attempt's gate: a
checkout of a base commit, a patch to apply to it, the checks, the baseline flag and the gate
policy. For a merged tree the base is the branch's last good head and the patch turns it into
the candidate head; with ``baseline`` the checks also run on the good head, so a failure the
branch already had is ``pre_existing`` and only what the batch broke fails it.

Why base + patch rather than "check out the head": it is exactly what a Kubernetes gate Job
already takes (a clone at ``baseCommit``, the patch from a ConfigMap or the evidence store, the
checks), so a backend plugs in by implementing :class:`TreeGate` -- the good head is on the
pushed integration branch, the speculative head never has to leave the worker. The request's
``number`` is deterministic within an integration run, for deterministic Job names.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.engine.task_log import PrefixedSink, TaskLog
from core.engine.test_gate import run_gate
from core.engine.workspace import add_worktree, remove_worktree
from core.models import GateCheck, GatePolicy, GateResult, TaskSpec


@dataclass(frozen=True)
class TreeGateRequest:
    run_id: str
    #: The gate run's number in this integration (1, 2, ...), for names and logs.
    number: int
    #: The repository holding ``base_commit`` (and, locally, ``head_commit``).
    repository: str
    #: The branch's last good head: the checkout the patch is applied to (and the baseline).
    base_commit: str
    #: The merged tree being judged.
    head_commit: str
    #: ``git diff --binary --full-index base_commit head_commit``.
    patch: bytes
    checks: tuple[GateCheck, ...]
    baseline: bool
    policy: GatePolicy
    #: The tasks whose changes the tree adds to the good head, in order.
    task_ids: tuple[str, ...]


def merged_gate(
    gates: Sequence[tuple[TaskSpec, Sequence[GateCheck]]],
) -> tuple[tuple[GateCheck, ...], bool, GatePolicy]:
    """The gate of a merged tree from the gates of the tasks on it, (spec, checks) each.

    The tree must pass every task's checks: their union (an identical check once; a name two
    different checks use gets a numbered suffix), run with the baseline if any task asks for
    it, with the most tolerant flaky-rerun count and the strictest tamper rule. No fuzzy
    apply: the patch is made from the tree itself.
    """
    checks: list[GateCheck] = []
    for _, task_checks in gates:
        for check in task_checks:
            if check in checks:
                continue
            names = {c.name for c in checks}
            name, n = check.name, 2
            while name in names:
                name, n = f"{check.name[:58]}.{n}", n + 1
            checks.append(check if name == check.name else check.model_copy(update={"name": name}))
    specs = [spec for spec, _ in gates]
    strict = any(s.gate_policy.on_tamper == "fail" for s in specs)
    policy = GatePolicy(
        flaky_reruns=max((s.gate_policy.flaky_reruns for s in specs), default=2),
        on_tamper="fail" if strict else "flag",
    )
    return tuple(checks), any(s.gate_baseline for s in specs), policy


class TreeGate(Protocol):
    """Judge a merged tree; a backend implements this (see the module docstring)."""

    def run(self, request: TreeGateRequest) -> GateResult: ...


class LocalTreeGate:
    """The embedded backend: fresh worktrees of the integration repository, the checks run
    as local process groups; output goes to ``logs/integration/<run>.jsonl``."""

    def __init__(
        self,
        workdir: Path,
        *,
        python: str = sys.executable,
        keep_worktrees: bool = False,
        max_log_bytes: int = 2 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workdir = workdir
        self.python = python
        self.keep_worktrees = keep_worktrees
        self.max_log_bytes = max_log_bytes
        self.clock = clock

    def log_path(self, run_id: str) -> Path:
        return self.workdir / "logs" / "integration" / f"{run_id}.jsonl"

    def run(self, request: TreeGateRequest) -> GateResult:
        repo = Path(request.repository)
        scratch = self.workdir / ".work" / "integration" / request.run_id / f"gate-{request.number}"
        checkouts = iter(range(1, 1000))

        @contextmanager
        def checkout() -> Iterator[Path]:
            tree = add_worktree(repo, scratch / f"tree-{next(checkouts)}", request.base_commit)
            try:
                yield tree
            finally:
                if not self.keep_worktrees:
                    remove_worktree(tree)

        with TaskLog(
            self.log_path(request.run_id),
            task_id="integration",
            attempt=request.number,
            max_bytes=self.max_log_bytes,
        ) as log:
            log.note(
                "gate_started",
                base=request.base_commit,
                head=request.head_commit,
                tasks=list(request.task_ids),
                checks=[c.name for c in request.checks],
            )
            gate = run_gate(
                request.checks,
                patch=request.patch,
                checkout=checkout,
                sinks=lambda name: PrefixedSink(log, f"gate:{name}"),
                baseline=request.baseline,
                policy=request.policy,
                python=self.python,
                clock=self.clock,
            )
            log.note("gate_finished", passed=gate.passed, blamed=gate.blamed)
        if not self.keep_worktrees:
            for path in (scratch, scratch.parent):
                try:
                    path.rmdir()
                except OSError:
                    break
        return gate

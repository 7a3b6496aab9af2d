"""The merge queue: speculative batches of changes, gated at once, bisected when they fail.

Why its own module, free of git and I/O: the algorithm is the part worth proving (how many
gate runs it takes, which change it blames), and it is the same whoever applies the changes
and wherever the gate runs (a local process, a Kubernetes Job). The driver hands in
:class:`QueueOps` -- apply a change onto a head, gate a tree -- and receives
:class:`Verdict` s in queue order as soon as they are final.

How a batch goes (after Zuul's speculative gating and bors' batches):

1. The next K candidates are stacked on the last good head, each applied three-way onto the
   one before; a candidate that does not apply is left out of the stack (``conflict``).
2. The stack's tip is gated once. Pass: the whole stack merges, K grows (adaptive).
3. Fail: the stack is bisected over its prefixes -- the good head is known to pass, the tip
   to fail -- until the first failing prefix is found: ``ceil(log2(n))`` more gate runs for a
   stack of n (a batch of 8 with one culprit: at most 4 gate runs in all). The prefix before
   the culprit merges, the culprit is ``gate_failed`` (judged by the run of the tree that
   ended with it), and everything behind it in the batch goes back to the front of the queue,
   to be stacked again on the new good head. K shrinks.

A conflict behind a culprit is not final (it was stacked on a tree that contained the
culprit): it is queued again with the rest. Verdicts come out in batch order, which is queue
order. Bisection assumes a failure, once in the stack, stays (as every merge queue does); a
flaky gate can only make it blame a later candidate, never merge a failing tree.

Gate runs per merged change are counted against one-by-one integration, which needs exactly
one gate run per change that applies (merged + gate_failed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from core.engine.integration_repo import MergeConflict
from core.models import GateResult, IntegrationOutcome

C = TypeVar("C")
C_contra = TypeVar("C_contra", contravariant=True)


class QueueOps(Protocol[C_contra]):
    """What the queue needs from its driver."""

    def stack(self, head: str, candidate: C_contra) -> str | MergeConflict:
        """Apply ``candidate`` onto the commit ``head``: the new commit, or the conflict."""
        ...

    def gate(self, base: str, head: str, candidates: Sequence[C_contra], number: int) -> GateResult:
        """Judge the tree ``head``: ``base`` plus ``candidates``' changes (gate run ``number``)."""
        ...


@dataclass(frozen=True)
class BatchPolicy:
    """K: how many candidates are gated at once. Adaptive: doubled after a passing batch (up
    to ``max_size``), halved after a failing one (down to 1), like a congestion window."""

    size: int = 4
    adaptive: bool = True
    max_size: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.size <= self.max_size:
            raise ValueError(f"batch size {self.size} not in 1..{self.max_size}")

    def after(self, size: int, passed: bool) -> int:
        if not self.adaptive:
            return size
        return min(self.max_size, size * 2) if passed else max(1, size // 2)


@dataclass(frozen=True)
class Verdict(Generic[C]):
    candidate: C
    outcome: IntegrationOutcome
    #: The head the candidate was applied onto (merged), conflicted with, or failed on.
    parent: str
    #: The good head once the batch is decided (where a retried change should start).
    head: str
    batch: int
    #: Gate runs of this queue run when the verdict became known.
    gate_runs: int
    commit: str | None = None
    conflict: MergeConflict | None = None
    gate: GateResult | None = None


@dataclass(frozen=True)
class GateRun:
    number: int
    base: str
    head: str
    size: int
    passed: bool


@dataclass
class QueueReport:
    head: str
    gate_runs: int = 0
    batches: int = 0
    merged: int = 0
    gate_failed: int = 0
    conflicts: int = 0
    runs: list[GateRun] = field(default_factory=list)

    @property
    def one_by_one_gate_runs(self) -> int:
        return self.merged + self.gate_failed


@dataclass(frozen=True)
class _Stacked(Generic[C]):
    candidate: C
    parent: str
    commit: str


@dataclass(frozen=True)
class _Conflicted(Generic[C]):
    candidate: C
    parent: str
    conflict: MergeConflict


def run_queue(
    candidates: Sequence[C],
    head: str,
    ops: QueueOps[C],
    on_verdict: Callable[[Verdict[C]], None],
    *,
    policy: BatchPolicy | None = None,
    on_depth: Callable[[int], None] | None = None,
) -> QueueReport:
    """Integrate ``candidates`` (in order) onto ``head``; ``on_verdict`` gets each final one."""
    policy = policy or BatchPolicy()
    queue: deque[C] = deque(candidates)
    report = QueueReport(head=head)
    size = policy.size
    while queue:
        if on_depth is not None:
            on_depth(len(queue))
        batch = [queue.popleft() for _ in range(min(size, len(queue)))]
        report.batches += 1
        items = _stack(batch, report.head, ops)
        stacked = [i for i in items if isinstance(i, _Stacked)]
        if not stacked:
            _emit(items, report, on_verdict, culprit=None)
            continue
        result = _gate(ops, report, stacked)
        if result.passed:
            report.head = stacked[-1].commit
            _emit(items, report, on_verdict, culprit=None)
            size = policy.after(size, True)
            continue
        culprit, failed, good_head = _bisect(ops, report, stacked, result)
        report.head = good_head
        position = items.index(culprit)
        _emit(items[:position], report, on_verdict, culprit=None)
        _emit([culprit], report, on_verdict, culprit=failed)
        queue.extendleft(reversed([i.candidate for i in items[position + 1 :]]))
        size = policy.after(size, False)
    if on_depth is not None:
        on_depth(0)
    return report


def _stack(batch: Sequence[C], head: str, ops: QueueOps[C]) -> list[_Stacked[C] | _Conflicted[C]]:
    items: list[_Stacked[C] | _Conflicted[C]] = []
    tip = head
    for candidate in batch:
        applied = ops.stack(tip, candidate)
        if isinstance(applied, MergeConflict):
            items.append(_Conflicted(candidate, tip, applied))
        else:
            items.append(_Stacked(candidate, tip, applied))
            tip = applied
    return items


def _gate(ops: QueueOps[C], report: QueueReport, prefix: Sequence[_Stacked[C]]) -> GateResult:
    report.gate_runs += 1
    base, tip = report.head, prefix[-1].commit
    result = ops.gate(base, tip, [s.candidate for s in prefix], report.gate_runs)
    report.runs.append(GateRun(report.gate_runs, base, tip, len(prefix), result.passed))
    return result


def _bisect(
    ops: QueueOps[C],
    report: QueueReport,
    stacked: Sequence[_Stacked[C]],
    failed: GateResult,
) -> tuple[_Stacked[C], GateResult, str]:
    """The first failing prefix of a failing stack: (its last candidate, the failing gate,
    the head of the passing prefix before it)."""
    lo, hi = 0, len(stacked)  # stacked[:lo] passes (lo=0: the good head), stacked[:hi] fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = _gate(ops, report, stacked[:mid])
        if result.passed:
            lo = mid
        else:
            hi, failed = mid, result
    good_head = stacked[lo - 1].commit if lo > 0 else report.head
    return stacked[hi - 1], failed, good_head


def _emit(
    items: Sequence[_Stacked[C] | _Conflicted[C]],
    report: QueueReport,
    on_verdict: Callable[[Verdict[C]], None],
    *,
    culprit: GateResult | None,
) -> None:
    for item in items:
        conflict, commit, outcome = None, None, IntegrationOutcome.MERGED
        if isinstance(item, _Conflicted):
            report.conflicts += 1
            outcome, conflict = IntegrationOutcome.CONFLICT, item.conflict
        elif culprit is not None:
            report.gate_failed += 1
            outcome = IntegrationOutcome.GATE_FAILED
        else:
            report.merged += 1
            commit = item.commit
        on_verdict(
            Verdict(
                item.candidate,
                outcome,
                parent=item.parent,
                head=report.head,
                batch=report.batches,
                gate_runs=report.gate_runs,
                commit=commit,
                conflict=conflict,
                gate=culprit if outcome is IntegrationOutcome.GATE_FAILED else None,
            )
        )

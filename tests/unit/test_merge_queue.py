"""core.engine.merge_queue: batching, bisection, conflicts and adaptive K, on a simulated repo.

The queue is pure logic over its ops (apply a change onto a head, gate a tree), so a fake
repository is fair here: a commit is the set of changes in its tree, a gate is a predicate
over that set. The real git and gate are exercised in tests/integration/test_integration.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.engine.integration_repo import MergeConflict
from core.engine.merge_queue import BatchPolicy, QueueReport, Verdict, run_queue
from core.models import GateResult, IntegrationOutcome

Tree = frozenset[str]


class FakeRepo:
    """Commits are names; each knows the set of changes in its tree."""

    def __init__(
        self,
        fails: Callable[[Tree], bool],
        conflicts: Callable[[Tree, str], bool] = lambda tree, c: False,
    ) -> None:
        self.trees: dict[str, Tree] = {"base": frozenset()}
        self.order: dict[str, tuple[str, ...]] = {"base": ()}
        self.fails = fails
        self.conflicts = conflicts
        self.gated: list[tuple[str, ...]] = []

    def stack(self, head: str, candidate: str) -> str | MergeConflict:
        if self.conflicts(self.trees[head], candidate):
            return MergeConflict((f"{candidate}.txt",), "CONFLICT (content)")
        commit = f"{head}+{candidate}"
        self.trees[commit] = self.trees[head] | {candidate}
        self.order[commit] = (*self.order[head], candidate)
        return commit

    def gate(self, base: str, head: str, candidates: Sequence[str], number: int) -> GateResult:
        assert number == len(self.gated) + 1
        assert self.order[head] == (*self.order[base], *candidates)
        self.gated.append(self.order[head])
        return GateResult(passed=not self.fails(self.trees[head]), applied=True)


def run(
    repo: FakeRepo, candidates: Sequence[str], policy: BatchPolicy
) -> tuple[list[Verdict[str]], QueueReport]:
    verdicts: list[Verdict[str]] = []
    report = run_queue(candidates, "base", repo, verdicts.append, policy=policy)
    return verdicts, report


def outcomes(verdicts: Sequence[Verdict[str]]) -> dict[str, IntegrationOutcome]:
    return {v.candidate: v.outcome for v in verdicts}


NAMES = [f"t{i}" for i in range(1, 9)]


def test_a_passing_batch_merges_whole_with_one_gate_run() -> None:
    repo = FakeRepo(fails=lambda tree: False)
    verdicts, report = run(repo, NAMES, BatchPolicy(size=8))
    assert [v.candidate for v in verdicts] == NAMES
    assert all(v.outcome is IntegrationOutcome.MERGED for v in verdicts)
    assert repo.gated == [tuple(NAMES)]
    assert report.head == "base+" + "+".join(NAMES)
    # each merged change is its own commit on top of the one before
    assert [v.parent for v in verdicts] == ["base", *[v.commit for v in verdicts[:-1]]]


@pytest.mark.parametrize("culprit", NAMES)
def test_a_batch_of_8_finds_its_culprit_in_at_most_4_gate_runs(culprit: str) -> None:
    repo = FakeRepo(fails=lambda tree: culprit in tree)
    verdicts, report = run(repo, NAMES, BatchPolicy(size=8, adaptive=False))
    failed = [v for v in verdicts if v.outcome is IntegrationOutcome.GATE_FAILED]
    assert [v.candidate for v in failed] == [culprit]
    assert failed[0].gate_runs <= 4  # 1 for the batch + log2(8) to bisect it
    merged = [v.candidate for v in verdicts if v.outcome is IntegrationOutcome.MERGED]
    assert merged == [n for n in NAMES if n != culprit]
    # the ones behind the culprit need one more run on the new head (none if it was last)
    assert report.gate_runs == failed[0].gate_runs + (culprit != "t8")


def test_the_culprit_is_judged_by_the_tree_that_ended_with_it() -> None:
    culprit = "t6"
    repo = FakeRepo(fails=lambda tree: culprit in tree and len(tree) > 1)
    verdicts, report = run(repo, NAMES, BatchPolicy(size=8, adaptive=False))
    failed = next(v for v in verdicts if v.outcome is IntegrationOutcome.GATE_FAILED)
    assert failed.candidate == "t6" and failed.gate is not None and not failed.gate.passed
    assert failed.gate_runs == 4
    # 8 fails, 1-4 passes, 1-6 fails, 1-5 passes: t6 blamed; then t7, t8 on top of t1-t5
    assert repo.gated == [
        tuple(NAMES),
        ("t1", "t2", "t3", "t4"),
        ("t1", "t2", "t3", "t4", "t5", "t6"),
        ("t1", "t2", "t3", "t4", "t5"),
        ("t1", "t2", "t3", "t4", "t5", "t7", "t8"),
    ]
    assert failed.parent == "base+t1+t2+t3+t4+t5" and failed.head == failed.parent
    assert [v.candidate for v in verdicts] == NAMES  # verdicts come in queue order
    assert report.gate_runs == 5 and report.merged == 7
    assert report.one_by_one_gate_runs == 8


def test_two_that_pass_alone_and_fail_together_blame_the_later_one() -> None:
    repo = FakeRepo(fails=lambda tree: {"a", "b"} <= tree)
    verdicts, report = run(repo, ["a", "b"], BatchPolicy(size=4))
    assert outcomes(verdicts) == {
        "a": IntegrationOutcome.MERGED,
        "b": IntegrationOutcome.GATE_FAILED,
    }
    assert report.head == "base+a"


def test_a_conflict_before_the_culprit_is_final_one_behind_it_is_retried() -> None:
    # c conflicts only with b; b conflicts with nothing but breaks the gate with a
    repo = FakeRepo(
        fails=lambda tree: {"a", "b"} <= tree,
        conflicts=lambda tree, c: (c == "c" and "b" in tree) or (c == "x" and "a" in tree),
    )
    verdicts, _ = run(repo, ["a", "x", "b", "c"], BatchPolicy(size=4, adaptive=False))
    assert outcomes(verdicts) == {
        "a": IntegrationOutcome.MERGED,
        "x": IntegrationOutcome.CONFLICT,  # before the culprit: final
        "b": IntegrationOutcome.GATE_FAILED,
        "c": IntegrationOutcome.MERGED,  # conflicted behind b; stacked again without b: merges
    }
    assert [v.candidate for v in verdicts] == ["a", "x", "b", "c"]


def test_a_batch_of_conflicts_needs_no_gate_run() -> None:
    repo = FakeRepo(fails=lambda tree: False, conflicts=lambda tree, c: True)
    verdicts, report = run(repo, ["a", "b"], BatchPolicy(size=2))
    assert outcomes(verdicts) == {
        "a": IntegrationOutcome.CONFLICT,
        "b": IntegrationOutcome.CONFLICT,
    }
    assert repo.gated == [] and report.gate_runs == 0


def test_adaptive_batches_grow_after_passes_and_shrink_after_failures() -> None:
    policy = BatchPolicy(size=2, max_size=8)
    assert [policy.after(2, True), policy.after(8, True), policy.after(4, False)] == [4, 8, 2]
    assert policy.after(1, False) == 1
    assert BatchPolicy(size=3, adaptive=False).after(3, True) == 3
    repo = FakeRepo(fails=lambda tree: False)
    run(repo, [f"c{i}" for i in range(14)], policy)
    assert [len(g) for g in repo.gated] == [2, 6, 14]  # batches of 2, 4, 8: cumulative trees
    with pytest.raises(ValueError):
        BatchPolicy(size=0)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=20),
    bad=st.sets(st.integers(min_value=0, max_value=19), max_size=5),
    clash=st.sets(st.integers(min_value=0, max_value=19), max_size=4),
    size=st.integers(min_value=1, max_value=8),
    adaptive=st.booleans(),
)
def test_every_candidate_gets_one_verdict_and_merged_trees_pass(
    n: int, bad: set[int], clash: set[int], size: int, adaptive: bool
) -> None:
    names = [f"c{i:02d}" for i in range(n)]
    bad_names = {f"c{i:02d}" for i in bad}
    clash_names = {f"c{i:02d}" for i in clash}

    def fails(tree: Tree) -> bool:
        return bool(tree & bad_names) and len(tree) > 1  # bad ones fail together with others

    def conflicts(tree: Tree, c: str) -> bool:
        return c in clash_names and bool(tree)  # clashes with anything already on the branch

    repo = FakeRepo(fails, conflicts)
    verdicts, report = run(repo, names, BatchPolicy(size=size, adaptive=adaptive, max_size=8))
    assert [v.candidate for v in verdicts] == sorted(names, key=names.index) == names
    merged = [v for v in verdicts if v.outcome is IntegrationOutcome.MERGED]
    # the branch is the merged changes in queue order, and its tree passes the gate
    assert repo.order[report.head] == tuple(v.candidate for v in merged)
    assert not fails(repo.trees[report.head])
    for v in verdicts:
        if v.outcome is IntegrationOutcome.GATE_FAILED:
            assert fails(repo.trees[v.parent] | {v.candidate})
        if v.outcome is IntegrationOutcome.CONFLICT:
            assert conflicts(repo.trees[v.parent], v.candidate)
    assert report.gate_runs == len(repo.gated)

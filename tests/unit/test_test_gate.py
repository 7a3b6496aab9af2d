"""core.engine.test_gate: ordered checks on a fresh patched checkout, pinned env, baseline."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.engine.test_gate import PINNED_ENV, run_checks, run_gate
from core.engine.workspace import add_worktree, capture_diff
from core.models import CheckStatus, GateCheck

BIG = 10 * 1024 * 1024


class Sinks:
    """A SinkFactory that keeps one recording sink per check name, in call order."""

    def __init__(self, make_sink: Any) -> None:
        self._make = make_sink
        self.by_name: dict[str, Any] = {}
        self.order: list[str] = []

    def __call__(self, name: str) -> Any:
        self.order.append(name)
        self.by_name[name] = self._make()
        return self.by_name[name]


@pytest.fixture
def sinks(make_sink: Any) -> Sinks:
    return Sinks(make_sink)


def sh(name: str, script: str, timeout: float = 30, **env: str) -> GateCheck:
    return GateCheck(name=name, command=["/bin/sh", "-c", script], timeout_seconds=timeout, env=env)


def make_patch(repo: Any, tmp_path: Path, gt: Any, files: dict[str, Any]) -> bytes:
    tree = add_worktree(repo.path, tmp_path / "adapter-tree", repo.base)
    gt.write_files(tree, files)
    return capture_diff(tree, repo.base, BIG).patch


@pytest.fixture
def repo(git_repo: Any) -> Any:
    return git_repo({"app.txt": "good\n", "README.md": "hi\n"})


@pytest.fixture
def checkout(repo: Any, worktree_checkout: Any) -> Callable[[], Any]:
    return worktree_checkout(repo.path, repo.base)


def test_checks_run_in_order_with_per_check_results(
    repo: Any, checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    order = tmp_path / "order.txt"
    patch = make_patch(repo, tmp_path, gt, {"app.txt": "better\n"})
    checks = [
        sh("first", f"echo first >> {order}; echo all good"),
        sh("second", f"echo second >> {order}; echo broken >&2; exit 2"),
        sh("third", f"echo third >> {order}; echo slow; exec sleep 30", timeout=0.7),
        GateCheck(name="fourth", command=["no-such-linter-xyz", "--check"]),
        sh("fifth", f"echo fifth >> {order}"),
    ]
    gate = run_gate(checks, patch=patch, checkout=checkout, sinks=sinks)

    assert order.read_text().split() == ["first", "second", "third", "fifth"]
    assert sinks.order == ["first", "second", "third", "fourth", "fifth"]
    assert [c.name for c in gate.checks] == ["first", "second", "third", "fourth", "fifth"]
    assert [c.status for c in gate.checks] == [
        CheckStatus.PASSED,
        CheckStatus.FAILED,
        CheckStatus.TIMEOUT,
        CheckStatus.ERROR,
        CheckStatus.PASSED,
    ]
    first, second, third, fourth, _ = gate.checks
    assert first.exit_code == 0 and first.output_tail == "all good"
    assert second.exit_code == 2 and "broken" in second.output_tail
    assert third.output_tail == "slow"
    assert 0.7 <= third.duration_seconds < 5
    assert "no-such-linter-xyz" in fourth.output_tail and fourth.exit_code is None
    assert all(c.baseline_status is None for c in gate.checks)
    assert gate.applied and gate.apply_method == "git apply --index --binary"
    assert not gate.passed
    assert gate.failed_checks == ["second", "third", "fourth"]
    # Output is streamed to the check's own sink too.
    assert sinks.by_name["second"].lines == [("stderr", "broken")]


def test_all_passing_gate_passes(
    repo: Any, checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    patch = make_patch(repo, tmp_path, gt, {"app.txt": "better\n"})
    gate = run_gate(
        [sh("a", "true"), GateCheck(name="py", command=["{python}", "-c", "pass"])],
        patch=patch,
        checkout=checkout,
        sinks=sinks,
    )
    assert gate.passed and gate.applied
    assert gate.failed_checks == []
    assert gate.duration_seconds >= 0


def test_checks_see_the_patched_tree_in_a_fresh_checkout(
    repo: Any, checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    patch = make_patch(
        repo, tmp_path, gt, {"app.txt": "patched\n", "new.bin": b"\x00\x01", "README.md": None}
    )
    check = GateCheck(
        name="inspect",
        command=[
            "{python}",
            "-c",
            "import os, sys; print(os.getcwd() == sys.argv[1]); print(open('app.txt').read().strip());"
            "print(os.path.exists('new.bin'), os.path.exists('README.md'),"
            " os.path.exists('leftover.txt'))",
            "{workspace}",
        ],
    )
    # Something the adapter left untracked in its own tree is not part of the gate's tree.
    (tmp_path / "adapter-tree" / "leftover.txt").write_text("x")
    gate = run_gate([check], patch=patch, checkout=checkout, sinks=sinks)
    assert gate.passed
    assert sinks.by_name["inspect"].texts() == ["True", "patched", "True False False"]


def test_pinned_environment_and_no_leaked_secrets(
    repo: Any, checkout: Any, sinks: Sinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATE_FAKE_SECRET", "sk-test-123")
    monkeypatch.setenv("TZ", "America/New_York")
    monkeypatch.setenv("PYTHONHASHSEED", "123")
    monkeypatch.setenv("LANG", "de_DE.ISO-8859-1")
    check = GateCheck(
        name="env",
        command=["{python}", "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        env={"EXTRA_FOR_CHECK": "yes"},
    )
    gate = run_gate([check], patch=b"", checkout=checkout, sinks=sinks)
    assert gate.passed and gate.apply_method == "empty"
    env = json.loads(sinks.by_name["env"].texts()[0])
    assert env["TZ"] == "UTC"
    assert env["PYTHONHASHSEED"] == "0"
    assert env["LANG"] == "C.UTF-8"
    assert env["EXTRA_FOR_CHECK"] == "yes"
    assert "GATE_FAKE_SECRET" not in env
    assert "sk-test-123" not in json.dumps(env)
    assert env["HOME"] != os.environ.get("HOME")
    # Nothing else from the caller's environment: only the pinned set, PATH, HOME and extras.
    assert set(env) <= {*PINNED_ENV, "PATH", "HOME", "EXTRA_FOR_CHECK"}


def test_pinned_hash_seed_makes_output_reproducible(
    repo: Any, checkout: Any, make_sink: Any
) -> None:
    check = GateCheck(name="hash", command=["{python}", "-c", "print(hash('orchestrator'))"])
    outputs = []
    for _ in range(2):
        s = Sinks(make_sink)
        run_gate([check], patch=b"", checkout=checkout, sinks=s)
        outputs.append(s.by_name["hash"].texts())
    assert outputs[0] == outputs[1]


def test_per_check_timeout(repo: Any, checkout: Any, sinks: Sinks) -> None:
    checks = [sh("slow", "exec sleep 30", timeout=0.5), sh("quick", "sleep 0.1", timeout=5)]
    gate = run_gate(checks, patch=b"", checkout=checkout, sinks=sinks)
    slow, quick = gate.checks
    assert slow.status is CheckStatus.TIMEOUT
    assert quick.status is CheckStatus.PASSED
    assert slow.duration_seconds < 5
    assert not gate.passed


def test_patch_that_does_not_apply(repo: Any, checkout: Any, sinks: Sinks, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = (
        b"diff --git a/app.txt b/app.txt\n--- a/app.txt\n+++ b/app.txt\n"
        b"@@ -1 +1 @@\n-not the content\n+whatever\n"
    )
    gate = run_gate([sh("c", f"touch {marker}")], patch=bad, checkout=checkout, sinks=sinks)
    assert not gate.applied
    assert not gate.passed
    assert gate.apply_method is None
    assert gate.checks == []
    assert not marker.exists()


def test_baseline_marks_pre_existing_and_blames_new_failures(
    repo: Any, checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    patch = make_patch(repo, tmp_path, gt, {"app.txt": "bad\n", "fixed.txt": "now\n"})
    checks = [
        sh("always-broken", "echo legacy failure; exit 1"),
        sh("app-is-good", "grep -q good app.txt"),  # passes before, fails after the patch
        sh("needs-fix", "test -e fixed.txt"),  # fails before, passes after
        sh("fine", "true"),
    ]
    gate = run_gate(checks, patch=patch, checkout=checkout, sinks=sinks, baseline=True)
    by_name = {c.name: c for c in gate.checks}
    assert by_name["always-broken"].status is CheckStatus.PRE_EXISTING
    assert by_name["always-broken"].baseline_status is CheckStatus.FAILED
    assert by_name["always-broken"].exit_code == 1
    assert by_name["app-is-good"].status is CheckStatus.FAILED
    assert by_name["app-is-good"].baseline_status is CheckStatus.PASSED
    assert by_name["needs-fix"].status is CheckStatus.PASSED
    assert by_name["needs-fix"].baseline_status is CheckStatus.FAILED
    assert by_name["fine"].status is CheckStatus.PASSED
    assert by_name["fine"].baseline_status is CheckStatus.PASSED
    assert not gate.passed
    assert gate.failed_checks == ["app-is-good"]
    # The baseline ran first, on its own sinks.
    assert sinks.order == [
        "baseline:always-broken",
        "baseline:app-is-good",
        "baseline:needs-fix",
        "baseline:fine",
        "always-broken",
        "app-is-good",
        "needs-fix",
        "fine",
    ]


def test_baseline_only_pre_existing_failures_pass_the_gate(
    repo: Any, checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    patch = make_patch(repo, tmp_path, gt, {"app.txt": "good and better\n"})
    checks = [sh("legacy", "exit 3"), sh("app", "grep -q good app.txt")]
    gate = run_gate(checks, patch=patch, checkout=checkout, sinks=sinks, baseline=True)
    assert [c.status for c in gate.checks] == [CheckStatus.PRE_EXISTING, CheckStatus.PASSED]
    assert gate.passed
    assert gate.failed_checks == []


def test_without_baseline_old_failures_are_blamed(repo: Any, checkout: Any, sinks: Sinks) -> None:
    gate = run_gate([sh("legacy", "exit 3")], patch=b"", checkout=checkout, sinks=sinks)
    assert gate.checks[0].status is CheckStatus.FAILED
    assert not gate.passed
    assert sinks.order == ["legacy"]


def test_baseline_uses_its_own_fresh_checkout(
    repo: Any, worktree_checkout: Any, sinks: Sinks, tmp_path: Path, gt: Any
) -> None:
    made: list[Path] = []
    inner = worktree_checkout(repo.path, repo.base)

    def counting_checkout():
        cm = inner()

        class Wrapper:
            def __enter__(self) -> Path:
                path = cm.__enter__()
                made.append(path)
                return path

            def __exit__(self, *exc: object) -> None:
                cm.__exit__(*exc)

        return Wrapper()

    patch = make_patch(repo, tmp_path, gt, {"app.txt": "x\n"})
    gate = run_gate(
        [sh("c", "cat app.txt")],
        patch=patch,
        checkout=counting_checkout,
        sinks=sinks,
        baseline=True,
    )
    assert gate.passed
    assert len(made) == 2 and made[0] != made[1]
    assert sinks.by_name["baseline:c"].texts() == ["good"]
    assert sinks.by_name["c"].texts() == ["x"]


def test_run_checks_directly(tmp_path: Path, make_sink: Any) -> None:
    sinks = Sinks(make_sink)
    results = run_checks(
        [sh("ok", "pwd"), sh("fail", "exit 4")], tmp_path, sinks, python="/bin/false"
    )
    assert [r.status for r in results] == [CheckStatus.PASSED, CheckStatus.FAILED]
    assert results[0].output_tail == str(tmp_path)
    assert results[1].exit_code == 4


def test_output_tail_is_bounded(repo: Any, checkout: Any, sinks: Sinks) -> None:
    check = GateCheck(
        name="noisy",
        command=["{python}", "-c", "for i in range(5000): print('line', i, 'x' * 50)"],
    )
    gate = run_gate([check], patch=b"", checkout=checkout, sinks=sinks)
    tail = gate.checks[0].output_tail
    assert tail.endswith("line 4999 " + "x" * 50)
    assert len(tail) <= 4000
    assert len(sinks.by_name["noisy"].lines) == 5000

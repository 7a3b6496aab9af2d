"""Git hardening: what an adapter plants in its checkout never runs in the executor's git.

Real git, real files. An adapter (or a gate check) controls everything in its tree,
including ``.git``. It plants ``core.fsmonitor``, ``core.hooksPath`` with hooks, filter,
diff and merge drivers, ``include.path``, ``core.worktree``, a nested repository with its
own fsmonitor, and even replaces ``.git`` with a pointer to a repository it prepared. The
payload writes a marker file outside the tree. A positive control shows the payload does run
through the adapter's own git; then the executor's diff capture, patch application and
tamper guard must run none of it, and the shared mirror must stay untouched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.engine.test_gate import run_gate
from core.engine.tree_guard import TreeGuard, deleted_test_files
from core.engine.workspace import (
    PRIVATE_CONFIG,
    add_worktree,
    apply_patch,
    capture_diff,
    ensure_mirror,
    private_git_dir,
    remove_worktree,
)
from core.errors import InfrastructureError
from core.models import GateCheck

BIG = 10_000_000


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, Path]:
    """(an executable that writes the marker, the marker path); both outside any tree."""
    marker = tmp_path / "PAYLOAD-RAN"
    script = tmp_path / "payload.sh"
    # A filter/fsmonitor payload must also behave enough for git to go on (cat stdin).
    script.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\ncat\n')
    script.chmod(0o755)
    return script, marker


def plant(tree: Path, script: Path, hooks: Path) -> None:
    """Everything repository-local that could make git run a command."""
    hooks.mkdir(exist_ok=True)
    for hook in ("pre-commit", "post-checkout", "post-index-change", "pre-auto-gc", "post-merge"):
        (hooks / hook).write_text(f"#!/bin/sh\nexec {script} hook-{hook}\n")
        (hooks / hook).chmod(0o755)
    include = tree.parent / (tree.name + "-included.cfg")
    include.write_text(f"[core]\n\tfsmonitor = {script}\n")
    config = tree / ".git" / "config"
    config.write_text(
        config.read_text()
        + f"""[core]
\tfsmonitor = {script}
\thooksPath = {hooks}
\tsshCommand = {script}
\tpager = {script}
\teditor = {script}
\taskPass = {script}
[include]
\tpath = {include}
[filter "evil"]
\tclean = {script} clean
\tsmudge = {script} smudge
\trequired = true
[filter "evilproc"]
\tprocess = {script} process
[diff "evil"]
\ttextconv = {script} textconv
\tcommand = {script} diffcmd
[diff]
\texternal = {script}
[merge "evil"]
\tdriver = {script} merge %O %A %B
[credential]
\thelper = !{script}
[uploadpack]
\tpackObjectsHook = {script}
"""
    )
    (tree / ".gitattributes").write_text(
        "*.txt filter=evil diff=evil merge=evil\n*.dat filter=evilproc\n"
    )
    for hook in hooks.iterdir():
        (tree / ".git" / "hooks").mkdir(exist_ok=True)
        (tree / ".git" / "hooks" / hook.name).write_bytes(hook.read_bytes())
        (tree / ".git" / "hooks" / hook.name).chmod(0o755)


def nested_repo_with_fsmonitor(tree: Path, script: Path) -> None:
    sub = tree / "vendored"
    sub.mkdir()
    (sub / "file.txt").write_text("nested\n")
    ident = ["-c", "user.name=a", "-c", "user.email=a@b"]
    for args in (["init", "-q"], ["add", "file.txt"], [*ident, "commit", "-qm", "vendored"]):
        subprocess.run(["git", *args], cwd=sub, check=True, capture_output=True)
    with (sub / ".git" / "config").open("a") as fh:
        fh.write(f"[core]\n\tfsmonitor = {script}\n\thooksPath = {tree.parent}\n")


@pytest.fixture
def repo(git_repo: Any) -> Any:
    return git_repo({"a.txt": "one\n", "b.dat": "bin\n", "tests/test_a.py": "def test(): pass\n"})


def test_the_payload_is_real_through_the_adapters_own_git(
    repo: Any, tmp_path: Path, payload: Any, gt: Any
) -> None:
    """Positive control: the planted config does run commands, for git run in the tree."""
    script, marker = payload
    tree = add_worktree(repo.path, tmp_path / "att" / "tree", repo.base)
    plant(tree, script, tmp_path / "hooks")
    (tree / "a.txt").write_text("two\n")
    subprocess.run(["git", "add", "-A"], cwd=tree, capture_output=True, check=False)
    assert marker.exists()


def test_the_executors_git_runs_nothing_the_adapter_planted(
    repo: Any, tmp_path: Path, payload: Any
) -> None:
    script, marker = payload
    mirror = ensure_mirror(tmp_path / "mirrors", str(repo.path), repo.base)
    objects_before = sorted(p.name for p in (mirror / "objects").rglob("*"))
    refs_before = subprocess.run(
        ["git", "--git-dir", str(mirror), "show-ref"], capture_output=True, check=True
    ).stdout

    tree = add_worktree(mirror, tmp_path / "att" / "tree", repo.base)
    # The adapter's work: edits, a new file, a commit of its own in its own repository ...
    (tree / "a.txt").write_text("two\n")
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(
        ["git", "-c", "user.name=a", "-c", "user.email=a@b", "commit", "-qam", "adapter commit"],
        cwd=tree, env=env, check=True, capture_output=True,
    )  # fmt: skip
    (tree / "b.dat").write_text("changed\n")
    (tree / "new.txt").write_text("new\n")
    # ... and then everything that could make git run a command.
    plant(tree, script, tmp_path / "hooks")
    nested_repo_with_fsmonitor(tree, script)

    diff = capture_diff(tree, repo.base, BIG)
    assert not marker.exists(), marker.read_text()
    changed = {f.path for f in diff.summary.files}
    assert {"a.txt", "b.dat", "new.txt", ".gitattributes"} <= changed
    assert b"+two" in diff.patch and b"+changed" in diff.patch
    # The planted .git was neither read as the repository nor captured as content.
    assert not any(path.startswith(".git/") for path in changed)

    # The gate: a fresh checkout, the patch (with its .gitattributes naming the drivers)
    # applied, the tamper guard over a tree whose .git a check rewrote again.
    gate_tree = add_worktree(mirror, tmp_path / "att" / "gate-1", repo.base)
    assert apply_patch(gate_tree, diff.patch) is not None
    assert not marker.exists(), marker.read_text()
    guard = TreeGuard(gate_tree)
    plant(gate_tree, script, tmp_path / "hooks2")
    (gate_tree / "a.txt").write_text("rewritten by a check\n")
    assert "a.txt" in guard.changed()
    deleted_test_files(gate_tree)
    assert not marker.exists(), marker.read_text()

    # The adapter's commit went to its own repository, never to the shared mirror.
    assert sorted(p.name for p in (mirror / "objects").rglob("*")) == objects_before
    assert (
        subprocess.run(
            ["git", "--git-dir", str(mirror), "show-ref"], capture_output=True, check=True
        ).stdout
        == refs_before
    )
    remove_worktree(tree)
    remove_worktree(gate_tree)
    assert not tree.exists() and not private_git_dir(tree).exists()


def test_a_dot_git_pointing_elsewhere_is_ignored(repo: Any, tmp_path: Path, payload: Any) -> None:
    """The adapter swaps its ``.git`` for a file (or symlink) naming a repository it made."""
    script, marker = payload
    evil = tmp_path / "evil-repo"
    subprocess.run(["git", "init", "-q", str(evil)], check=True)
    with (evil / ".git" / "config").open("a") as fh:
        fh.write(f"[core]\n\tfsmonitor = {script}\n\tworktree = {tmp_path}\n")
    for kind in ("gitfile", "symlink"):
        tree = add_worktree(repo.path, tmp_path / kind / "tree", repo.base)
        git_path = tree / ".git"
        subprocess.run(["rm", "-rf", str(git_path)], check=True)
        if kind == "gitfile":
            git_path.write_text(f"gitdir: {evil / '.git'}\n")
        else:
            git_path.symlink_to(evil / ".git")
        (tree / "a.txt").write_text("changed\n")
        diff = capture_diff(tree, repo.base, BIG)
        assert {f.path for f in diff.summary.files} == {"a.txt"}
        guard = TreeGuard(tree)
        assert guard.changed() == []
        assert not marker.exists(), marker.read_text()
        # and the evil repository got nothing from us
        assert not (evil / ".git" / "index").exists()


def test_a_check_that_plants_a_payload_gets_nothing_run_by_the_gate(
    repo: Any, tmp_path: Path, payload: Any, worktree_checkout: Any, make_sink: Any
) -> None:
    """Through run_gate: the first check plants, the tamper guard after it runs git."""
    script, marker = payload
    plant_cmd = (
        f"printf '[core]\\n\\tfsmonitor = {script}\\n\\thooksPath = {tmp_path}\\n' >> .git/config;"
        f" printf '*.txt filter=evil\\n' > .gitattributes;"
        f" printf '[filter \"evil\"]\\n\\tclean = {script}\\n' >> .git/config;"
        " echo changed > a.txt"
    )
    checks = [
        GateCheck(name="plants", command=["/bin/sh", "-c", plant_cmd]),
        GateCheck(name="after", command=["/bin/sh", "-c", "true"]),
    ]
    gate = run_gate(
        checks,
        patch=b"",
        checkout=worktree_checkout(repo.path, repo.base),
        sinks=lambda name: make_sink(),
    )
    assert not marker.exists(), marker.read_text()
    plants = next(c for c in gate.checks if c.name == "plants")
    assert plants.modified_files == ["a.txt"]


@pytest.mark.parametrize(
    "url",
    [
        "--upload-pack=touch {marker}",
        "ext::sh -c touch% {marker}",
        "-u touch {marker}",
    ],
)
def test_repository_urls_never_become_options_or_commands(
    tmp_path: Path, url: str, payload: Any
) -> None:
    _, marker = payload
    with pytest.raises(InfrastructureError):
        ensure_mirror(tmp_path / "mirrors", url.format(marker=marker), "a" * 40)
    assert not marker.exists()


def test_a_planted_private_repository_config_is_put_back_before_use(
    repo: Any, tmp_path: Path, payload: Any
) -> None:
    """In a pod the adapter shares the runner's user and can write the private repository
    too (the embedded sandbox hides it): its config, hooks and info are reset before use."""
    script, marker = payload
    tree = add_worktree(repo.path, tmp_path / "pod" / "tree", repo.base)
    private = private_git_dir(tree)
    (private / "config").write_text(
        f"[core]\n\tbare = true\n\tfsmonitor = {script}\n\thooksPath = {tmp_path}\n"
        f'[filter "evil"]\n\tclean = {script}\n'
    )
    (private / "info").mkdir(exist_ok=True)
    (private / "info" / "attributes").write_text("* filter=evil\n")
    (tree / "a.txt").write_text("changed\n")
    diff = capture_diff(tree, repo.base, BIG)
    assert {f.path for f in diff.summary.files} == {"a.txt"}
    assert not marker.exists(), marker.read_text()
    assert "fsmonitor" not in (private / "config").read_text()
    assert not (private / "info").exists()

    # a symlinked config is replaced, not written through
    elsewhere = tmp_path / "elsewhere.cfg"
    elsewhere.write_text("[user]\n\tname = untouched\n")
    (private / "config").unlink()
    (private / "config").symlink_to(elsewhere)
    capture_diff(tree, repo.base, BIG)
    assert not (private / "config").is_symlink()
    assert elsewhere.read_text() == "[user]\n\tname = untouched\n"

    # ... even when it points at a file holding exactly our config (which could change)
    elsewhere.write_text(PRIVATE_CONFIG)
    (private / "config").unlink()
    (private / "config").symlink_to(elsewhere)
    # and hooks or a commondir planted as a symlink or a file are removed, not followed
    (private / "hooks").symlink_to(tmp_path / "hooks-elsewhere")
    (private / "commondir").write_text(str(tmp_path))
    capture_diff(tree, repo.base, BIG)
    assert not (private / "config").is_symlink()
    assert (private / "config").read_text() == PRIVATE_CONFIG
    assert not (private / "hooks").is_symlink() and not (private / "commondir").exists()
    assert not marker.exists()

"""The demo's integration branch through the command line, and ``--push`` to a real git server.

The demo: ``execute --integrate`` merges the COMPLETED tasks in queue order; split-module
conflicts with add-multiply, is sent back with the conflict in its prompt, redone on the
integration head and merged; the human's patch, handed in later, is merged on top (three-way,
onto the file split-module renamed). The server: ``git daemon`` on 127.0.0.1, started here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.db.database import default_url, upgrade
from core.models import IntegrationResults, LedgerEntry
from tests.workdirs import fake_ai_adapter, git, make_workdir

CLI = [sys.executable, "-m", "core.cli"]


def cli(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--workdir", str(workdir)], capture_output=True, text=True, check=False
    )


def results(workdir: Path) -> IntegrationResults:
    return IntegrationResults.model_validate_json(
        (workdir / ".state/integration_results.json").read_text()
    )


def ledger(workdir: Path) -> list[LedgerEntry]:
    path = workdir / ".state/patch_ledger.jsonl"
    return [LedgerEntry.model_validate_json(x) for x in path.read_text().splitlines()]


def commits(r: IntegrationResults) -> list[dict[str, str]]:
    """The branch above its base, oldest first: subject and trailers of each commit."""
    repo = Path(r.local_repository)
    ids = git("rev-list", "--reverse", f"{r.base_commit}..{r.branch}", cwd=repo).split()
    out = []
    for commit in ids:
        body = git("log", "-1", "--format=%s%n%b", commit, cwd=repo).splitlines()
        fields = dict(line.split(": ", 1) for line in body[1:] if ": " in line)
        out.append({"id": commit, "subject": body[0], **fields})
    return out


def test_the_demo_ends_on_its_integration_branch(demo_dir: Path) -> None:
    upgrade(default_url(demo_dir))
    run = cli("execute", "--run", "demo", "--integrate", workdir=demo_dir)
    assert run.returncode == 3, run.stderr  # the human task still waits
    assert "executing the 1 task(s) sent back: split-module" in run.stdout

    r = results(demo_dir)
    merged = [(t.task_id, t.attempt) for t in r.tasks if t.outcome == "merged"]
    assert merged == [("add-multiply", 1), ("update-logo", 1), ("split-module", 2)]
    assert {t.task_id: t.outcome.value for t in r.tasks if t.outcome != "merged"} == {
        "break-subtract": "skipped",
        "tool-crash": "skipped",
        "slow-tool": "skipped",
        "no-change": "skipped",
        "human-docs": "skipped",
    }
    branch = commits(r)
    assert [c["subject"] for c in branch] == [
        "add-multiply: Add multiplication",
        "update-logo: New logo",
        "split-module: Split the module, add notes",
    ]
    attempts = {(e.task_id, e.attempt): e for e in ledger(demo_dir) if e.kind == "attempt"}
    for c in branch:
        entry = attempts[(c["Task"], int(c["Attempt"]))]
        assert c["Adapter"] == entry.adapter_id and c["Diff-SHA256"] == entry.diff_sha256
        assert c["Run"] == "demo" and c["id"] == next(
            t.commit for t in r.tasks if t.task_id == c["Task"]
        )
    # split-module's second attempt was made on the branch, with add-multiply's mul in it
    assert attempts[("split-module", 2)].base_commit == branch[1]["id"]
    repo = Path(r.local_repository)
    assert "mul" in git("show", f"{r.branch}:calc/ops.py", cwd=repo)
    assert "def mul" in git("show", f"{r.branch}:calc/arith.py", cwd=repo)

    verified = cli("ledger", "verify", workdir=demo_dir)
    assert verified.returncode == 0, verified.stderr

    # integrating again finds nothing new and writes nothing
    before = [
        (demo_dir / p).read_bytes() for p in (".state/patch_ledger.jsonl", "logs/executor.jsonl")
    ]
    again = cli("integrate", "--run", "demo", workdir=demo_dir)
    assert again.returncode == 0, again.stderr
    after = [
        (demo_dir / p).read_bytes() for p in (".state/patch_ledger.jsonl", "logs/executor.jsonl")
    ]
    assert after == before

    # the human's patch, handed in later, is merged on top: onto the file split-module renamed
    patch = demo_dir / "human.diff"
    patch.write_text(
        "--- a/docs/README.md\n+++ b/docs/README.md\n@@ -1,3 +1,3 @@\n # calc\n \n"
        "-TODO: write the documentation.\n+calc offers add, sub and mul.\n"
    )
    assert (
        cli(
            "manual", "submit", "human-docs", str(patch), "--run", "demo", workdir=demo_dir
        ).returncode
        == 0
    )
    final = cli("execute", "--run", "demo", "--integrate", workdir=demo_dir)
    assert final.returncode == 0, final.stdout + final.stderr
    r = results(demo_dir)
    assert [c["subject"] for c in commits(r)][-1] == "human-docs: Document calc by hand"
    text = git("show", f"{r.branch}:docs/Über die Module.md", cwd=repo)
    assert "calc offers add, sub and mul." in text
    assert cli("ledger", "verify", workdir=demo_dir).returncode == 0


# --------------------------------------------------------------------------- --push


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``git daemon`` on 127.0.0.1 serving (and accepting pushes to) repositories in a dir."""
    root = tmp_path / "served"
    root.mkdir()
    port = _free_port()
    daemon = subprocess.Popen(
        [
            "git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
            "--listen=127.0.0.1", f"--port={port}", f"--base-path={root}", str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"git://127.0.0.1:{port}", root
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def test_integrate_push_publishes_the_branch_to_the_git_server(
    tmp_path: Path, git_server: tuple[str, Path]
) -> None:
    base_url, root = git_server
    workdir = make_workdir(
        tmp_path / "w",
        run_id="pushed",
        tasks=[
            {"task_id": "one", "title": "One", "prompt": "fake-ai: write one.txt :: 1"},
            {"task_id": "two", "title": "Two", "prompt": "fake-ai: write two.txt :: 2"},
        ],
        adapters=[fake_ai_adapter()],
        routes={"one": "fake-ai", "two": "fake-ai"},
    )
    git("clone", "--bare", "-q", str(workdir / "repo"), str(root / "src.git"), cwd=tmp_path)
    url = f"{base_url}/src.git"
    queue_path = workdir / ".state/task_queue.json"
    queue = json.loads(queue_path.read_text())
    for task in queue["tasks"]:
        task["repo"] = url  # the tasks' repository is the server's
    queue_path.write_text(json.dumps(queue))
    upgrade(default_url(workdir))

    assert cli("execute", "--run", "pushed", workdir=workdir).returncode == 0
    done = cli("integrate", "--run", "pushed", "--push", workdir=workdir)
    assert done.returncode == 0, done.stderr
    r = results(workdir)
    assert r.pushed and r.repository == url and r.local_repository != url
    branch = "orchestrator/integration/pushed"
    remote = git("ls-remote", url, f"refs/heads/{branch}", cwd=tmp_path).split()
    assert remote == [r.head_commit, f"refs/heads/{branch}"]
    served = root / "src.git"
    assert git("log", "--format=%s", branch, "-2", cwd=served).splitlines() == [
        "two: Two",
        "one: One",
    ]
    assert git("rev-parse", "main", cwd=served) == r.base_commit  # nothing else was touched

    # nothing new: no second push is needed, the branch stays where it is
    again = cli("integrate", "--run", "pushed", "--push", workdir=workdir)
    assert again.returncode == 0, again.stderr
    assert results(workdir).pushed
    assert git("ls-remote", url, f"refs/heads/{branch}", cwd=tmp_path).split()[0] == r.head_commit

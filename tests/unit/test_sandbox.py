"""core.engine.sandbox: real bubblewrap, real processes, real files.

What a sandboxed process can write (its tree and scratch dirs only), what it sees of the work
dir (no state, ledger, logs, database, mirrors or other attempts), that it is not root, that
the process-group kill still works through the sandbox (SIGTERM's grace period reaches the
command; nothing survives SIGKILL, not even a process that left the group), network off,
and the refusal when no sandbox works.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.engine.process_group import ProcessResult, run_process_group
from core.engine.sandbox import (
    BWRAP_ENV,
    NOBODY,
    Bubblewrap,
    Confinement,
    SandboxUnavailable,
    Unconfined,
    select_sandbox,
)
from core.models import IsolationLevel

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", textwrap.dedent(script)]


def run(
    sandbox: Any,
    argv: list[str],
    cwd: Path,
    sink: Any,
    *,
    writable: tuple[Path, ...] | None = None,
    readable: tuple[Path, ...] = (),
    network: bool = True,
    timeout: float = 60,
    grace: float = 5.0,
    env: dict[str, str] | None = None,
) -> ProcessResult:
    return run_process_group(
        argv,
        cwd=cwd,
        env=env or {**ENV, "HOME": str(cwd)},
        timeout=timeout,
        sink=sink,
        grace_seconds=grace,
        sandbox=sandbox,
        confinement=Confinement(writable or (cwd,), readable, network),
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A work dir as the executor leaves it: state, ledger, logs, database, mirrors, trees."""
    wd = tmp_path / "work"
    for rel, text in {
        ".state/task_queue.json": '{"secret": "state"}',
        ".state/patch_ledger.jsonl": "ledger line\n",
        ".ledger/patches/ab.diff": "old patch\n",
        "logs/executor.jsonl": "log\n",
        "manual/run/t/submitted.diff": "human patch\n",
        ".work/mirrors/repo-1.git/config": "[core]\n\tbare = true\n",
        ".work/mirrors/repo-1.git/objects/info/packs": "\n",
        ".work/run/other-task/1/tree/theirs.txt": "another attempt's work\n",
        ".work/run/t/1/prompt.md": "the prompt\n",
        "tools/tool.py": "print('a tool of the work dir')\n",
        "orchestrator.db": "SQLite format 3\0",
    }.items():
        path = wd / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel in (".work/run/t/1/tree", ".work/run/t/1/home"):
        (wd / rel).mkdir(parents=True)
    return wd


def attempt_paths(wd: Path) -> tuple[Path, Path, Path]:
    adir = wd / ".work" / "run" / "t" / "1"
    return adir / "tree", adir / "home", adir / "prompt.md"


# --------------------------------------------------------------------------- the file system


def test_writes_outside_the_workspace_never_reach_the_host(
    make_sandbox: Any, workdir: Path, sink: Any
) -> None:
    tree, home, prompt = attempt_paths(workdir)
    host_tmp = Path("/tmp") / f"orchestrator-escape-{uuid.uuid4().hex}"
    sandbox = make_sandbox(workdir, hidden=(workdir / "orchestrator.db",))
    script = f"""
        for target in {host_tmp} {workdir}/.state/evil {workdir}/escape \
                      {workdir}/tools/evil {workdir}/.work/mirrors/repo-1.git/evil \
                      {workdir}/orchestrator.db /etc/evil {home}/../evil; do
            if echo x > "$target" 2>/dev/null; then echo "wrote $target"; fi
        done
        echo kept > inside.txt
        mkdir -p sub && echo kept > sub/deep.txt
        echo at-home > "$HOME/cache.txt"
        echo done
    """
    env = {**ENV, "HOME": str(home)}
    result = run(
        sandbox, sh(script), tree, sink, writable=(tree, home), readable=(prompt,), env=env
    )
    assert result.exit_code == 0, sink.texts()
    assert "done" in sink.texts("stdout")
    # Inside the sandbox its private /tmp took a write; on the host nothing outside the tree
    # and HOME changed.
    assert f"wrote {host_tmp}" in sink.texts("stdout")
    assert not host_tmp.exists()
    assert not Path("/etc/evil").exists()
    for gone in (
        workdir / ".state" / "evil",
        workdir / "escape",
        workdir / "tools" / "evil",
        workdir / ".work" / "mirrors" / "repo-1.git" / "evil",
        home.parent / "evil",
    ):
        assert not gone.exists(), gone
    assert (workdir / "orchestrator.db").read_text() == "SQLite format 3\0"
    assert (workdir / ".state" / "task_queue.json").read_text() == '{"secret": "state"}'
    # ... and what it wrote inside its tree and HOME is there.
    assert (tree / "inside.txt").read_text() == "kept\n"
    assert (tree / "sub" / "deep.txt").read_text() == "kept\n"
    assert (home / "cache.txt").read_text() == "at-home\n"


def test_the_work_dir_state_and_mirrors_are_not_visible(
    make_sandbox: Any, workdir: Path, sink: Any
) -> None:
    tree, home, prompt = attempt_paths(workdir)
    sandbox = make_sandbox(workdir, hidden=(workdir / "orchestrator.db",))
    script = f"""
        ls -A {workdir}
        echo ---
        ls -A {workdir}/.work {workdir}/.work/run {workdir}/.work/run/t/1
        echo ---
        for f in {workdir}/.state/task_queue.json {workdir}/.ledger/patches/ab.diff \
                 {workdir}/logs/executor.jsonl {workdir}/manual/run/t/submitted.diff \
                 {workdir}/.work/mirrors/repo-1.git/config \
                 {workdir}/.work/run/other-task/1/tree/theirs.txt {workdir}/orchestrator.db; do
            if cat "$f" >/dev/null 2>&1; then echo "read $f"; fi
        done
        cat {prompt}
        python3 {workdir}/tools/tool.py
    """
    result = run(sandbox, sh(script), tree, sink, writable=(tree, home), readable=(prompt,))
    assert result.exit_code == 0, sink.texts()
    out = sink.texts("stdout")
    listing = out[: out.index("---")]
    # no .state, .ledger, logs, manual or database; of .work only the way to its own attempt
    assert sorted(listing) == [".work", "tools"]
    work = out[out.index("---") + 1 : len(out) - out[::-1].index("---") - 1]
    assert [line for line in work if line and not line.endswith(":")] == [
        "run",
        "t",
        "home",
        "prompt.md",
        "tree",
    ]
    assert not [line for line in out if line.startswith("read ")]
    assert "the prompt" in out  # bound read-only for it
    assert "a tool of the work dir" in out  # the work dir's other entries stay readable


def test_a_database_outside_the_work_dir_is_hidden_too(
    make_sandbox: Any, workdir: Path, tmp_path: Path, sink: Any
) -> None:
    db_dir = tmp_path / "elsewhere"
    db_dir.mkdir()
    db = db_dir / "orchestrator.db"
    db.write_text("rows")
    (db_dir / "readable.txt").write_text("fine\n")
    tree, home, _ = attempt_paths(workdir)
    sandbox = make_sandbox(workdir, hidden=(db,))
    # the sandbox's /tmp is private: bind the directory in to show what is left of it
    script = f"cat {db}; echo; cat {db_dir}/readable.txt"
    result = run(sandbox, sh(script), tree, sink, writable=(tree, home), readable=(db_dir,))
    assert result.exit_code == 0
    assert sink.texts("stdout") == ["", "fine"]  # the database reads as an empty file


def test_symlinks_in_the_work_dir_do_not_lead_into_hidden_state(
    make_sandbox: Any, workdir: Path, sink: Any
) -> None:
    (workdir / "state-link").symlink_to(workdir / ".state")
    tree, home, _ = attempt_paths(workdir)
    script = f"ls {workdir}/state-link/ 2>&1; cat {workdir}/state-link/task_queue.json 2>&1"
    run(make_sandbox(workdir), sh(script), tree, sink, writable=(tree, home))
    assert not any("secret" in line for line in sink.texts())


def test_the_process_is_not_root_and_has_no_capabilities(
    make_sandbox: Any, workdir: Path, sink: Any
) -> None:
    tree, home, _ = attempt_paths(workdir)
    script = "id -u; id -g; grep -E '^Cap(Eff|Prm|Amb):' /proc/self/status; touch owned.txt"
    result = run(make_sandbox(workdir), sh(script), tree, sink, writable=(tree, home))
    assert result.exit_code == 0, sink.texts()
    out = sink.texts("stdout")
    expected = NOBODY if os.geteuid() == 0 else os.geteuid()
    assert out[0] == str(expected)
    assert all(line.split()[1] == "0000000000000000" for line in out[2:5]), out
    if os.geteuid() == 0:
        # the tree was handed to the sandbox's user, so files it made are that user's
        assert (tree / "owned.txt").stat().st_uid == NOBODY


def test_the_executor_and_its_environment_are_invisible(
    make_sandbox: Any, workdir: Path, sink: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = f"executor-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("EXECUTOR_ONLY_SECRET", marker)
    tree, home, _ = attempt_paths(workdir)
    script = f"""
        for d in /proc/[0-9]*; do cat "$d/environ" 2>/dev/null | tr '\\0' '\\n'; done \
            | grep -c {marker} || true
        ls -d /proc/[0-9]* | wc -l
        kill -0 {os.getpid()} 2>/dev/null && echo "can signal the executor" || true
    """
    run(make_sandbox(workdir), sh(script), tree, sink, writable=(tree, home))
    out = sink.texts("stdout")
    assert out[0] == "0"
    assert int(out[1]) < 10  # its own few processes, not the host's
    assert "can signal the executor" not in out


def test_a_program_outside_the_visible_system_is_still_found(
    make_sandbox: Any, workdir: Path, tmp_path: Path, sink: Any
) -> None:
    # a tool installed in a private directory (/tmp) is bound in read-only
    bindir = tmp_path / "tools" / "bin"
    bindir.mkdir(parents=True)
    tool = bindir / "mytool"
    tool.write_text('#!/bin/sh\necho tool ran; touch "$0.was-writable" 2>/dev/null || true\n')
    tool.chmod(0o755)
    tree, home, _ = attempt_paths(workdir)
    env = {**ENV, "PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home)}
    result = run(make_sandbox(workdir), ["mytool"], tree, sink, writable=(tree, home), env=env)
    assert result.exit_code == 0 and sink.texts("stdout") == ["tool ran"]
    assert not (bindir / "mytool.was-writable").exists()


def test_executor_python_is_usable_inside(make_sandbox: Any, workdir: Path, sink: Any) -> None:
    tree, home, _ = attempt_paths(workdir)
    argv = [sys.executable, "-c", "import core, sys; print('python ok', sys.prefix)"]
    result = run(make_sandbox(workdir), argv, tree, sink, writable=(tree, home))
    assert result.exit_code == 0, sink.texts()
    assert sink.texts("stdout")[0].startswith("python ok")


# --------------------------------------------------------------------------- the network


@pytest.fixture
def listener() -> Any:
    """A TCP listener on the host's loopback that the test itself creates."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                accepted.append(conn.recv(64))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.mark.parametrize("network", [True, False])
def test_network_off_means_no_route_to_the_host(
    make_sandbox: Any, workdir: Path, sink: Any, listener: Any, network: bool
) -> None:
    port, accepted = listener
    tree, home, _ = attempt_paths(workdir)
    probe = (
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
        "    s.sendall(b'hello'); s.close(); print('connected')\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
    )
    result = run(
        make_sandbox(workdir),
        [sys.executable, "-c", probe],
        tree,
        sink,
        writable=(tree, home),
        network=network,
    )
    assert result.exit_code == 0, sink.texts()
    out = sink.texts("stdout")[0]
    if network:
        assert out == "connected"
    else:
        assert out.startswith("refused")
        assert accepted == []
    assert make_sandbox(workdir).isolation(network) is (
        IsolationLevel.SANDBOX if network else IsolationLevel.SANDBOX_NO_NETWORK
    )


# --------------------------------------------------------------------------- signals


def _alive_with(token: str) -> list[int]:
    """Host pids whose command line contains ``token`` (a zombie's is empty)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(int(entry))
    return found


def test_sigterm_grace_reaches_the_command_through_the_sandbox(
    make_sandbox: Any, workdir: Path, sink: Any
) -> None:
    tree, home, _ = attempt_paths(workdir)
    script = """
        trap 'echo "got TERM, saving work"; echo partial > partial.txt; exit 0' TERM
        echo started
        while :; do sleep 0.1; done
    """
    result = run(
        make_sandbox(workdir),
        sh(script),
        tree,
        sink,
        writable=(tree, home),
        timeout=2,
        grace=30,
    )
    assert result.timed_out
    # bubblewrap did not die at SIGTERM and cut the grace period short: the command's own
    # handler ran and the command exited by itself (0), long before SIGKILL was due
    assert "got TERM, saving work" in sink.texts("stdout"), sink.texts()
    assert result.exit_code == 0 and result.signal is None
    assert (tree / "partial.txt").read_text() == "partial\n"


SPAWN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
role, token = sys.argv[1], sys.argv[2]
if role == "child":
    subprocess.Popen([sys.executable, __file__, "grandchild", token])
elif role == "main":
    subprocess.Popen([sys.executable, __file__, "child", token])
    subprocess.Popen([sys.executable, __file__, "escaped", token], start_new_session=True)
    print("started", flush=True)
time.sleep(600)
"""


def test_sigkill_ends_the_whole_sandbox_even_processes_that_left_the_group(
    make_sandbox: Any, workdir: Path, sink: Any
) -> None:
    tree, home, _ = attempt_paths(workdir)
    token = f"orchestrator-survivor-{uuid.uuid4().hex}"
    (home / "spawn.py").write_text(SPAWN)
    # A child and a grandchild that ignore SIGTERM, and one that left the process group
    # (setsid); all keep stdout open, so the run only ends once every one of them is gone.
    result = run(
        make_sandbox(workdir),
        [sys.executable, str(home / "spawn.py"), "main", token],
        tree,
        sink,
        writable=(tree, home),
        timeout=3,
        grace=1,
    )
    assert result.timed_out
    assert result.signal == signal.SIGKILL, result
    assert "started" in sink.texts("stdout"), sink.texts()
    assert not any("held open" in line for line in sink.texts()), sink.texts()
    assert _alive_with(token) == []


def test_without_the_sandbox_a_process_that_left_the_group_survives(
    tmp_path: Path, sink: Any
) -> None:
    """The contrast: unconfined, only the group is killed (what the sandbox adds)."""
    token = f"orchestrator-survivor-{uuid.uuid4().hex}"
    (tmp_path / "spawn.py").write_text(SPAWN)
    try:
        result = run(
            None,
            [sys.executable, str(tmp_path / "spawn.py"), "main", token],
            tmp_path,
            sink,
            timeout=3,
            grace=1,
        )
        assert result.timed_out
        survivors = _alive_with(token)
        assert len(survivors) == 1  # the escaped one; child and grandchild died with the group
    finally:
        for pid in _alive_with(token):
            os.kill(pid, signal.SIGKILL)


def test_signal_deaths_are_reported_as_signals(make_sandbox: Any, workdir: Path, sink: Any) -> None:
    tree, home, _ = attempt_paths(workdir)
    result = run(make_sandbox(workdir), sh("kill -SEGV $$"), tree, sink, writable=(tree, home))
    assert result.exit_code is None and result.signal == signal.SIGSEGV
    result = run(make_sandbox(workdir), sh("exit 7"), tree, sink, writable=(tree, home))
    assert result.exit_code == 7 and result.signal is None


def test_a_missing_program_is_a_start_error(make_sandbox: Any, workdir: Path, sink: Any) -> None:
    tree, home, _ = attempt_paths(workdir)
    result = run(make_sandbox(workdir), ["no-such-tool-xyz"], tree, sink, writable=(tree, home))
    assert result.start_error == "no-such-tool-xyz: No such file or directory"


# --------------------------------------------------------------------------- choosing one


def test_no_bubblewrap_refuses_and_names_no_sandbox(tmp_path: Path) -> None:
    environ = {"PATH": os.environ["PATH"], BWRAP_ENV: str(tmp_path / "no-bwrap-here")}
    with pytest.raises(SandboxUnavailable) as exc:
        select_sandbox(True, workdir=tmp_path, environ=environ)
    assert "--no-sandbox" in str(exc.value)
    assert "no-bwrap-here" in str(exc.value)
    assert isinstance(select_sandbox(False, workdir=tmp_path, environ=environ), Unconfined)


def test_a_bubblewrap_that_cannot_start_a_sandbox_refuses_with_its_reason(
    tmp_path: Path,
) -> None:
    # what bwrap prints where user namespaces are disabled, as the probe sees it
    broken = tmp_path / "bwrap"
    broken.write_text(
        "#!/bin/sh\n"
        'case "$1" in --help) echo usage; exit 0;; esac\n'
        "echo 'bwrap: setting up uid map: Permission denied' >&2\n"
        "exit 1\n"
    )
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    environ = {"PATH": os.environ["PATH"], BWRAP_ENV: str(broken)}
    with pytest.raises(SandboxUnavailable) as exc:
        select_sandbox(True, workdir=tmp_path, environ=environ)
    assert "setting up uid map: Permission denied" in str(exc.value)
    assert "--no-sandbox" in str(exc.value)


def test_a_working_bubblewrap_is_chosen(sandbox_tools: Any, tmp_path: Path) -> None:
    chosen = select_sandbox(True, workdir=tmp_path)
    assert isinstance(chosen, Bubblewrap)
    assert chosen.isolation(True) is IsolationLevel.SANDBOX
    assert Unconfined().isolation(True) is IsolationLevel.NONE


# --------------------------------------------------------------------------- setup failures


def vanishing(make_sandbox: Any, failures: int) -> Any:
    """The real sandbox, whose first ``failures`` launches bind a path that is gone by the time
    bubblewrap mounts it: what a pod's network namespace vanishing from /run/netns does."""
    sandbox = make_sandbox()
    launches = []
    real = sandbox.command

    def command(argv: Any, **kw: Any) -> list[str]:
        out = real(argv, **kw)
        launches.append(out)
        if len(launches) <= failures:
            at = out.index(sandbox.tools.bwrap) + 1
            out[at:at] = ["--ro-bind", f"/vanished-{uuid.uuid4().hex}", "/mnt"]
        return out

    sandbox.command = command
    sandbox.launches = launches
    return sandbox


def test_a_sandbox_that_fails_to_set_up_is_launched_again(
    make_sandbox: Any, tmp_path: Path, sink: Any
) -> None:
    sandbox = vanishing(make_sandbox, failures=2)
    result = run(sandbox, sh("echo ran >> count"), tmp_path, sink)
    assert result.exit_code == 0 and result.start_error is None
    assert len(sandbox.launches) == 3
    assert (tmp_path / "count").read_text() == "ran\n"  # the command ran once
    notes = [t for t in sink.texts("stderr") if t.startswith("orchestrator: the sandbox failed")]
    assert notes == [
        "orchestrator: the sandbox failed to set up (launch 1 of 3)",
        "orchestrator: the sandbox failed to set up (launch 2 of 3)",
    ]


def test_a_sandbox_that_never_sets_up_is_a_start_error(
    make_sandbox: Any, tmp_path: Path, sink: Any
) -> None:
    sandbox = vanishing(make_sandbox, failures=5)
    result = run(sandbox, sh("echo ran >> count"), tmp_path, sink)
    assert result.start_error == "the sandbox failed to set up 3 times"
    assert result.exit_code is None and not result.succeeded
    assert len(sandbox.launches) == 3
    assert not (tmp_path / "count").exists()


def test_the_command_failing_on_its_own_is_not_launched_again(
    make_sandbox: Any, tmp_path: Path, sink: Any
) -> None:
    sandbox = vanishing(make_sandbox, failures=0)
    result = run(sandbox, sh("echo ran >> count; echo 'bwrap: fake' >&2; exit 1"), tmp_path, sink)
    assert result.exit_code == 1 and result.start_error is None
    assert len(sandbox.launches) == 1
    assert (tmp_path / "count").read_text() == "ran\n"

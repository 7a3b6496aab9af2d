"""Faults a chaos run injects outside the operator: the local cluster's kube-apiserver and a
PostgreSQL of our own.

The kube-apiserver restart is targeted: ``hack/cluster/up`` on a cluster with a dead component
runs ``down`` and starts everything afresh (every pod and namespace gone), so instead the
running apiserver's own command line is read from ``/proc/<pid>/cmdline`` (the pid from
``$STATE_DIR/pids/kube-apiserver.pid``), the process is stopped and the same command is started
again the way ``up`` starts it (own session, appending to its log, its pid written back), and
then waited on until ``/readyz`` answers. etcd keeps the state; every client reconnects.

The kube-apiserver and the PostgreSQL of hack/postgres/up (127.0.0.1:25432) are shared with
every other test session on the machine: restart the apiserver only when nobody else runs e2e tests, and stop
only a PostgreSQL started for the run (``Postgres`` with its own data dir and port).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("ORCHESTRATOR_CLUSTER_STATE", "/var/lib/orchestrator-cluster"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


@dataclass(frozen=True)
class Restart:
    old_pid: int
    new_pid: int
    down_seconds: float  # from the stop signal until /readyz answered again


def restart_apiserver(kubectl_bin: str, kubeconfig: str, *, ready_timeout: float = 120) -> Restart:
    """Stop the local cluster's kube-apiserver (SIGTERM) and start it again, same command."""
    pidfile = STATE_DIR / "pids" / "kube-apiserver.pid"
    pid = int(pidfile.read_text().strip())
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    if not argv or not argv[0].endswith("kube-apiserver"):
        raise RuntimeError(f"pid {pid} from {pidfile} is not a kube-apiserver: {argv[:1]}")
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, 60):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 30)
    with open(STATE_DIR / "logs" / "kube-apiserver.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pidfile.write_text(f"{proc.pid}\n")
    end = time.monotonic() + ready_timeout
    while time.monotonic() < end:
        ready = subprocess.run(
            [
                kubectl_bin,
                "--kubeconfig",
                kubeconfig,
                "get",
                "--raw",
                "/readyz",
                "--request-timeout=5s",
            ],
            capture_output=True,
            text=True,
        )
        if ready.returncode == 0:
            return Restart(pid, proc.pid, round(time.monotonic() - started, 2))
        if proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited ({proc.returncode}) after the restart")
        time.sleep(0.5)
    raise RuntimeError(f"kube-apiserver not ready {ready_timeout:.0f}s after the restart")


class Postgres:
    """A PostgreSQL of the run's own (``hack/postgres/up`` with another data dir and port)."""

    def __init__(self, state: Path, port: int) -> None:
        self.state = state
        self.port = port
        self.env = {**os.environ, "PGSTATE": str(state), "ORCHESTRATOR_PG_PORT": str(port)}

    def up(self) -> str:
        out = subprocess.run(
            [str(ROOT / "hack/postgres/up")],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"hack/postgres/up failed: {out.stderr[-2000:]}")
        return out.stdout.strip().splitlines()[-1]

    def down(self) -> None:
        out = subprocess.run(
            [str(ROOT / "hack/postgres/down")],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"hack/postgres/down failed: {out.stderr[-2000:]}")


def others_running_e2e() -> list[str]:
    """Command lines of other pytest processes running e2e tests (not this process's tree)."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "pytest" in cmd and "e2e" in cmd and "chaos" not in cmd:
            found.append(f"{proc.name}: {cmd.strip()[:200]}")
    return found

#!/usr/bin/env python
"""Embedded-engine overhead per task, against the bare cost of the same work (issue 2, issue 7.1).

For each size N (``--tasks 10 100 1000``) and database (``--db sqlite postgres``):

1. build a phase-4 work dir: a real small git repository and N trivial tasks routed to a
   ``process`` adapter whose command is ``true``, gated by one check that is ``true`` too
   (``allow_empty_diff: true``, so every task takes the success path);
2. **limit** (bare): do what an isolated attempt physically needs, with nothing else, N times:
   ``git worktree add --detach`` on a bare mirror, fork/exec ``true`` in it, a second worktree
   for the gate, fork/exec ``true`` there, remove both worktrees. Measured before *and* after
   the engine run (the machine may be shared; the mean of both rounds is the limit);
3. **engine**: ``build_executor(...).run()`` in-process, timed around ``run()``.

overhead/task = engine wall/N - bare wall/N. The user+system CPU of this process and of its
children is recorded beside it (engine vs bare): on a shared machine it moves much less than
wall time. Latency percentiles come from the per-attempt
``started_at``/``finished_at`` in ``.state/execution_results.json`` (the attempt inside the
backend) and from the gaps between consecutive ``finished_at`` (the full cycle per task,
including the database and ledger writes that follow the attempt).

``--profile`` adds, per database, (a) one engine run with perf_counter timers wrapped around
its entry points (git, commands, each Store method, breaker loads, ledger, logs): the
unprofiled breakdown of the wall time, exclusive per group, with calls per task; and (b) one
run under cProfile (default; exact call counts, self time, a breakdown by category: child
processes, fsync, SQLite, SQLAlchemy, pydantic, JSON, engine code) and/or pyinstrument
(``--profiler pyinstrument|both``; sampled, its call tree written beside the JSON).
Profilers inflate call-heavy Python (SQLAlchemy) several times over: read shares and call
counts from them, milliseconds from the timers.

Run: ``.venv/bin/python bench/engine_overhead.py --tasks 200 --db sqlite --profile``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import importlib
import json
import os
import platform
import pstats
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from core.db.database import default_url, upgrade  # noqa: E402
from core.engine.executor import ExecutorConfig, build_executor  # noqa: E402
from core.engine.monitoring.metrics import Metrics  # noqa: E402
from core.engine.monitoring.progress import SilentProgress  # noqa: E402
from core.engine.sandbox import Confinement, select_sandbox  # noqa: E402
from core.engine.workspace import GIT_ENV  # noqa: E402

SCHEMA_VERSION = 2
RUN_ID = "bench"
ADAPTER_ARGV = ["true"]
GATE_ARGV = ["true"]
#: Issue 2's target: overhead per task under 50 ms on SQLite.
TARGET_OVERHEAD_MS = 50.0
#: Issue 17's target: overhead per task at most 30% of the bare limit of the same run.
TARGET_OVERHEAD_SHARE = 0.30


# --------------------------------------------------------------------------- the work dir


def _git(*args: str, cwd: Path) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV}
    return subprocess.run(
        ["git", "-c", "core.quotepath=off", *args],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def make_repo(path: Path) -> str:
    """A small real repository (a few files, one commit); returns the commit."""
    path.mkdir(parents=True)
    _git("init", "-q", "-b", "main", cwd=path)
    (path / "README.md").write_text("benchmark repository\n")
    (path / "src").mkdir()
    for i in range(5):
        (path / "src" / f"mod{i}.py").write_text(f"VALUE = {i}\n")
    _git("add", "-A", cwd=path)
    _git("commit", "-q", "-m", "base", cwd=path)
    return _git("rev-parse", "HEAD", cwd=path)


def make_workdir(root: Path, n: int) -> tuple[Path, str]:
    """A phase-4 work dir with ``n`` trivial tasks; returns (workdir, base commit)."""
    root.mkdir(parents=True, exist_ok=True)
    base = make_repo(root / "repo")
    adapter = {
        "id": "true",
        "kind": "process",
        "command": ADAPTER_ARGV,
        "timeout_seconds": 120,
        "gate": [{"name": "noop", "command": GATE_ARGV, "timeout_seconds": 60}],
    }
    tasks = [
        {
            "task_id": f"t{i:05d}",
            "prompt": "do nothing",
            "repo": "repo",
            "base_commit": base,
            "allow_empty_diff": True,
        }
        for i in range(n)
    ]
    decisions = [
        {"task_id": t["task_id"], "adapter_id": "true", "fallback_adapter_ids": []} for t in tasks
    ]
    state = root / ".state"
    state.mkdir()
    (state / "task_queue.json").write_text(json.dumps({"run_id": RUN_ID, "tasks": tasks}))
    (state / "routing_decisions.json").write_text(
        json.dumps({"run_id": RUN_ID, "adapters": [adapter], "decisions": decisions})
    )
    (state / "ROUTING_COMPLETE").write_text(
        json.dumps({"run_id": RUN_ID, "completed_at": datetime.now(UTC).isoformat()})
    )
    return root, base


# --------------------------------------------------------------------------- the limit


def cpu_now() -> tuple[float, float]:
    """(this process, its waited-for children): user + system CPU seconds so far.

    CPU time barely moves when other work competes for the cores, unlike wall time, so it is
    recorded beside the wall numbers as a load-insensitive view of the same comparison.
    """
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def cpu_since(start: tuple[float, float]) -> dict[str, float]:
    me, kids = cpu_now()
    return {"self_s": me - start[0], "children_s": kids - start[1]}


def _spawn(argv: list[str], cwd: Path) -> None:
    """fork/exec one command the way the engine does (own session, piped output), and wait."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        start_new_session=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bare command {argv} failed with {proc.returncode}")


def bare_round(
    scratch: Path, repo: Path, commit: str, n: int, sandbox: Any = None
) -> dict[str, Any]:
    """The physical minimum of N isolated attempts: worktrees + fork/exec, nothing else.

    ``sandbox`` (a :class:`core.engine.sandbox.Bubblewrap`): each command is started in it, as
    the engine does (bubblewrap's own argv, the tree writable), so the limit includes what
    the namespaces cost and the overhead stays the engine's own.
    """

    def wrapped(argv: list[str], tree: Path) -> list[str]:
        if sandbox is None:
            return argv
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
        return list(sandbox.command(argv, cwd=tree, env=env, confinement=Confinement((tree,))))

    mirror = scratch / "bare-mirror.git"
    t0 = time.perf_counter()
    if not mirror.exists():
        _git("clone", "--bare", "--quiet", str(repo), str(mirror), cwd=scratch)
    mirror_s = time.perf_counter() - t0
    per_task: list[float] = []
    cpu = cpu_now()
    started = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        adir = scratch / "attempts" / f"t{i:05d}"
        tree, gate = adir / "tree", adir / "gate"
        _git("worktree", "add", "--detach", "--quiet", str(tree), commit, cwd=mirror)
        _spawn(wrapped(ADAPTER_ARGV, tree), tree)
        _git("worktree", "add", "--detach", "--quiet", str(gate), commit, cwd=mirror)
        _spawn(wrapped(GATE_ARGV, gate), gate)
        _git("worktree", "remove", "--force", str(gate), cwd=mirror)
        _git("worktree", "remove", "--force", str(tree), cwd=mirror)
        shutil.rmtree(adir, ignore_errors=True)
        per_task.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "cpu": cpu_since(cpu),
        "mirror_clone_s": mirror_s,
        "per_task_s": per_task,
    }


# --------------------------------------------------------------------------- databases


@contextlib.contextmanager
def database(db: str, workdir: Path, server_url: str | None) -> Iterator[str]:
    """A fresh, migrated database: the work dir's SQLite file, or a new PostgreSQL database."""
    if db == "sqlite":
        url = default_url(workdir)
        upgrade(url)
        yield url
        return
    from sqlalchemy import create_engine, text

    assert server_url is not None
    name = f"orch_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_psycopg(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{server_url.rsplit('/', 1)[0]}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _psycopg(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def postgres_server_url() -> str:
    url = os.environ.get("ORCHESTRATOR_TEST_POSTGRES_URL")
    if url:
        return url
    return subprocess.run(
        [str(ROOT / "hack/postgres/up")], check=True, capture_output=True, text=True
    ).stdout.strip()


def postgres_info(server_url: str) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(_psycopg(server_url))
    try:
        with engine.connect() as conn:
            return {
                name: conn.execute(text(f"SHOW {name}")).scalar()
                for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
            }
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- observation


class Observed:
    """What the engine did, through public hooks only: every child process (the interpreter's
    ``subprocess.Popen`` audit event: git, the adapter, the gate check) and every database
    statement, commit and connection checkout (SQLAlchemy engine and pool events)."""

    #: The instance counting now (audit hooks cannot be removed, so one hook is switched).
    active: Observed | None = None
    _hooked = False

    def __init__(self) -> None:
        self.processes: dict[str, int] = {}
        self.statements = self.commits = self.checkouts = 0

    @classmethod
    def _audit(cls, event: str, args: tuple[Any, ...]) -> None:
        me = cls.active
        if me is None or event != "subprocess.Popen":
            return
        argv = [str(a) for a in (args[1] or [args[0]])]
        name = Path(argv[0]).name
        if name == "git":  # git -c core.quotepath=off <subcommand> ...
            rest = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
            name = f"git {rest[0] if rest else ''}".strip()
            if name == "git worktree" and len(rest) > 1:
                name = f"git worktree {rest[1]}"
        me.processes[name] = me.processes.get(name, 0) + 1

    @classmethod
    def install(cls) -> None:
        """Audit hooks cannot be removed: one for the process, switched by ``active``."""
        if not cls._hooked:
            sys.addaudithook(cls._audit)
            cls._hooked = True

    @contextlib.contextmanager
    def watching(self, engine: Any) -> Iterator[Observed]:
        from sqlalchemy import event

        def statement(*_: Any) -> None:
            self.statements += 1

        def commit(*_: Any) -> None:
            self.commits += 1

        def checkout(*_: Any) -> None:
            self.checkouts += 1

        Observed.install()
        listeners = [
            (engine, "before_cursor_execute", statement),
            (engine, "commit", commit),
            (engine.pool, "checkout", checkout),
        ]
        for target, name, fn in listeners:
            event.listen(target, name, fn)
        Observed.active = self
        try:
            yield self
        finally:
            Observed.active = None
            for target, name, fn in listeners:
                event.remove(target, name, fn)

    def per_task(self, n: int) -> dict[str, Any]:
        git = sum(c for p, c in self.processes.items() if p.startswith("git"))
        return {
            "processes": {p: round(c / n, 2) for p, c in sorted(self.processes.items())},
            "git_processes": round(git / n, 2),
            "child_processes": round(sum(self.processes.values()) / n, 2),
            "db_statements": round(self.statements / n, 2),
            "db_commits": round(self.commits / n, 2),
            "db_checkouts": round(self.checkouts / n, 2),
        }


# --------------------------------------------------------------------------- the engine


def engine_round(
    workdir: Path,
    url: str,
    n: int,
    wrap: Callable[[Callable[[], Any]], Any] | None = None,
    *,
    sandbox: bool = True,
) -> dict[str, Any]:
    """One ``executor.run()`` of the work dir; ``sandbox``: adapters and checks in bubblewrap
    (the default, as ``orchestrator execute`` runs them) or unconfined (``--no-sandbox``)."""
    config = ExecutorConfig(run_id=RUN_ID, workdir=workdir, database_url=url, sandbox=sandbox)
    t0 = time.perf_counter()
    executor = build_executor(config, progress=SilentProgress(), metrics=Metrics())
    build_s = time.perf_counter() - t0
    run_started = datetime.now(UTC)
    observed = Observed()
    with observed.watching(executor.store.engine):
        cpu = cpu_now()
        t1 = time.perf_counter()
        results = wrap(executor.run) if wrap else executor.run()
        wall = time.perf_counter() - t1
        cpu_used = cpu_since(cpu)
    executor.store.engine.dispose()
    states = {t.state.value for t in results.tasks}
    attempts = {len(t.attempts) for t in results.tasks}
    if len(results.tasks) != n or states != {"COMPLETED"} or attempts != {1}:
        raise SystemExit(
            f"benchmark run did not take the success path: {len(results.tasks)} tasks, "
            f"states {sorted(states)}, attempts {sorted(attempts)}; see {workdir}/logs"
        )
    # latencies from the file the engine wrote (not from our own clock)
    written = json.loads((workdir / ".state" / "execution_results.json").read_text())
    spans = []
    for task in written["tasks"]:
        a = task["attempts"][0]
        spans.append((_ts(a["started_at"]), _ts(a["finished_at"])))
    spans.sort(key=lambda s: s[1])
    attempt_s = [f - s for s, f in spans]
    cycle_s, prev = [], run_started
    for _, finished in spans:
        cycle_s.append((finished - prev).total_seconds())
        prev = finished
    return {
        "build_executor_s": build_s,
        "wall_s": wall,
        "cpu": cpu_used,
        "attempt_latency_s": [d.total_seconds() for d in attempt_s],
        "cycle_s": cycle_s,
        "summary": written["summary"],
        "per_task": observed.per_task(n),
    }


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- one size


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported value was really observed)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _dist_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": _ms(pct(values, 50)),
        "p95_ms": _ms(pct(values, 95)),
        "max_ms": _ms(max(values)),
        "mean_ms": _ms(statistics.fmean(values)),
    }


def measure(
    db: str, n: int, scratch: Path, server_url: str | None, *, sandbox: bool = True
) -> dict[str, Any]:
    root = scratch / f"{db}-{n}-{uuid.uuid4().hex[:6]}"
    workdir, commit = make_workdir(root / "workdir", n)
    bare_dir = root / "bare"
    bare_dir.mkdir()
    load_before = os.getloadavg()
    box = select_sandbox(True, workdir=bare_dir) if sandbox else None
    bare_before = bare_round(bare_dir, workdir / "repo", commit, n, box)
    with database(db, workdir, server_url) as url:
        engine = engine_round(workdir, url, n, sandbox=sandbox)
    bare_after = bare_round(bare_dir, workdir / "repo", commit, n, box)
    load_after = os.getloadavg()
    shutil.rmtree(root, ignore_errors=True)

    bare_task_s = (bare_before["wall_s"] + bare_after["wall_s"]) / (2 * n)
    # the engine's first attempt also clones the bare mirror: charge the limit the same
    bare_task_s += bare_before["mirror_clone_s"] / n
    wall_task_s = engine["wall_s"] / n
    overhead_s = wall_task_s - bare_task_s

    def cpu_ms(cpu: dict[str, float], count: int) -> dict[str, float]:
        return {
            "self_per_task_ms": _ms(cpu["self_s"] / count),
            "children_per_task_ms": _ms(cpu["children_s"] / count),
            "total_per_task_ms": _ms((cpu["self_s"] + cpu["children_s"]) / count),
        }

    engine_cpu = cpu_ms(engine["cpu"], n)
    bare_cpu = cpu_ms(
        {k: bare_before["cpu"][k] + bare_after["cpu"][k] for k in ("self_s", "children_s")},
        2 * n,
    )
    return {
        "db": db,
        "tasks": n,
        "sandbox": sandbox,
        "engine": {
            "wall_s": round(engine["wall_s"], 4),
            "wall_per_task_ms": _ms(wall_task_s),
            "build_executor_ms": _ms(engine["build_executor_s"]),
            "attempt_latency": _dist_ms(engine["attempt_latency_s"]),
            "cycle": _dist_ms(engine["cycle_s"]),
            "summary": engine["summary"],
            "cpu": engine_cpu,
            "per_task": engine["per_task"],
        },
        "bare": {
            "per_task_ms": _ms(bare_task_s),
            "rounds": [
                {
                    "wall_s": round(r["wall_s"], 4),
                    "per_task_ms": _ms(r["wall_s"] / n),
                    **_dist_ms(r["per_task_s"]),
                }
                for r in (bare_before, bare_after)
            ],
            "mirror_clone_ms": _ms(bare_before["mirror_clone_s"]),
            "cpu": bare_cpu,
            "what": "git worktree add --detach x2 + fork/exec `true` x2 + git worktree remove x2"
            + (" (each `true` in the sandbox: bubblewrap, tree writable)" if sandbox else ""),
        },
        "overhead_per_task_ms": _ms(overhead_s),
        "overhead_ratio": round(wall_task_s / bare_task_s, 3),
        #: issue 17: overhead as a share of the bare limit of the same run (target <= 0.30)
        "overhead_share_of_bare": round(overhead_s / bare_task_s, 3),
        "target_share_of_bare": TARGET_OVERHEAD_SHARE,
        "meets_share_target": overhead_s <= TARGET_OVERHEAD_SHARE * bare_task_s,
        "cpu_overhead_per_task_ms": round(
            engine_cpu["total_per_task_ms"] - bare_cpu["total_per_task_ms"], 2
        ),
        "target_ms": TARGET_OVERHEAD_MS,
        "meets_target": overhead_s * 1000 < TARGET_OVERHEAD_MS,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


def median_run(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median overhead, plus a one-line record of every repeat."""
    ordered = sorted(tries, key=lambda r: r["overhead_per_task_ms"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats"] = [
        {
            "wall_per_task_ms": r["engine"]["wall_per_task_ms"],
            "bare_per_task_ms": r["bare"]["per_task_ms"],
            "overhead_per_task_ms": r["overhead_per_task_ms"],
            "overhead_share_of_bare": r["overhead_share_of_bare"],
            "cpu_overhead_per_task_ms": r["cpu_overhead_per_task_ms"],
            "loadavg_before": r["loadavg_before"],
            "loadavg_after": r["loadavg_after"],
        }
        for r in tries
    ]
    return chosen


# --------------------------------------------------------------------------- profiling

#: Engine operations reported by cumulative time and calls per task: (file suffix, function).
OPERATIONS: list[tuple[str, str, str]] = [
    ("core/engine/process_spawner.py", "run_adapter", "backend adapter step (below)"),
    ("core/engine/process_spawner.py", "run_gate", "backend gate step (below)"),
    ("core/engine/workspace.py", "git", "git subprocesses (all)"),
    ("core/engine/workspace.py", "ensure_mirror", "  ensure_mirror (first attempt per commit)"),
    ("core/engine/workspace.py", "add_worktree", "  checkout (tree + private repository)"),
    ("core/engine/janitor.py", "discard", "  attempt dir + gate checkout to the trash (renames)"),
    ("core/engine/workspace.py", "capture_diff", "  capture_diff (git add [+ diff + file list])"),
    ("core/engine/tree_guard.py", "changed", "  tamper guard after each check"),
    ("core/engine/process_group.py", "run_process_group", "adapter + gate commands"),
    ("core/engine/test_gate.py", "run_gate", "test gate (checkout + checks)"),
    ("core/engine/test_gate.py", "run_checks", "  gate checks (incl. temp HOME)"),
    ("core/engine/recorder.py", "record", "record attempt (ledger + DB + events)"),
    ("core/engine/patch_ledger.py", "append", "  ledger append"),
    ("core/db/store.py", "finish_attempt", "  Store.finish_attempt"),
    ("core/db/store.py", "begin_attempt", "Store.begin_attempt"),
    ("core/db/store.py", "set_process", "Store.set_process"),
    ("core/db/store.py", "set_validating", "Store.set_validating"),
    ("core/db/store.py", "task", "Store.task (read + pydantic)"),
    ("core/db/store.py", "_session", "Store transactions (calls = 2 x sessions)"),
    ("core/db/breaker_rows.py", "load", "breaker load"),
    ("core/db/breaker_rows.py", "compare_and_set", "breaker compare-and-set"),
    ("core/engine/events.py", "write", "executor.jsonl writes"),
    ("core/engine/task_log.py", "_write", "task log records"),
    ("core/engine/recorder.py", "write", "resilience.jsonl writes"),
    ("core/engine/executor.py", "write_results", "execution_results.json (once)"),
    ("core/db/store.py", "sync_inputs", "sync_inputs (once)"),
    ("~", "<built-in method posix.fsync>", "os.fsync"),
    ("~", "<method 'commit' of 'sqlite3.Connection' objects>", "sqlite3 COMMIT"),
    ("~", "<built-in method _posixsubprocess.fork_exec>", "fork_exec"),
]

#: Hot functions whose callers are listed (who makes the git calls and DB round trips).
CALLERS_OF: list[tuple[str, str]] = [
    ("core/engine/workspace.py", "git"),
    ("core/db/breaker_rows.py", "load"),
    ("core/engine/resilience/breaker_store.py", "view"),
    ("core/engine/resilience/breaker_store.py", "admits"),
    ("core/db/store.py", "task"),
]

CATEGORIES: list[tuple[str, Callable[[str, str], bool]]] = [
    ("fsync", lambda f, fn: "fsync" in fn),
    (
        "child processes: fork/exec, wait, pipes",
        lambda f, fn: (
            "subprocess" in f
            or "selectors" in f
            or any(
                k in fn
                for k in ("fork_exec", "waitpid", "posix.read", "select.", "pidfd", "posix.close")
            )
        ),
    ),
    ("SQLite (C: execute/commit)", lambda f, fn: "sqlite3" in fn),
    ("PostgreSQL driver (psycopg)", lambda f, fn: "psycopg" in f or "psycopg" in fn),
    ("SQLAlchemy (Python)", lambda f, fn: "sqlalchemy" in f),
    ("pydantic", lambda f, fn: "pydantic" in f or "pydantic" in fn),
    ("json", lambda f, fn: "/json/" in f or "json" in fn),
    ("file I/O (open/write/stat/mkdir/rmtree)", lambda f, fn: _is_file_io(f, fn)),
    ("engine code (core/)", lambda f, fn: "/core/" in f),
]


def _is_file_io(file: str, fn: str) -> bool:
    if file.endswith(("pathlib.py", "shutil.py", "tempfile.py", "os.py")):
        return True
    keys = ("io.open", "posix.", "write' of", "flush' of", "_io.", "method 'read")
    return file == "~" and any(k in fn for k in keys)


def _label(key: tuple[str, int, str]) -> str:
    file, line, fn = key
    if file == "~":
        return fn
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    else:
        with contextlib.suppress(ValueError):
            file = str(Path(file).relative_to(ROOT))
    return f"{file}:{line}({fn})"


def cprofile_report(prof: cProfile.Profile, n: int, wall: float, top: int) -> dict[str, Any]:
    raw = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total_self = sum(v[2] for v in raw.values())
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)
    top_self = [
        {
            "function": _label(key),
            "calls": nc,
            "calls_per_task": round(nc / n, 2),
            "self_ms_per_task": _ms(tt / n),
            "cum_ms_per_task": _ms(ct / n),
            "self_share": round(tt / total_self, 4),
        }
        for key, (_cc, nc, tt, ct, _callers) in rows[:top]
    ]
    operations = []
    for suffix, fn, what in OPERATIONS:
        calls = cum = 0.0
        for (file, _line, name), (_cc, nc, _tt, ct, _callers) in raw.items():
            if name == fn and (file.endswith(suffix) or (suffix == "~" and file == "~")):
                calls += nc
                cum += ct
        operations.append(
            {
                "operation": what,
                "function": fn if suffix == "~" else f"{suffix}:{fn}",
                "calls_per_task": round(calls / n, 2),
                "cum_ms_per_task": _ms(cum / n),
            }
        )
    callers = []
    for suffix, fn in CALLERS_OF:
        for (file, _line, name), (_cc, _nc, _tt, _ct, by) in raw.items():
            if name != fn or not file.endswith(suffix):
                continue
            for ckey, cval in sorted(by.items(), key=lambda kv: kv[1][0], reverse=True):
                callers.append(
                    {
                        "function": f"{suffix}:{fn}",
                        "caller": _label(ckey),
                        "calls_per_task": round(cval[0] / n, 2),
                        "cum_ms_per_task": _ms(cval[3] / n),
                    }
                )
    categories: dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        cat = next((c for c, test in CATEGORIES if test(file, name)), "other Python")
        categories[cat] = categories.get(cat, 0.0) + tt
    return {
        "profiler": "cProfile",
        "profiled_wall_s": round(wall, 3),
        "profiled_wall_per_task_ms": _ms(wall / n),
        "top_self": top_self,
        "operations": operations,
        "callers": callers,
        "self_time_by_category": [
            {"category": c, "ms_per_task": _ms(t / n), "share": round(t / total_self, 4)}
            for c, t in sorted(categories.items(), key=lambda kv: kv[1], reverse=True)
        ],
    }


#: Inclusive-time groups read off the pyinstrument call tree: (label, test(file, function)).
TREE_GROUPS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("git subprocesses (workspace.git)", lambda f, fn: f.endswith("workspace.py") and fn == "git"),
    (
        "adapter + gate commands (run_process_group)",
        lambda f, fn: f.endswith("process_group.py") and fn == "run_process_group",
    ),
    ("database (core/db: Store + breaker store)", lambda f, fn: "/core/db/" in f),
    ("  of which SQLAlchemy Python", lambda f, fn: "/sqlalchemy/" in f),
    ("ledger append (fsync)", lambda f, fn: f.endswith("patch_ledger.py") and fn == "append"),
    ("event + task logs", lambda f, fn: f.endswith(("events.py", "task_log.py"))),
    ("state files (atomic JSON writes)", lambda f, fn: f.endswith("state_files.py")),
    ("pydantic", lambda f, fn: "/pydantic" in f),
    ("attempt dir housekeeping (mkdir/rmtree/tempdir)", lambda f, fn: _housekeeping(f, fn)),
]


def _housekeeping(file: str, fn: str) -> bool:
    if file.endswith(("shutil.py", "tempfile.py")):
        return True
    return file.endswith("process_spawner.py") and fn == "_remove_attempt_dir"


def pyinstrument_report(profiler: Any, n: int, wall: float, top: int) -> dict[str, Any]:
    """Self time per function, summed over the call tree of a pyinstrument session."""
    root = profiler.last_session.root_frame()
    own: dict[str, float] = {}

    def walk(frame: Any) -> None:
        child_time = sum(c.time for c in frame.children)
        if frame.is_synthetic_leaf:  # "[self]" / "[await]" leaves: time of the parent
            key = frame.parent.function if frame.parent else frame.function
            label = f"{frame.parent.file_path_short if frame.parent else ''}({key})"
        else:
            label = f"{frame.file_path_short}:{frame.line_no}({frame.function})"
        own[label] = own.get(label, 0.0) + max(frame.time - child_time, 0.0)
        for c in frame.children:
            walk(c)

    walk(root)
    total = sum(own.values()) or 1.0
    rows = sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:top]

    # inclusive time of each group's outermost frames (groups may nest in one another)
    grouped: dict[str, float] = dict.fromkeys((g for g, _ in TREE_GROUPS), 0.0)

    def inclusive(frame: Any, inside: frozenset[str]) -> None:
        path = frame.file_path or ""
        hits = {g for g, test in TREE_GROUPS if g not in inside and test(path, frame.function)}
        for g in hits:
            grouped[g] += frame.time
        for c in frame.children:
            inclusive(c, inside | hits)

    inclusive(root, frozenset())
    return {
        "profiler": "pyinstrument",
        "groups": [
            {"group": g, "ms_per_task": _ms(t / n), "share_of_wall": round(t / wall, 4)}
            for g, t in grouped.items()
        ],
        "profiled_wall_s": round(wall, 3),
        "profiled_wall_per_task_ms": _ms(wall / n),
        "top_self": [
            {"function": k, "self_ms_per_task": _ms(v / n), "self_share": round(v / total, 4)}
            for k, v in rows
        ],
        "text": profiler.output_text(unicode=False, color=False, show_all=False),
    }


#: Engine entry points timed by wrappers in the instrumented run: (group, module, attribute,
#: modules that imported the function by name). Time is exclusive: a timed call nested in
#: another (the DB write of the process-group id inside run_process_group) is charged to
#: itself, not to its caller, so the groups add up to at most the wall time.
TIMED: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("git subprocesses", "core.engine.workspace", "git", ()),
    ("git subprocesses", "core.engine.workspace", "_spool", ()),
    (
        "adapter + gate commands",
        "core.engine.process_group",
        "run_process_group",
        ("core.engine.adapters", "core.engine.test_gate"),
    ),
    *(
        ("database: Store", "core.db.store", f"Store.{m}", ())
        for m in (
            "sync_inputs",
            "task",
            "tasks",
            "events",
            "mirrored_seqs",
            "begin_attempt",
            "set_process",
            "set_validating",
            "set_waiting",
            "finish_attempt",
            "end_task",
            "sync_adapters",
            "sync_tasks",
            "run_event",
        )
    ),
    ("database: breakers", "core.db.breaker_rows", "SqlBreakerRows.load", ()),
    ("database: breakers", "core.db.breaker_rows", "SqlBreakerRows.compare_and_set", ()),
    ("ledger append (fsync)", "core.engine.patch_ledger", "PatchLedger.append", ()),
    ("executor.jsonl", "core.engine.events", "EventLog.write", ()),
    ("task log (logs/execution)", "core.engine.task_log", "TaskLog.__init__", ()),
    ("task log (logs/execution)", "core.engine.task_log", "TaskLog.emit", ()),
    ("task log (logs/execution)", "core.engine.task_log", "TaskLog.close", ()),
    ("evidence store (full diffs)", "core.engine.evidence", "LocalEvidenceStore.put_file", ()),
    ("execution_results.json", "core.engine.state_files", "write_model", ("core.engine.executor",)),
    (
        "attempt dir housekeeping",
        "core.engine.process_spawner",
        "LocalBackend._remove_attempt_dir",
        (),
    ),
    # the renames into the trash on the attempt's path (the deletion is a thread's)
    ("attempt dir housekeeping", "core.engine.janitor", "Janitor.discard", ()),
]


@contextlib.contextmanager
def timed_entry_points() -> Iterator[dict[str, list[float]]]:
    """Wrap the TIMED functions with perf_counter timers (about a microsecond per call)."""
    totals: dict[str, list[float]] = {}
    stack: list[list[float]] = []
    main = threading.get_ident()
    undo: list[tuple[Any, str, Any]] = []

    def timer(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != main:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            stack.append([0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                (nested,) = stack.pop()
                took = time.perf_counter() - start
                row = totals.setdefault(label, [0.0, 0.0])
                row[0] += took - nested
                row[1] += 1
                if stack:
                    stack[-1][0] += took

        return timed

    try:
        for group, module_name, attr, importers in TIMED:
            module = importlib.import_module(module_name)
            owner, name = module, attr
            if "." in attr:
                cls, name = attr.split(".", 1)
                owner = getattr(module, cls)
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            wrapped = timer(f"{group}|{attr}", original)
            for target in (owner, *(importlib.import_module(m) for m in importers)):
                if isinstance(target, type) or getattr(target, name, None) is original:
                    undo.append((target, name, target.__dict__[name]))
                    setattr(target, name, wrapped)
        yield totals
    finally:
        for target, name, original in reversed(undo):
            setattr(target, name, original)


def instrumented(
    db: str, n: int, scratch: Path, server_url: str | None, *, sandbox: bool = True
) -> dict[str, Any]:
    """One engine run with timers on its entry points: where the wall time goes, unprofiled."""
    root = scratch / f"timed-{db}-{n}-{uuid.uuid4().hex[:6]}"
    workdir, _ = make_workdir(root / "workdir", n)
    with database(db, workdir, server_url) as url, timed_entry_points() as totals:
        result = engine_round(workdir, url, n, sandbox=sandbox)
    shutil.rmtree(root, ignore_errors=True)
    wall = result["wall_s"]
    groups: dict[str, float] = {}
    functions = []
    for key, (spent, calls) in sorted(totals.items(), key=lambda kv: kv[1][0], reverse=True):
        group, attr = key.split("|", 1)
        groups[group] = groups.get(group, 0.0) + spent
        functions.append(
            {
                "group": group,
                "function": attr,
                "calls_per_task": round(calls / n, 2),
                "exclusive_ms_per_task": _ms(spent / n),
            }
        )
    rest = wall - sum(groups.values())
    return {
        "db": db,
        "tasks": n,
        "wall_per_task_ms": _ms(wall / n),
        "groups": [
            {"group": g, "ms_per_task": _ms(t / n), "share_of_wall": round(t / wall, 4)}
            for g, t in sorted(groups.items(), key=lambda kv: kv[1], reverse=True)
        ]
        + [
            {
                "group": "rest: engine Python between the timed calls",
                "ms_per_task": _ms(rest / n),
                "share_of_wall": round(rest / wall, 4),
            }
        ],
        "functions": functions,
    }


def profile_summary(report: dict[str, Any]) -> list[str]:
    """A few lines saying where the time goes (from the cProfile report)."""
    ops = {o["function"]: o for o in report["operations"]}
    cats = report["self_time_by_category"]

    def op(fn: str) -> dict[str, Any]:
        return ops.get(fn, {"calls_per_task": 0.0, "cum_ms_per_task": 0.0})

    git = op("core/engine/workspace.py:git")
    procs = op("core/engine/process_group.py:run_process_group")
    db_ops = [
        "core/db/store.py:begin_attempt",
        "core/db/store.py:set_process",
        "core/db/store.py:set_validating",
        "core/db/store.py:finish_attempt",
        "core/db/store.py:task",
        "core/db/breaker_rows.py:load",
        "core/db/breaker_rows.py:compare_and_set",
    ]
    db_ms = sum(op(f)["cum_ms_per_task"] for f in db_ops)
    db_calls = sum(op(f)["calls_per_task"] for f in db_ops)
    fsync = op("<built-in method posix.fsync>")
    lines = [
        f"profiled wall {report['profiled_wall_per_task_ms']} ms/task "
        f"({report['profiler']} inflates Python-heavy parts; compare shares, not absolutes)",
        f"git subprocesses: {git['calls_per_task']} per task, {git['cum_ms_per_task']} ms/task "
        "(the limit needs 4: worktree add + remove, twice)",
        f"adapter + gate commands: {procs['calls_per_task']} per task, "
        f"{procs['cum_ms_per_task']} ms/task (incl. the DB write of the process-group id)",
        f"database round trips: {db_calls:.0f} per task (Store methods + breaker loads), "
        f"{db_ms:.2f} ms/task",
        f"fsync: {fsync['calls_per_task']} per task, {fsync['cum_ms_per_task']} ms/task",
        "self time by category: "
        + ", ".join(f"{c['category']} {c['ms_per_task']} ms" for c in cats[:6]),
    ]
    return lines


def profile(
    db: str,
    n: int,
    scratch: Path,
    server_url: str | None,
    which: str,
    top: int,
    *,
    sandbox: bool = True,
) -> dict[str, Any]:
    root = scratch / f"profile-{db}-{which}-{n}-{uuid.uuid4().hex[:6]}"
    workdir, _ = make_workdir(root / "workdir", n)
    holder: dict[str, Any] = {}

    def wrap(run: Callable[[], Any]) -> Any:
        if which == "pyinstrument":
            from pyinstrument import Profiler

            prof = Profiler(interval=0.0005)
            prof.start()
            try:
                return run()
            finally:
                prof.stop()
                holder["prof"] = prof
        cprof = cProfile.Profile()
        try:
            return cprof.runcall(run)
        finally:
            holder["prof"] = cprof

    with database(db, workdir, server_url) as url:
        result = engine_round(workdir, url, n, wrap, sandbox=sandbox)
    shutil.rmtree(root, ignore_errors=True)
    if which == "pyinstrument":
        report = pyinstrument_report(holder["prof"], n, result["wall_s"], top)
    else:
        report = cprofile_report(holder["prof"], n, result["wall_s"], top)
        report["summary"] = profile_summary(report)
    return {"db": db, "tasks": n, **report}


# --------------------------------------------------------------------------- environment


def _version(argv: list[str], strip: bool = True) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip() if strip else out


def _fs_type(path: Path) -> str | None:
    best, fstype = "", None
    with contextlib.suppress(OSError), open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            mount = parts[1]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, parts[2]
    return fstype


def environment(scratch: Path) -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    packages = {}
    for name in ("sqlalchemy", "pydantic", "pydantic-core", "psycopg", "alembic", "pyinstrument"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    head = _version(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    dirty = _version(["git", "-C", str(ROOT), "status", "--porcelain", "--", "core"], strip=False)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_mib": mem_kib // 1024 if mem_kib else None,
        "python": platform.python_version(),
        "git": _version(["git", "--version"]),
        "sqlite": sqlite3.sqlite_version,
        "packages": packages,
        "scratch_dir": str(scratch),
        "scratch_fs": _fs_type(scratch),
        "repo_commit": head,
        "core_uncommitted_changes": [ln for ln in (dirty or "").splitlines() if ln],
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/engine_overhead.py",
        description="Embedded-engine overhead per task vs the bare cost of the same commands.",
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[200], help="sizes (N)")
    parser.add_argument(
        "--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite"], help="databases"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output; '{db}' is replaced by the database "
        "(default: bench/results/engine_overhead-{db}.json)",
    )
    parser.add_argument("--profile", action="store_true", help="add one profiled engine run")
    parser.add_argument(
        "--profiler",
        choices=["cprofile", "pyinstrument", "both"],
        default="cprofile",
        help="cProfile: exact call counts and self time; pyinstrument: sampled, less "
        "distortion, call tree written beside the JSON; both: one profiled run of each",
    )
    parser.add_argument(
        "--profile-tasks", type=int, default=None, help="size of the profiled run (default: max N)"
    )
    parser.add_argument("--top", type=int, default=25, help="profile entries to keep")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each size this many times and keep the median (by overhead); "
        "every repeat's numbers stay in the JSON",
    )
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where work dirs are built (default: $TMPDIR)"
    )
    parser.add_argument(
        "--no-sandbox",
        dest="sandbox",
        action="store_false",
        help="run the engine with --no-sandbox (default: adapters and checks in bubblewrap, "
        "as `orchestrator execute` runs them; bench/sandbox_overhead.py compares the two)",
    )
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.tasks) or args.repeat < 1:
        parser.error("--tasks and --repeat must be positive")
    if len(args.db) > 1 and args.out and "{db}" not in args.out:
        parser.error("with several --db values, --out must contain '{db}'")

    scratch_parent = args.scratch or Path(tempfile.gettempdir())
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="engine-overhead-", dir=scratch_parent))
    Observed.install()  # before any round: bare and engine run under the same audit hook
    env = environment(scratch)
    try:
        for db in args.db:
            server_url = postgres_server_url() if db == "postgres" else None
            report: dict[str, Any] = {
                "benchmark": "engine_overhead",
                "schema_version": SCHEMA_VERSION,
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "environment": {
                    **env,
                    "postgres": postgres_info(server_url) if server_url else None,
                },
                "method": {
                    "adapter_command": ADAPTER_ARGV,
                    "gate_checks": [GATE_ARGV],
                    "limit": "per task: git worktree add --detach + fork/exec of the adapter "
                    "command + a second worktree for the gate + fork/exec of the gate check + "
                    "both worktrees removed (bare mirror); mean of one round before and one "
                    "after the engine run, plus the one-off mirror clone / N",
                    "overhead": "engine wall (executor.run()) / N - limit per task",
                    "attempt_latency": "finished_at - started_at of each attempt "
                    "(.state/execution_results.json)",
                    "cycle": "gap between consecutive attempts' finished_at (full per-task "
                    "cost including the ledger and DB writes after the attempt)",
                    "cpu": "user+system CPU of this process and of its waited-for children "
                    "(git, true) per task, engine vs bare; insensitive to other load on the "
                    "machine; the PostgreSQL server's own CPU is not included",
                },
                "target": {
                    "overhead_per_task_ms_lt": TARGET_OVERHEAD_MS,
                    "overhead_share_of_bare_max": TARGET_OVERHEAD_SHARE,
                    "db": "sqlite",
                },
                "runs": [],
            }
            for n in args.tasks:
                print(f"[{db}] {n} tasks ...", file=sys.stderr, flush=True)
                tries = [
                    measure(db, n, scratch, server_url, sandbox=args.sandbox)
                    for _ in range(args.repeat)
                ]
                run = median_run(tries)
                report["runs"].append(run)
                counts = run["engine"]["per_task"]
                print(
                    f"[{db}] N={n}: wall/task {run['engine']['wall_per_task_ms']} ms, "
                    f"bare/task {run['bare']['per_task_ms']} ms, "
                    f"overhead {run['overhead_per_task_ms']} ms "
                    f"= {run['overhead_share_of_bare']:.0%} of bare "
                    f"(CPU {run['cpu_overhead_per_task_ms']} ms), "
                    f"per task {counts['git_processes']} git processes, "
                    f"{counts['db_checkouts']} DB checkouts, {counts['db_commits']} commits, "
                    f"attempt p50/p95 {run['engine']['attempt_latency']['p50_ms']}/"
                    f"{run['engine']['attempt_latency']['p95_ms']} ms, "
                    f"cycle p50/p95 {run['engine']['cycle']['p50_ms']}/"
                    f"{run['engine']['cycle']['p95_ms']} ms",
                    file=sys.stderr,
                    flush=True,
                )
            out = Path(
                (args.out or str(ROOT / "bench/results/engine_overhead-{db}.json")).replace(
                    "{db}", db
                )
            )
            if args.profile:
                pn = args.profile_tasks or max(args.tasks)
                print(f"[{db}] timing entry points, {pn} tasks ...", file=sys.stderr)
                timed = instrumented(db, pn, scratch, server_url, sandbox=args.sandbox)
                report["breakdown"] = timed
                for row in timed["groups"]:
                    print(
                        f"  {row['ms_per_task']:8.2f} ms/task  {row['group']}",
                        file=sys.stderr,
                    )
                kinds = ["cprofile", "pyinstrument"] if args.profiler == "both" else [args.profiler]
                for kind in kinds:
                    print(f"[{db}] profiling {pn} tasks ({kind}) ...", file=sys.stderr)
                    prof = profile(
                        db, pn, scratch, server_url, kind, args.top, sandbox=args.sandbox
                    )
                    if "text" in prof:  # the pyinstrument call tree: beside the JSON
                        tree = out.with_name(out.stem + ".pyinstrument.txt")
                        tree.parent.mkdir(parents=True, exist_ok=True)
                        tree.write_text(prof.pop("text"))
                        prof["call_tree"] = tree.name
                    key = "profile" if kind == kinds[0] else f"profile_{kind}"
                    report[key] = prof
                    for line in prof.get("summary", []):
                        print(f"  {line}", file=sys.stderr)
                    for row in prof["top_self"][:10]:
                        print(
                            f"  {row['self_ms_per_task']:8.2f} ms/task  {row['function']}",
                            file=sys.stderr,
                        )
            report["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"[{db}] wrote {out}", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

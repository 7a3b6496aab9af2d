"""Issue 12 on the embedded backend: secrets reach no sink, caps hold, full patches kept.

Real processes, git repositories and SQLite/PostgreSQL; what is asserted is what the files,
the database rows and the console received.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from rich.console import Console
from sqlalchemy import inspect, text
from typer.testing import CliRunner

from core.cli import app
from core.db.database import default_url, make_engine, upgrade
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import ConsoleProgress, SilentProgress
from core.errors import EntryContractError
from core.models import FailureClass, TaskState
from tests.workdirs import git, make_workdir


def run(workdir: Path, run_id: str, *, url: str | None = None, progress=None, **config):
    url = url or default_url(workdir)
    upgrade(url, evidence_root=workdir / ".ledger")
    metrics = Metrics()
    executor = build_executor(
        ExecutorConfig(run_id=run_id, workdir=workdir, database_url=url, **config),
        progress=progress or SilentProgress(),
        metrics=metrics,
        clocks=Clocks(sleep=lambda _: None),
    )
    return executor.run(), executor


def py(code: str, **extra) -> dict:
    return {"kind": "process", "command": [sys.executable, "-c", code], **extra}


def db_dump(url: str, skip: tuple[str, str] | None = None) -> str:
    """Every row of every table, as text (``skip``: one (table, column) left out)."""
    engine = make_engine(url)
    out = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')).mappings():
                values = {k: v for k, v in row.items() if (table, k) != skip}
                out.append(f"{table}: {values!r}")
    engine.dispose()
    return "\n".join(out)


# --------------------------------------------------------------------------- secrets


LEAKY = """
import os, sys
key = os.environ["ORCH_TEST_API_KEY"]
print("using key", key, flush=True)
print("stderr says", key, file=sys.stderr, flush=True)
raise RuntimeError("authentication failed for key " + key)
"""
WRITER = "import pathlib; pathlib.Path('out.txt').write_text('ok\\n')"
GATE_LEAK = "import os, sys; print('gate token', os.environ['GATE_TOKEN']); sys.exit(1)"


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def test_a_secret_printed_and_raised_reaches_no_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_url: str | None
) -> None:
    secret = f"orchtest-{uuid.uuid4().hex}"
    gate_secret = f"gatetok-{uuid.uuid4().hex}"
    monkeypatch.setenv("ORCH_TEST_API_KEY", secret)
    workdir = make_workdir(
        tmp_path / "w",
        run_id="leak",
        tasks=[
            {"task_id": "leaky", "prompt": "do it"},
            {
                "task_id": "gated",
                "prompt": "write",
                "gate": [
                    {
                        "name": "leaky-check",
                        "command": [sys.executable, "-c", GATE_LEAK],
                        "env": {"GATE_TOKEN": gate_secret},
                    }
                ],
            },
        ],
        adapters=[
            {
                "id": "leaky",
                **py(LEAKY, pass_env=["ORCH_TEST_API_KEY"]),
                "retry": {"max_attempts": 2, "jitter_seconds": 0},
            },
            {"id": "writer", **py(WRITER, pass_env=["ORCH_TEST_API_KEY"])},
        ],
        routes={"leaky": "leaky", "gated": "writer"},
    )
    console_out = io.StringIO()
    progress = ConsoleProgress(Console(file=console_out, width=300, force_terminal=False))
    results, executor = run(workdir, "leak", url=any_url, progress=progress)

    leaky, gated = results.tasks
    assert leaky.state is TaskState.FAILED and leaky.failure_class is FailureClass.ADAPTER_ERROR
    assert len(leaky.attempts) == 2
    assert gated.state is TaskState.FAILED and gated.failure_class is FailureClass.GATE_FAILED

    url = any_url or default_url(workdir)
    dump = db_dump(url)
    sinks = {
        "console": console_out.getvalue(),
        "metrics": generate_latest(executor.metrics.registry).decode(),
        "database": dump,
    }
    # the whole work dir, every file, as bytes (SQLite file and its WAL included)
    for path in workdir.rglob("*"):
        if path.is_file() and ".git" not in path.parts and "repo" not in path.parts[-3:-1]:
            sinks[str(path.relative_to(workdir))] = path.read_bytes().decode(errors="replace")
    for name, content in sinks.items():
        assert secret not in content, f"the adapter's secret reached {name}"
    # a gate check's env is written literally in the task (an input, kept as given in
    # task_queue.json and the task's stored spec); what the check printed reaches no sink
    sinks["database"] = db_dump(url, skip=("tasks", "spec"))
    for name in [n for n in sinks if n.startswith("orchestrator.db")]:
        del sinks[name]  # the raw file holds the spec; its rows are in the dump above
    del sinks[".state/task_queue.json"]
    for name, content in sinks.items():
        assert gate_secret not in content, f"the gate check's secret reached {name}"

    # ... and not because nothing was written: each sink got the text, masked
    mask = "[REDACTED:ORCH_TEST_API_KEY]"
    log = (workdir / "logs/execution/leaky.jsonl").read_text()
    assert f"using key {mask}" in log and f"stderr says {mask}" in log
    assert f"authentication failed for key {mask}" in log  # the traceback
    assert "[REDACTED:GATE_TOKEN]" in (workdir / "logs/execution/gated.jsonl").read_text()
    assert mask in leaky.failure_message
    assert mask in dump  # tasks.failure_message / tasks.result / execution_log.payload
    assert mask in (workdir / ".state/execution_results.json").read_text()
    assert mask in (workdir / ".state/patch_ledger.jsonl").read_text()
    assert mask in (workdir / "logs/executor.jsonl").read_text()
    assert mask in console_out.getvalue()
    gate_tail = gated.attempts[-1].gate.checks[0].output_tail
    assert "gate token [REDACTED:GATE_TOKEN]" in gate_tail


# --------------------------------------------------------------------------- log cap


def test_three_million_empty_lines_give_a_log_within_the_cap(tmp_path: Path) -> None:
    flood = "import sys; sys.stdout.write('\\n' * 3_000_000); sys.stdout.flush()"
    workdir = make_workdir(
        tmp_path / "w",
        run_id="flood",
        tasks=[{"task_id": "flood", "prompt": "flood", "allow_empty_diff": True, "gate": []}],
        adapters=[{"id": "flood", **py(flood)}],
        routes={"flood": "flood"},
    )
    cap = 2 * 1024 * 1024
    results, _ = run(workdir, "flood", max_log_bytes=cap)
    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED
    log = workdir / "logs/execution/flood.jsonl"
    size = log.stat().st_size
    assert size <= cap
    attempt = task.attempts[-1]
    assert attempt.log_truncated and attempt.log_bytes == size
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    markers = [r for r in recs if r.get("event") == "output_truncated"]
    assert len(markers) == 1
    kept = sum(1 for r in recs if r.get("stream") == "stdout")
    assert kept > 1000 and markers[0]["dropped_records"] == 3_000_000 - kept
    cut = recs.index(markers[0])
    assert recs[cut - 1].get("line") == "" and recs[cut + 1].get("line") == ""  # head, tail


# --------------------------------------------------------------------------- full patches


BIG = """
import os, pathlib, random
rnd = random.Random(7)
lines = ("%08d %064x\\n" % (i, rnd.getrandbits(256)) for i in range(int(os.environ["LINES"])))
pathlib.Path("big.txt").write_text("".join(lines))
pathlib.Path("blob.bin").write_bytes(bytes(rnd.getrandbits(8) for _ in range(300_000)))
pathlib.Path("README.md").unlink()
"""
BINARY = """
import pathlib, random
rnd = random.Random(3)
pathlib.Path("img.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(rnd.getrandbits(8) for _ in range(50_000)))
pathlib.Path("data").mkdir()
pathlib.Path("data/zeros.bin").write_bytes(bytes(4096))
"""
CHECK = "import pathlib, sys; sys.exit(0 if pathlib.Path('big.txt').stat().st_size > 20_000_000 else 1)"


def export(workdir: Path, task: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from core.cli import main; main()",
            "export",
            "--run",
            "big",
            "--task",
            task,
            "-o",
            str(out),
            "--workdir",
            str(workdir),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def applied_sha(workdir: Path, base: str, patch: Path, tmp: Path) -> str:
    """git apply the export on a fresh clone at the base: the sha256 of the diff it makes."""
    fresh = tmp / f"fresh-{patch.stem}"
    git("clone", "-q", str(workdir / "repo"), str(fresh), cwd=tmp)
    git("checkout", "-q", "--detach", base, cwd=fresh)
    git("apply", "--index", "--binary", str(patch), cwd=fresh)
    diff = subprocess.run(
        ["git", "diff", "--cached", "--binary", "--full-index", "--find-renames", base],
        cwd=fresh,
        capture_output=True,
        check=True,
    ).stdout
    return hashlib.sha256(diff).hexdigest()


def test_a_20_mib_patch_completes_and_its_export_applies_with_the_recorded_sha(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINES", str(20 * 1024 * 1024 // 74 + 1000))  # ~20 MiB of text
    workdir = make_workdir(
        tmp_path / "w",
        run_id="big",
        tasks=[
            {
                "task_id": "big",
                "prompt": "big",
                "gate": [{"name": "size", "command": [sys.executable, "-c", CHECK]}],
            },
            {"task_id": "binary", "prompt": "binary", "gate": []},
        ],
        adapters=[
            {"id": "big", **py(BIG, pass_env=["LINES"])},
            {"id": "binary", **py(BINARY)},
        ],
        routes={"big": "big", "binary": "binary"},
    )
    results, _ = run(workdir, "big")
    big, binary = results.tasks
    assert big.state is TaskState.COMPLETED, big.failure_message
    assert binary.state is TaskState.COMPLETED, binary.failure_message
    diff = big.attempts[-1].diff
    assert diff is not None and diff.bytes > 20 * 1024 * 1024 and not diff.truncated
    assert diff.binary_files == 1 and diff.patch_ref == f"patches/{diff.sha256}.diff.gz"
    assert diff.patch_stored_bytes is not None and diff.patch_stored_bytes < diff.bytes

    # records carry the sha, sizes and the key; never the bulk
    ledger = (workdir / ".state/patch_ledger.jsonl").read_text()
    assert len(ledger) < 64 * 1024 and diff.patch_ref in ledger
    engine = make_engine(default_url(workdir))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, patch_ref, diff_sha256 FROM patch_history")).all()
    engine.dispose()
    assert ("big", diff.patch_ref, diff.sha256) in rows
    assert (workdir / "orchestrator.db").stat().st_size < 2 * 1024 * 1024

    base = json.loads((workdir / ".state/task_queue.json").read_text())["tasks"][0]["base_commit"]
    for task in (big, binary):
        out = tmp_path / f"{task.task_id}.diff"
        done = export(workdir, task.task_id, out)
        assert done.returncode == 0, done.stderr
        recorded = task.attempts[-1].diff
        assert hashlib.sha256(out.read_bytes()).hexdigest() == recorded.sha256
        assert applied_sha(workdir, base, out, tmp_path) == recorded.sha256

    # ledger verify checks every stored patch against its sha256
    verify = CliRunner().invoke(app, ["ledger", "verify", "--workdir", str(workdir)])
    assert verify.exit_code == 0, verify.output


def test_a_diff_over_the_hard_limit_is_its_own_failure_and_keeps_nothing(tmp_path: Path) -> None:
    two_mib = "import pathlib; pathlib.Path('x.txt').write_text(('z' * 99 + '\\n') * 21000)"
    workdir = make_workdir(
        tmp_path / "w",
        run_id="big",
        tasks=[
            {
                "task_id": "huge",
                "prompt": "huge",
                "gate": [{"name": "never", "command": [sys.executable, "-c", "raise SystemExit(1)"]}],
            }
        ],
        adapters=[{"id": "huge", **py(two_mib)}],
        routes={"huge": "huge"},
    )
    results, _ = run(workdir, "big", max_diff_bytes=1024 * 1024)
    task = results.tasks[0]
    assert task.state is TaskState.FAILED
    assert task.failure_class is FailureClass.DIFF_TOO_LARGE
    attempt = task.attempts[-1]
    assert attempt.gate is None  # not judged
    assert attempt.diff is not None and attempt.diff.truncated and attempt.diff.bytes > 1024 * 1024
    assert attempt.diff.patch_ref is None
    assert not list((workdir / ".ledger").rglob("*.gz"))
    entry = json.loads((workdir / ".state/patch_ledger.jsonl").read_text().splitlines()[0])
    assert entry["patch_ref"] is None and entry["failure_class"] == "diff_too_large"
    done = export(workdir, "huge", tmp_path / "x.diff")
    assert done.returncode == 2 and "exceeded the hard limit" in done.stderr


# --------------------------------------------------------------------------- entry contract


ECHO_PROMPT = (
    "import hashlib, os, pathlib; data = pathlib.Path(os.environ['ORCHESTRATOR_PROMPT_FILE'])"
    ".read_bytes(); print('prompt-sha', hashlib.sha256(data).hexdigest()); "
    "print('context', pathlib.Path(os.environ['ORCHESTRATOR_CONTEXT_FILE']).read_text()"
    ".splitlines()[0]); pathlib.Path('o.txt').write_text('x')"
)


def test_the_prompt_reaches_the_adapter_byte_for_byte(tmp_path: Path) -> None:
    prompt = "\n\n  Fix it:\tkeep   this\r\nwhitespace  \n\n"
    workdir = make_workdir(
        tmp_path / "w",
        run_id="p",
        tasks=[{"task_id": "p", "title": "Title", "prompt": prompt, "gate": []}],
        adapters=[{"id": "echo", **py(ECHO_PROMPT)}],
        routes={"p": "echo"},
    )
    results, _ = run(workdir, "p")
    assert results.tasks[0].state is TaskState.COMPLETED
    lines = [
        json.loads(x).get("line")
        for x in (workdir / "logs/execution/p.jsonl").read_text().splitlines()
    ]
    assert f"prompt-sha {hashlib.sha256(prompt.encode()).hexdigest()}" in lines
    assert "context # Task p: Title" in lines


def test_entry_contract_refuses_before_any_work(tmp_path: Path) -> None:
    def workdir(name: str, **task) -> Path:
        return make_workdir(
            tmp_path / name,
            run_id="e",
            tasks=[{"task_id": "t", "prompt": "p", **task}],
            adapters=[{"id": "echo", **py(ECHO_PROMPT)}],
            routes={"t": "echo"},
        )

    big = workdir("big", prompt="x" * (1024 * 1024 + 1))
    with pytest.raises(EntryContractError) as exc:
        run(big, "e")
    assert "field `tasks.0.prompt`" in str(exc.value) and "1048577 bytes" in str(exc.value)
    assert not (big / ".state/patch_ledger.jsonl").exists()

    missing = workdir("missing", base_commit="f" * 40)
    with pytest.raises(EntryContractError) as exc:
        run(missing, "e")
    assert "field `tasks.0.base_commit`" in str(exc.value)
    engine = make_engine(default_url(missing))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tasks")).scalar() == 0
    engine.dispose()

    creds = workdir("creds", repo="https://user:hunter2@git.example.invalid/r.git")
    with pytest.raises(EntryContractError) as exc:
        run(creds, "e")
    assert "field `tasks.0.repo`" in str(exc.value) and "hunter2" not in str(exc.value)

    # the command line: exit 2, naming the field
    cli = CliRunner().invoke(app, ["execute", "--run", "e", "--workdir", str(big)])
    assert cli.exit_code == 2 and "tasks.0.prompt" in cli.output
    cli = CliRunner().invoke(
        app, ["execute", "--run", "e", "--workdir", str(big), "--max-prompt-bytes", "2000000"]
    )
    assert cli.exit_code == 0, cli.output
    assert os.path.exists(big / ".state/execution_results.json")


def test_gc_keeps_what_the_ledger_references_unless_told(tmp_path: Path) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="big",
        tasks=[{"task_id": "t", "prompt": "p", "gate": []}],
        adapters=[{"id": "w", **py(WRITER)}],
        routes={"t": "w"},
    )
    results, _ = run(workdir, "big")
    ref = results.tasks[0].attempts[-1].diff.patch_ref
    assert ref is not None and (workdir / ".ledger" / ref).exists()
    orphan = workdir / ".ledger/patches" / ("0" * 64 + ".diff.gz")
    orphan.write_bytes(b"left by a crash")
    os.utime(orphan, (0, 0))
    cli = CliRunner()
    gc = ["gc", "--workdir", str(workdir), "--older-than-days", "0"]

    dry = cli.invoke(app, [*gc, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete orphan" in dry.output and "would delete log t.jsonl" in dry.output
    assert orphan.exists() and (workdir / "logs/execution/t.jsonl").exists()

    done = cli.invoke(app, gc)
    assert done.exit_code == 0 and "1 referenced patch(es) kept" in done.output
    assert not orphan.exists() and not (workdir / "logs/execution/t.jsonl").exists()
    assert (workdir / ".ledger" / ref).exists()
    assert (workdir / ".state/patch_ledger.jsonl").exists()

    pruned = cli.invoke(app, [*gc, "--include-referenced"])
    assert pruned.exit_code == 0 and not (workdir / ".ledger" / ref).exists()
    verify = cli.invoke(app, ["ledger", "verify", "--workdir", str(workdir)])
    assert verify.exit_code == 0 and "1 pruned by gc" in verify.output
    gone = export(workdir, "t", tmp_path / "t.diff")
    assert gone.returncode == 2 and "pruned" in gone.stderr

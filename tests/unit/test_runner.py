"""core.runner: the process inside adapter and gate pods, run for real as a subprocess.

Each test starts ``python -m core.runner adapter|gate`` with a pod-like environment (the
request in ORCHESTRATOR_REQUEST, an empty work dir, HOME inside it, nothing else inherited),
real git repositories and real adapter processes, and reads stdout with ``parse_pod_log``
exactly as the operator reads the pod log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.engine.workspace import add_worktree, capture_diff
from core.runner.protocol import (
    EXIT_BAD_REQUEST,
    EXIT_OK,
    EXIT_RUNNER_FAILED,
    RESULT_KEY,
    ParsedLog,
    RunnerResult,
    parse_pod_log,
)

BIG = 10 * 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff\xfe"


@pytest.fixture
def repo(git_repo: Any) -> Any:
    return git_repo({"a.txt": "old\n", "keep.txt": "same\n"})


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "pod-work"
    path.mkdir()
    return path


def make_patch(repo: Any, tmp_path: Path, gt: Any, files: dict[str, Any]) -> bytes:
    tree = add_worktree(repo.path, tmp_path / "author-tree", repo.base)
    gt.write_files(tree, files)
    return capture_diff(tree, repo.base, BIG).patch


def request(
    repo: Any,
    kind: str = "adapter",
    *,
    adapter: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "run_id": "run-1",
        "task": {
            "task_id": "t1",
            "title": "change a",
            "prompt": "Change a.txt.",
            "repo": "repo",
            "base_commit": repo.base,
            **(task or {}),
        },
        "adapter": adapter or {"id": "patcher", "kind": "patch"},
        "attempt": 2,
        "repo_url": str(repo.path),
        "timeout_seconds": 30,
        **fields,
    }


def py_adapter(script: str, **fields: Any) -> dict[str, Any]:
    return {"id": "tool", "kind": "process", "command": ["{python}", "-c", script], **fields}


def pod_env(workdir: Path, req: dict[str, Any] | str | None, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir / "home"),
        "ORCHESTRATOR_WORKDIR": str(workdir),
        "ORCHESTRATOR_GRACE_SECONDS": "1",
        **extra,
    }
    # the request is a file (in a pod: fetched by the init container into a read-only mount)
    request_file = workdir.parent / f"{workdir.name}-inputs" / "request.json"
    env["ORCHESTRATOR_REQUEST_FILE"] = str(request_file)
    if req is not None:
        request_file.parent.mkdir(parents=True, exist_ok=True)
        request_file.write_text(req if isinstance(req, str) else json.dumps(req))
    return env


def run_runner(
    mode: str, workdir: Path, req: dict[str, Any] | str | None, **extra: str
) -> tuple[subprocess.CompletedProcess[str], ParsedLog]:
    proc = subprocess.run(
        [sys.executable, "-m", "core.runner", mode],
        env=pod_env(workdir, req, **extra),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc, parse_pod_log(proc.stdout)


def start_runner(mode: str, workdir: Path, req: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "core.runner", mode],
        env=pod_env(workdir, req),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of stdout (through the file object: what readline() buffered is kept)."""
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()  # the runner's stderr is a few lines: no pipe deadlock
    proc.wait(timeout=20)
    return out, err


def ok_result(proc: subprocess.CompletedProcess[str], parsed: ParsedLog) -> RunnerResult:
    assert proc.returncode == EXIT_OK, proc.stderr
    assert parsed.result is not None, proc.stdout[-2000:]
    # the result is the last line of stdout, and nothing but JSON records precede it
    lines = proc.stdout.splitlines()
    assert RESULT_KEY in json.loads(lines[-1])
    assert all(r.get("stream") != "raw" for r in parsed.records)
    return parsed.result


def lines_of(parsed: ParsedLog, stream: str) -> list[str]:
    return [r["line"] for r in parsed.records if r.get("stream") == stream and "line" in r]


def events(parsed: ParsedLog) -> list[str]:
    return [r["event"] for r in parsed.records if r.get("stream") == "orchestrator"]


# --------------------------------------------------------------------------- adapter mode


@pytest.mark.parametrize("kind", ["patch", "manual"])
def test_patch_adapter_reports_the_diff_and_the_patch_round_trips(
    kind: str, repo: Any, workdir: Path, tmp_path: Path, gt: Any
) -> None:
    patch = make_patch(repo, tmp_path, gt, {"a.txt": "new\n", "img.png": PNG, "dir/ünï.txt": "x\n"})
    req = request(repo, adapter={"id": "patcher", "kind": kind}, task={"patch": patch.decode()})
    result = ok_result(*(run := run_runner("adapter", workdir, req)))
    parsed = run[1]

    assert result.kind == "adapter" and result.exit_code == 0 and not result.timed_out
    assert result.diff is not None and not result.diff.empty and not result.diff.truncated
    assert result.diff.files_changed == 3 and result.diff.binary_files == 1
    assert {f.path for f in result.diff.files} == {"a.txt", "img.png", "dir/ünï.txt"}
    assert result.patch_b64 is not None
    full = base64.b64decode(result.patch_b64)
    assert full == patch
    assert hashlib.sha256(full).hexdigest() == result.diff.sha256 and len(full) == result.diff.bytes
    # every byte of the log counts (our notes too), and it is the size of the log file
    assert result.runner_version and not result.log_truncated
    assert result.log_bytes == (workdir / "attempt" / "log.jsonl").stat().st_size > 0

    # the reported patch applies to a fresh checkout of the base and gives the same tree
    fresh = add_worktree(repo.path, tmp_path / "fresh", repo.base)
    gt.run_git(fresh, "apply", "--index", "--binary", "-", input=full)
    assert (fresh / "img.png").read_bytes() == PNG
    assert (fresh / "a.txt").read_text() == "new\n"

    assert events(parsed)[:2] == ["checkout_started", "attempt_started"]
    assert "patch_applied" in events(parsed) and "diff_captured" in events(parsed)
    assert all(r["task_id"] == "t1" and r["attempt"] == 2 for r in parsed.records)
    assert {"ts", "task_id", "attempt", "stream"} <= set(parsed.records[0])
    # evidence stays inside the work dir; the clone has no remote an adapter could push to
    mirrors = list((workdir / "mirrors").glob("*.git"))
    assert len(mirrors) == 1 and gt.run_git(mirrors[0], "remote") == b""


def test_diff_over_the_cap_is_truncated_explicitly(
    repo: Any, workdir: Path, tmp_path: Path, gt: Any
) -> None:
    patch = make_patch(repo, tmp_path, gt, {"a.txt": "new\n" * 200})
    req = request(repo, task={"patch": patch.decode()}, max_diff_bytes=100)
    result = ok_result(*run_runner("adapter", workdir, req))
    assert result.diff is not None and result.diff.truncated
    assert result.patch_b64 is None
    # capture stopped past the limit: nothing kept, no hash of a diff nobody holds
    assert result.diff.sha256 == ""
    assert 100 < result.diff.bytes <= len(patch)
    assert result.diff.insertions == 200  # the stats still describe the whole change


def test_patch_that_does_not_apply_is_an_adapter_failure(repo: Any, workdir: Path) -> None:
    bad = "--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-not there\n+new\n"
    result = ok_result(*(run := run_runner("adapter", workdir, request(repo, task={"patch": bad}))))
    assert result.exit_code == 1 and "does not apply" in result.output_tail
    assert result.diff is not None and result.diff.empty
    assert "patch_failed" in events(run[1])


def test_process_adapter_timeout_keeps_partial_output_and_diff(repo: Any, workdir: Path) -> None:
    script = (
        "import pathlib, sys, time\n"
        "pathlib.Path('partial.txt').write_text('half done\\n')\n"
        "print('line 1', flush=True)\n"
        "print('line 2', flush=True)\n"
        "print('warn', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    req = request(repo, adapter=py_adapter(script), timeout_seconds=1.5)
    started = time.monotonic()
    proc = start_runner("adapter", workdir, req)
    out, err = finish(proc)
    took = time.monotonic() - started
    parsed = parse_pod_log(out)

    assert proc.returncode == EXIT_OK, err
    result = parsed.result
    assert result is not None
    assert result.timed_out and not result.cancelled
    assert result.exit_code is None and result.signal == signal.SIGTERM
    assert lines_of(parsed, "stdout") == ["line 1", "line 2"]
    assert lines_of(parsed, "stderr") == ["warn"]
    assert "line 2" in result.output_tail
    assert result.diff is not None and [f.path for f in result.diff.files] == ["partial.txt"]
    assert base64.b64decode(result.patch_b64 or "").count(b"+half done") == 1
    assert "adapter_timed_out" in events(parsed)
    assert took < 10


def test_process_adapter_nonzero_exit_env_from_scratch_and_log_cap(
    repo: Any, workdir: Path
) -> None:
    # the tool sees the prompt on stdin, its pass_env secret, and nothing else of the pod's env
    script = (
        "import os, sys\n"
        "prompt = sys.stdin.read()\n"
        "print('prompt-has-task-text', 'TASK-' + 'MARKER' in prompt, flush=True)\n"
        "print('token', os.environ.get('TOOL_TOKEN'), flush=True)\n"
        "print('leak', os.environ.get('OTHER_SECRET'), os.environ.get('ORCHESTRATOR_GRANT'))\n"
        "print('home', os.environ['HOME'].startswith(os.environ['ORCHESTRATOR_WD']))\n"
        "for i in range(500):\n"
        "    print('filler line', i)\n"
        "sys.stdout.flush()\n"
        "print('boom', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    adapter = py_adapter(script, stdin="prompt", pass_env=["TOOL_TOKEN"])
    adapter["env"] = {"ORCHESTRATOR_WD": str(workdir)}
    req = request(
        repo,
        adapter=adapter,
        task={"prompt": "TASK-MARKER; $(touch /tmp/pwned) && `id`"},
        max_log_bytes=8000,
    )
    result = ok_result(
        *(run := run_runner("adapter", workdir, req, TOOL_TOKEN="s3cr3t", OTHER_SECRET="x"))
    )
    parsed = run[1]
    assert result.exit_code == 3 and result.signal is None and not result.timed_out
    assert result.diff is not None and result.diff.empty
    out = lines_of(parsed, "stdout")
    # the secret the tool was given is masked before it reaches the log (and the pod log)
    assert out[:4] == [
        "prompt-has-task-text True",
        "token [REDACTED:TOOL_TOKEN]",
        "leak None None",
        "home True",
    ]
    assert "s3cr3t" not in run[0].stdout
    # no task text in the command line
    argv = next(r["argv"] for r in parsed.records if r.get("event") == "adapter_command")
    assert not any("TASK-MARKER" in a or "touch" in a for a in argv)
    # the log cap counts every byte: head and tail kept around one explicit marker
    assert result.log_truncated and result.log_bytes <= 8000
    assert events(parsed).count("output_truncated") == 1
    assert out[-1] == "filler line 499"
    assert "boom" in result.output_tail  # the tail is kept even when the log is cut
    assert not Path("/tmp/pwned").exists()


def test_process_adapter_that_changes_nothing_reports_an_empty_diff(
    repo: Any, workdir: Path
) -> None:
    req = request(repo, adapter=py_adapter("print('nothing to do')"))
    result = ok_result(*run_runner("adapter", workdir, req))
    assert result.exit_code == 0
    assert result.diff is not None and result.diff.empty and result.diff.files_changed == 0
    assert result.patch_b64 == ""


def test_process_adapter_that_cannot_start_reports_start_error(repo: Any, workdir: Path) -> None:
    adapter = {"id": "tool", "kind": "process", "command": ["no-such-tool-xyz", "{prompt_file}"]}
    result = ok_result(*run_runner("adapter", workdir, request(repo, adapter=adapter)))
    assert result.start_error is not None and "no-such-tool-xyz" in result.start_error
    assert result.exit_code is None


def test_sigterm_cancels_the_adapter_and_still_reports(repo: Any, workdir: Path) -> None:
    script = (
        "import pathlib, time\n"
        "pathlib.Path('wip.txt').write_text('wip\\n')\n"
        "print('working', flush=True)\n"
        "time.sleep(60)\n"
    )
    req = request(repo, adapter=py_adapter(script), timeout_seconds=60)
    proc = start_runner("adapter", workdir, req)
    assert proc.stdout is not None
    # streaming: the adapter's line is on stdout while the adapter still runs (it sleeps
    # for a minute and its budget is a minute: only our signal below can end it)
    seen = ""
    while '"working"' not in seen:
        line = proc.stdout.readline()
        assert line, "stdout ended early"
        seen += line
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # what the kubelet does when the pod is deleted
    rest, err = finish(proc)
    assert proc.returncode == EXIT_OK, err
    result = parse_pod_log(seen + rest).result
    assert result is not None and result.cancelled and not result.timed_out
    assert result.diff is not None and [f.path for f in result.diff.files] == ["wip.txt"]


def test_clone_failure_is_a_runner_failure_without_result(repo: Any, workdir: Path) -> None:
    req = request(repo, repo_url=str(workdir / "no-such-repo"), task={"patch": ""})
    proc, parsed = run_runner("adapter", workdir, req)
    assert proc.returncode == EXIT_RUNNER_FAILED
    assert parsed.result is None
    assert "infrastructure failure" in proc.stderr and "clone" in proc.stderr
    failed = [r for r in parsed.records if r.get("event") == "runner_failed"]
    assert len(failed) == 1 and "clone" in failed[0]["error"]


def test_missing_base_commit_is_a_runner_failure(repo: Any, workdir: Path) -> None:
    req = request(repo, task={"base_commit": "0" * 40, "patch": ""})
    proc, parsed = run_runner("adapter", workdir, req)
    assert proc.returncode == EXIT_RUNNER_FAILED and parsed.result is None
    assert "0" * 40 in proc.stderr


# --------------------------------------------------------------------------- gate mode


def gate_request(repo: Any, patch_file: Path, checks: list[dict[str, Any]], **kw: Any) -> Any:
    return request(
        repo,
        "gate",
        gate_checks=checks,
        patch_file=str(patch_file),
        **kw,
    )


def py_check(name: str, script: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "command": ["{python}", "-c", script], **kw}


A_IS_NEW = (
    "import pathlib, sys; sys.exit(0 if pathlib.Path('a.txt').read_text() == 'new\\n' else 1)"
)


@pytest.fixture
def patch_file(repo: Any, tmp_path: Path, gt: Any) -> Path:
    path = tmp_path / "etc" / "patch"
    path.parent.mkdir()
    path.write_bytes(make_patch(repo, tmp_path, gt, {"a.txt": "new\n", "img.png": PNG}))
    return path


def test_gate_passes_with_the_patch_applied_in_the_pinned_env(
    repo: Any, workdir: Path, patch_file: Path
) -> None:
    checks = [
        py_check("unit", A_IS_NEW),
        py_check("env", "import os; print(os.environ['TZ'], os.environ['PYTHONHASHSEED'])"),
    ]
    result = ok_result(
        *(run := run_runner("gate", workdir, gate_request(repo, patch_file, checks)))
    )
    assert result.kind == "gate" and result.diff is None and result.patch_b64 is None
    gate = result.gate
    assert gate is not None and gate.passed and gate.applied
    assert gate.apply_method == "git apply --index --binary"
    assert [(c.name, c.status.value) for c in gate.checks] == [
        ("unit", "passed"),
        ("env", "passed"),
    ]
    assert lines_of(run[1], "gate:env:stdout") == ["UTC 0"]
    started = next(r for r in run[1].records if r.get("event") == "gate_started")
    assert started["patch_sha256"] == hashlib.sha256(patch_file.read_bytes()).hexdigest()


def test_gate_failure_names_the_failing_check(repo: Any, workdir: Path, patch_file: Path) -> None:
    checks = [
        py_check("unit", A_IS_NEW),
        py_check("lint", "import sys; print('E501 line too long'); sys.exit(1)"),
        py_check("slow", "import time; time.sleep(30)", timeout_seconds=0.5),
    ]
    result = ok_result(*run_runner("gate", workdir, gate_request(repo, patch_file, checks)))
    gate = result.gate
    assert gate is not None and gate.applied and not gate.passed
    assert gate.failed_checks == ["lint", "slow"]
    statuses = {c.name: c.status.value for c in gate.checks}
    assert statuses == {"unit": "passed", "lint": "failed", "slow": "timeout"}
    lint = next(c for c in gate.checks if c.name == "lint")
    assert lint.exit_code == 1 and "E501" in lint.output_tail


def test_gate_reports_a_patch_that_does_not_apply(repo: Any, workdir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.diff"
    bad.write_bytes(b"--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-something else\n+new\n")
    result = ok_result(
        *run_runner("gate", workdir, gate_request(repo, bad, [py_check("unit", A_IS_NEW)]))
    )
    gate = result.gate
    assert gate is not None and gate.applied is False and gate.apply_method is None
    assert not gate.passed and gate.checks == []


def test_gate_baseline_marks_pre_existing_failures(
    repo: Any, workdir: Path, patch_file: Path
) -> None:
    checks = [
        py_check("legacy", "import sys; print('always broken'); sys.exit(2)"),
        py_check("unit", A_IS_NEW),
    ]
    req = gate_request(repo, patch_file, checks, gate_baseline=True)
    result = ok_result(*(run := run_runner("gate", workdir, req)))
    gate = result.gate
    assert gate is not None and gate.passed
    by_name = {c.name: c for c in gate.checks}
    assert by_name["legacy"].status.value == "pre_existing"
    assert by_name["legacy"].baseline_status is not None
    assert by_name["legacy"].baseline_status.value == "failed"
    assert by_name["unit"].status.value == "passed"
    assert by_name["unit"].baseline_status is not None
    assert by_name["unit"].baseline_status.value == "failed"  # a.txt was old on the base
    assert lines_of(run[1], "gate:baseline:legacy:stdout") == ["always broken"]


def test_gate_with_an_unreadable_patch_file_is_a_runner_failure(
    repo: Any, workdir: Path, tmp_path: Path
) -> None:
    req = gate_request(repo, tmp_path / "not-mounted", [py_check("unit", A_IS_NEW)])
    proc, parsed = run_runner("gate", workdir, req)
    assert proc.returncode == EXIT_RUNNER_FAILED and parsed.result is None
    assert "not-mounted" in proc.stderr


# --------------------------------------------------------------------------- request errors


@pytest.mark.parametrize(
    ("mode", "mutate", "needle"),
    [
        ("adapter", lambda r: r["task"].update(base_commit="main"), "task.base_commit"),
        ("adapter", lambda r: r.pop("timeout_seconds"), "timeout_seconds"),
        ("adapter", lambda r: r["task"].pop("patch"), "task.patch"),
        ("gate", lambda r: r.update(kind="gate"), "patch_file"),
        ("gate", lambda r: None, "kind"),
        ("adapter", lambda r: r.update(surprise=1), "surprise"),
    ],
)
def test_invalid_request_exits_non_zero_naming_the_field(
    mode: str, mutate: Any, needle: str, repo: Any, workdir: Path
) -> None:
    req = request(repo, task={"patch": ""})
    mutate(req)
    proc, parsed = run_runner(mode, workdir, req)
    assert proc.returncode == EXIT_BAD_REQUEST
    assert needle in proc.stderr, proc.stderr
    assert proc.stdout == "" and parsed.result is None
    assert not (workdir / "mirrors").exists()  # nothing was attempted


@pytest.mark.parametrize(
    ("argv", "raw", "needle"),
    [
        (["adapter"], None, "request.json is missing or empty"),
        (["adapter"], "{not json", "not valid JSON"),
        ([], "{}", "expected one argument"),
    ],
)
def test_missing_or_malformed_request(
    argv: list[str], raw: str | None, needle: str, workdir: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "core.runner", *argv],
        env=pod_env(workdir, raw),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == EXIT_BAD_REQUEST and needle in proc.stderr, proc.stderr


def test_runner_imports_neither_kopf_nor_the_kubernetes_client() -> None:
    code = (
        "import sys, core.runner.main, core.runner.protocol\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes'))\n"
        "print(bad)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- parse_pod_log


def record(line: str, stream: str = "stdout") -> str:
    rec = {"ts": "2025-01-01T00:00:00.000+00:00", "task_id": "t1", "attempt": 1}
    return json.dumps({**rec, "stream": stream, "line": line}, ensure_ascii=False)


RESULT = RunnerResult(kind="adapter", exit_code=0, duration_seconds=1.5, patch_b64="")


def test_parse_pod_log_full_log() -> None:
    text = "\n".join([record("a"), record("b\u2028c"), RESULT.result_line()]) + "\n"
    parsed = parse_pod_log(text)
    assert parsed.result == RESULT
    assert [r["line"] for r in parsed.records] == ["a", "b\u2028c"]


def test_parse_pod_log_torn_last_line() -> None:
    full = "\n".join([record("a"), record("b"), RESULT.result_line()])
    torn = full[: len(full) - 7]  # the pod died while the result line was being written
    parsed = parse_pod_log(torn)
    assert parsed.result is None
    assert [r.get("line") for r in parsed.records[:2]] == ["a", "b"]
    assert parsed.records[2]["stream"] == "raw"
    assert parsed.records[2]["line"].startswith('{"orchestrator_result"')

    torn_record = record("a") + "\n" + record("b")[:20]
    parsed = parse_pod_log(torn_record)
    assert parsed.result is None and len(parsed.records) == 2
    assert parsed.records[1] == {"stream": "raw", "line": record("b")[:20]}


def test_parse_pod_log_without_result_and_with_stderr_noise() -> None:
    text = "\r\n".join(
        [record("a"), "Traceback (most recent call last):", "[1, 2]", "", record("b", "stderr")]
    )
    parsed = parse_pod_log(text)
    assert parsed.result is None
    assert parsed.records == [
        json.loads(record("a")),
        {"stream": "raw", "line": "Traceback (most recent call last):"},
        {"stream": "raw", "line": "[1, 2]"},
        json.loads(record("b", "stderr")),
    ]
    assert parse_pod_log("") == ParsedLog()


def test_result_line_survives_non_utf8_file_names_and_unknown_fields() -> None:
    from core.models import DiffSummary, FileChange

    diff = DiffSummary(
        sha256="0" * 64,
        bytes=10,
        files_changed=1,
        insertions=1,
        deletions=0,
        empty=False,
        files=[FileChange(path="bad-\udcff.txt", status="added")],
    )
    line = RunnerResult(kind="adapter", diff=diff).result_line()
    assert line.isascii()
    parsed = parse_pod_log(line)
    assert parsed.result is not None and parsed.result.diff is not None
    assert parsed.result.diff.files[0].path.encode("utf-8", "surrogateescape") == b"bad-\xff.txt"
    # a newer runner may add fields: an older operator still reads the result
    newer = json.loads(line)
    newer[RESULT_KEY]["added_later"] = True
    assert parse_pod_log(json.dumps(newer)).result == parsed.result


def test_task_log_mirror_gets_every_record_as_written(tmp_path: Path) -> None:
    import io

    from core.engine.task_log import TaskLog, read_records

    mirror = io.StringIO()
    log = TaskLog(tmp_path / "t.jsonl", task_id="t1", attempt=1, max_bytes=4096, mirror=mirror)
    log.line("stdout", "12345")
    assert mirror.getvalue().count("\n") == 1  # flushed per record, not at close
    for i in range(200):  # over the cap: head, marker, tail
        log.line("stdout", f"line {i}")
    log.close()
    assert [json.loads(x) for x in mirror.getvalue().splitlines()] == list(
        read_records(tmp_path / "t.jsonl")
    )
    assert mirror.getvalue().encode() == (tmp_path / "t.jsonl").read_bytes()
    events = [r.get("event") for r in parse_pod_log(mirror.getvalue()).records]
    assert events.count("output_truncated") == 1 and events[0] is None and events[-1] is None

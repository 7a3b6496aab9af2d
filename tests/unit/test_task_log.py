"""core.engine.task_log: per-task JSONL output with a byte cap and explicit truncation."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from core.engine.process_group import run_process_group
from core.engine.redaction import Redactor
from core.engine.task_log import PrefixedSink, TaskLog, read_records

T0 = datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def records(path: Path) -> list[dict]:
    return list(read_records(path))


def test_records_carry_task_attempt_stream(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "execution" / "t1.jsonl"
    with TaskLog(path, task_id="t1", attempt=2, max_bytes=10_000, now=lambda: T0) as log:
        log.line("stdout", "hello")
        log.line("stderr", "oops")
        log.note("attempt_started", adapter="a1")
    recs = records(path)
    assert recs == [
        {
            "ts": "2025-01-01T12:00:00.123+00:00",
            "task_id": "t1",
            "attempt": 2,
            "stream": "stdout",
            "line": "hello",
        },
        {
            "ts": "2025-01-01T12:00:00.123+00:00",
            "task_id": "t1",
            "attempt": 2,
            "stream": "stderr",
            "line": "oops",
        },
        {
            "ts": "2025-01-01T12:00:00.123+00:00",
            "task_id": "t1",
            "attempt": 2,
            "stream": "orchestrator",
            "event": "attempt_started",
            "adapter": "a1",
        },
    ]
    # every byte written counts, framing included: the size of the file
    assert log.written == path.stat().st_size
    assert not log.truncated


def test_records_are_flushed_as_written(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    log = TaskLog(path, task_id="t", attempt=1, max_bytes=10_000)
    log.line("stdout", "visible before close")
    # Another reader (``orchestrator logs -f``, or a crash) sees it now.
    assert [r["line"] for r in records(path)] == ["visible before close"]
    log.close()


def test_attempts_append_to_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    for attempt in (1, 2):
        with TaskLog(path, task_id="t", attempt=attempt, max_bytes=1000) as log:
            log.line("stdout", f"attempt {attempt}")
    assert [(r["attempt"], r["line"]) for r in records(path)] == [
        (1, "attempt 1"),
        (2, "attempt 2"),
    ]


def test_empty_lines_cost_their_framing_and_stay_within_the_cap(tmp_path: Path) -> None:
    """The cap counts records, not line text: empty lines cannot flood the disk."""
    path = tmp_path / "t.jsonl"
    cap = 64 * 1024
    with TaskLog(path, task_id="t", attempt=1, max_bytes=cap) as log:
        log.note("attempt_started", adapter="a")
        for _ in range(100_000):
            log.line("stdout", "")
    size = path.stat().st_size
    assert size <= cap and log.written == size
    recs = records(path)
    markers = [r for r in recs if r.get("event") == "output_truncated"]
    assert len(markers) == 1
    kept = sum(1 for r in recs if "line" in r)
    assert markers[0]["dropped_records"] == 100_000 - kept
    assert log.truncated and log.dropped == markers[0]["dropped_bytes"]


def test_head_and_tail_kept_in_order_around_one_marker(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    n = 5000
    with TaskLog(path, task_id="t", attempt=1, max_bytes=32 * 1024) as log:
        for i in range(n):
            log.line("stdout", f"L{i}")
    recs = records(path)
    cut = next(i for i, r in enumerate(recs) if r.get("event") == "output_truncated")
    head = [int(r["line"][1:]) for r in recs[:cut]]
    tail = [int(r["line"][1:]) for r in recs[cut + 1 :]]
    assert head == list(range(len(head))) and head  # a prefix
    assert tail == list(range(n - len(tail), n)) and tail  # a suffix, up to the last line
    assert recs[cut]["dropped_records"] == n - len(head) - len(tail)
    assert recs[cut]["section"] == "adapter"
    assert path.stat().st_size <= 32 * 1024


def test_cap_counts_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=8 * 1024) as log:
        for _ in range(200):
            log.line("stdout", "€" * 20)  # 60 bytes of text per line
    assert path.stat().st_size <= 8 * 1024 and log.truncated


def test_no_truncation_no_markers(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=10_000) as log:
        for i in range(20):
            log.line("stdout", f"x{i}")
    recs = records(path)
    assert [r.get("event") for r in recs] == [None] * 20
    assert [r["line"] for r in recs] == [f"x{i}" for i in range(20)]
    assert not log.truncated


def test_each_gate_check_has_its_own_cap_and_order_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=16 * 1024, section_bytes=8 * 1024) as log:
        for i in range(1000):
            log.line("stdout", f"adapter {i}")
        log.end_section()
        log.note("diff_captured", bytes=1)
        for name in ("lint", "unit"):
            sink = log.section(f"gate:{name}")
            for i in range(1000):
                sink.line("stdout", f"{name} {i}")
    recs = records(path)
    markers = [r for r in recs if r.get("event") == "output_truncated"]
    assert [m["section"] for m in markers] == ["adapter", "gate:lint", "gate:unit"]
    assert [m["limit"] for m in markers[1:]] == [8 * 1024, 8 * 1024]
    streams = [r["stream"] for r in recs]
    # the adapter's tail is written before our note and before the gate's output
    last_adapter = max(i for i, s in enumerate(streams) if s == "stdout")
    first_gate = streams.index("gate:lint:stdout")
    assert last_adapter < streams.index("orchestrator", last_adapter) < first_gate
    assert recs[last_adapter]["line"] == "adapter 999"
    assert [r["line"] for r in recs if r["stream"] == "gate:unit:stdout"][-1] == "unit 999"


def test_secrets_are_masked_in_lines_and_notes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    secret = "s3cr3t-value-9d1c"
    redactor = Redactor({"ORCH_TEST_API_KEY": secret})
    with TaskLog(path, task_id="t", attempt=1, max_bytes=10_000, redactor=redactor) as log:
        log.line("stdout", f"key={secret}")
        log.line("stderr", "-----BEGIN RSA PRIVATE KEY-----")
        log.line("stdout", "unrelated")
        log.line("stderr", "MIIEowIBAAKCAQEA1234")
        log.line("stderr", "-----END RSA PRIVATE KEY-----")
        log.note("attempt_not_started", error=f"auth failed with {secret}")
    text = path.read_text()
    assert secret not in text and "MIIEowIBAAKCAQEA1234" not in text
    recs = records(path)
    assert recs[0]["line"] == "key=[REDACTED:ORCH_TEST_API_KEY]"
    assert recs[2]["line"] == "unrelated"  # another stream is not inside the key block
    assert recs[3]["line"] == "[REDACTED:private key]"
    assert recs[-1]["error"] == "auth failed with [REDACTED:ORCH_TEST_API_KEY]"


def test_prefixed_sink_names_the_gate_check(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=1000) as log:
        PrefixedSink(log, "gate:lint").line("stderr", "E501")
    assert records(path)[0]["stream"] == "gate:lint:stderr"


def test_read_records_skips_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=1000) as log:
        log.line("stdout", "one")
        log.line("stdout", "two")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"ts": "2025-01-01T00:00:00", "task_id": "t", "stre')
    assert [r["line"] for r in records(path)] == ["one", "two"]


def test_read_records_missing_file(tmp_path: Path) -> None:
    assert records(tmp_path / "absent.jsonl") == []


def test_non_ascii_is_written_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=1000) as log:
        log.line("stdout", "привет")
    assert "привет".encode() in path.read_bytes()
    assert records(path)[0]["line"] == "привет"


def test_huge_output_through_process_group_stays_under_cap(tmp_path: Path) -> None:
    """~5 MB of output through a real process: the file stays within the cap."""
    path = tmp_path / "logs" / "big.jsonl"
    cap = 64 * 1024
    n_lines, width = 50_000, 99  # ~5 MB of output
    child = [
        sys.executable,
        "-c",
        f"import sys\nfor i in range({n_lines}): sys.stdout.write('q' * {width} + '\\n')",
    ]
    log = TaskLog(path, task_id="big", attempt=1, max_bytes=cap)
    result = run_process_group(
        child,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=20,
        sink=log,
    )
    log.close()
    assert result.exit_code == 0 and not result.timed_out

    assert log.written == path.stat().st_size <= cap
    assert log.truncated
    recs = records(path)
    kept = [r["line"] for r in recs if "line" in r]
    assert kept[0] == "q" * width and kept[-1] == "q" * width
    markers = [r for r in recs if r.get("event") == "output_truncated"]
    assert len(markers) == 1 and markers[0]["dropped_records"] == n_lines - len(kept)
    assert all(json.loads(raw) for raw in path.read_text().splitlines())

"""core.engine.task_log: per-task JSONL output with a byte cap and explicit truncation."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from core.engine.process_group import run_process_group
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
    assert log.written == len("hello") + len("oops")
    assert not log.truncated


def test_records_are_flushed_as_written(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    log = TaskLog(path, task_id="t", attempt=1, max_bytes=1000)
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


def test_byte_cap_one_marker_and_dropped_count(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    log = TaskLog(path, task_id="t", attempt=1, max_bytes=100)
    for i in range(10):
        log.line("stdout", f"{i}" * 30)
    assert log.truncated
    assert log.written == 90
    assert log.dropped == 7 * 30
    log.close()

    recs = records(path)
    lines = [r for r in recs if "line" in r]
    markers = [r for r in recs if r.get("event") == "output_truncated"]
    dropped = [r for r in recs if r.get("event") == "output_dropped"]
    assert [r["line"] for r in lines] == ["0" * 30, "1" * 30, "2" * 30]
    assert len(markers) == 1
    assert markers[0]["limit"] == 100 and markers[0]["stream"] == "orchestrator"
    assert len(dropped) == 1 and dropped[0]["bytes"] == 210
    # Marker right after the last kept line, the count last.
    assert recs.index(markers[0]) == 3
    assert recs[-1] is dropped[0]


def test_cap_counts_utf8_bytes_not_characters(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=10) as log:
        log.line("stdout", "€€€")  # 9 bytes
        log.line("stdout", "éé")  # 4 bytes: over the cap
        assert log.written == 9
        assert log.dropped == 4
    assert [r.get("line") for r in records(path) if "line" in r] == ["€€€"]


def test_no_truncation_no_markers(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TaskLog(path, task_id="t", attempt=1, max_bytes=100) as log:
        log.line("stdout", "x" * 100)  # exactly at the cap is fine
    recs = records(path)
    assert [r.get("event") for r in recs] == [None]
    assert not log.truncated


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

    total = n_lines * width
    assert log.written <= cap
    assert log.written + log.dropped == total
    assert log.truncated

    recs = records(path)
    kept = [r["line"] for r in recs if "line" in r]
    assert sum(len(line.encode()) for line in kept) == log.written
    assert len(kept) == cap // width
    assert [r for r in recs if r.get("event") == "output_truncated"] != []
    assert len([r for r in recs if r.get("event") == "output_truncated"]) == 1
    assert [r["bytes"] for r in recs if r.get("event") == "output_dropped"] == [log.dropped]
    # The file is bounded by the cap plus per-record overhead, nowhere near the 5 MB produced.
    size = path.stat().st_size
    assert size < 3 * cap
    assert all(json.loads(raw) for raw in path.read_text().splitlines())

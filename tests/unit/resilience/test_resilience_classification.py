"""Failure classification: precedence, breaker accounting, detectors and entry points."""

from __future__ import annotations

import logging
import sys
import textwrap
import types
from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.engine.resilience.classification import (
    COUNTED_CLASSES,
    MAX_MESSAGE_CHARS,
    Classification,
    FailureEvidence,
    NamedDetector,
    classify_evidence,
)
from core.engine.resilience.detectors import (
    ENTRY_POINT_GROUP,
    classify,
    default_detectors,
    load_detectors,
)
from core.engine.resilience.plugins.builtin import (
    BUILTIN_DETECTOR,
    last_python_exception,
    throttling_line,
)
from core.models import FailureClass

OK = FailureEvidence(exit_code=0, diff_empty=False, gate_passed=True)


# --------------------------------------------------------------------------- built-in rules


def test_clean_attempt_is_success() -> None:
    result = classify(OK, detectors=())
    assert result.failure_class is None
    assert result.succeeded
    assert not result.counts_against_adapter


def test_empty_diff_allowed_by_task_is_success() -> None:
    result = classify(replace(OK, diff_empty=True, allow_empty_diff=True), detectors=())
    assert result.succeeded


def test_no_gate_and_no_diff_info_is_success() -> None:
    assert classify(FailureEvidence(exit_code=0), detectors=()).succeeded


@pytest.mark.parametrize(
    ("evidence", "expected", "fragment"),
    [
        (FailureEvidence(cancelled=True), FailureClass.CANCELLED, "cancelled"),
        (FailureEvidence(start_error="aider: not found"), FailureClass.INFRASTRUCTURE, "aider"),
        (
            FailureEvidence(infrastructure_reason="Evicted: node low on memory"),
            FailureClass.INFRASTRUCTURE,
            "Evicted",
        ),
        (FailureEvidence(timed_out=True, signal=15), FailureClass.ADAPTER_TIMEOUT, "time"),
        (FailureEvidence(exit_code=2), FailureClass.ADAPTER_ERROR, "code 2"),
        (FailureEvidence(signal=9), FailureClass.ADAPTER_ERROR, "SIGKILL"),
        (FailureEvidence(exit_code=-11), FailureClass.ADAPTER_ERROR, "SIGSEGV"),
        (FailureEvidence(exit_code=0, diff_empty=True), FailureClass.EMPTY_DIFF, "nothing"),
        (
            FailureEvidence(
                exit_code=0,
                diff_empty=False,
                gate_passed=False,
                gate_failed_checks=("ruff", "pytest"),
            ),
            FailureClass.GATE_FAILED,
            "ruff, pytest",
        ),
    ],
)
def test_each_class(evidence: FailureEvidence, expected: FailureClass, fragment: str) -> None:
    result = classify(evidence, detectors=())
    assert result.failure_class is expected
    assert fragment in result.message
    assert result.counts_against_adapter is (expected in COUNTED_CLASSES)


@pytest.mark.parametrize(
    ("evidence", "expected"),
    [
        (
            FailureEvidence(cancelled=True, start_error="x", timed_out=True, exit_code=1),
            FailureClass.CANCELLED,
        ),
        (
            FailureEvidence(infrastructure_reason="NodeLost", timed_out=True, exit_code=137),
            FailureClass.INFRASTRUCTURE,
        ),
        (
            FailureEvidence(timed_out=True, exit_code=1, diff_empty=True),
            FailureClass.ADAPTER_TIMEOUT,
        ),
        (
            FailureEvidence(exit_code=1, diff_empty=True, gate_passed=False),
            FailureClass.ADAPTER_ERROR,
        ),
        (FailureEvidence(exit_code=0, diff_empty=True, gate_passed=False), FailureClass.EMPTY_DIFF),
    ],
)
def test_precedence(evidence: FailureEvidence, expected: FailureClass) -> None:
    assert classify(evidence, detectors=()).failure_class is expected


def test_infrastructure_and_gate_do_not_count_against_adapter() -> None:
    for evidence in (
        FailureEvidence(start_error="worktree failed"),
        FailureEvidence(exit_code=0, diff_empty=False, gate_passed=False),
        FailureEvidence(exit_code=0, diff_empty=True),
        FailureEvidence(cancelled=True),
    ):
        assert not classify(evidence, detectors=()).counts_against_adapter


def test_long_messages_are_clipped() -> None:
    result = classify(FailureEvidence(start_error="x" * 5000), detectors=())
    assert len(result.message) == MAX_MESSAGE_CHARS
    assert result.message.endswith("...")


def _reference(e: FailureEvidence) -> FailureClass | None:
    """The documented precedence, written independently of the implementation."""
    if e.cancelled:
        return FailureClass.CANCELLED
    if e.start_error is not None or e.infrastructure_reason is not None:
        return FailureClass.INFRASTRUCTURE
    if e.timed_out:
        return FailureClass.ADAPTER_TIMEOUT
    if e.signal is not None or (e.exit_code is not None and e.exit_code != 0):
        return FailureClass.ADAPTER_ERROR
    if e.diff_empty and not e.allow_empty_diff:
        return FailureClass.EMPTY_DIFF
    if e.gate_passed is False:
        return FailureClass.GATE_FAILED
    return None


evidence_strategy = st.builds(
    FailureEvidence,
    exit_code=st.none() | st.integers(-64, 255),
    signal=st.none() | st.integers(1, 64),
    timed_out=st.booleans(),
    cancelled=st.booleans(),
    start_error=st.none() | st.text(max_size=20),
    infrastructure_reason=st.none() | st.text(max_size=20),
    diff_empty=st.none() | st.booleans(),
    allow_empty_diff=st.booleans(),
    gate_passed=st.none() | st.booleans(),
    gate_failed_checks=st.lists(st.sampled_from(["lint", "unit"]), max_size=2).map(tuple),
    output_tail=st.text(max_size=200),
)


@given(evidence_strategy)
def test_property_classification_follows_documented_precedence(e: FailureEvidence) -> None:
    result = classify_evidence(e)
    assert result.failure_class is _reference(e)
    assert result.counts_against_adapter is (result.failure_class in COUNTED_CLASSES)
    assert len(result.message) <= MAX_MESSAGE_CHARS


@given(evidence_strategy)
def test_property_builtin_detector_never_breaks_the_rules(e: FailureEvidence) -> None:
    base = classify_evidence(e)
    refined = classify(e, detectors=[BUILTIN_DETECTOR])
    if base.failure_class in (None, FailureClass.CANCELLED, FailureClass.INFRASTRUCTURE):
        assert refined.failure_class is base.failure_class
    else:
        assert refined.failure_class is not None
        assert refined.failure_class is not FailureClass.CANCELLED


# --------------------------------------------------------------------------- detectors


def _to_infra(evidence: FailureEvidence, c: Classification, /) -> Classification | None:
    return Classification.failure(FailureClass.INFRASTRUCTURE, "custom: flaky network")


def test_detector_refines_class_and_message() -> None:
    result = classify(FailureEvidence(exit_code=1), detectors=[NamedDetector("net", _to_infra)])
    assert result.failure_class is FailureClass.INFRASTRUCTURE
    assert result.message == "custom: flaky network"
    assert not result.counts_against_adapter
    assert result.refined_by == ("net",)


def test_detectors_are_not_consulted_on_success_or_cancel() -> None:
    calls: list[FailureEvidence] = []

    def spy(evidence: FailureEvidence, c: Classification, /) -> Classification | None:
        calls.append(evidence)
        return Classification.failure(FailureClass.ADAPTER_ERROR, "nope")

    assert classify(OK, detectors=[spy]).succeeded
    assert classify(FailureEvidence(cancelled=True), detectors=[spy]).failure_class is (
        FailureClass.CANCELLED
    )
    assert calls == []


def test_detector_exception_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    def boom(evidence: FailureEvidence, c: Classification, /) -> Classification | None:
        raise RuntimeError("plugin bug")

    with caplog.at_level(logging.WARNING):
        result = classify(
            FailureEvidence(exit_code=3),
            detectors=[NamedDetector("boom", boom), NamedDetector("net", _to_infra)],
        )
    assert result.failure_class is FailureClass.INFRASTRUCTURE  # later detectors still ran
    assert result.refined_by == ("net",)
    assert "boom" in caplog.text and "raised" in caplog.text


@pytest.mark.parametrize(
    "answer",
    [
        Classification.success(),
        Classification.failure(FailureClass.CANCELLED, "sneaky"),
        "not a classification",
    ],
)
def test_detector_cannot_turn_failure_into_success_or_cancel(answer: object) -> None:
    def bad(evidence: FailureEvidence, c: Classification, /) -> object:
        return answer

    result = classify(FailureEvidence(exit_code=1), detectors=[bad])  # type: ignore[list-item]
    assert result.failure_class is FailureClass.ADAPTER_ERROR
    assert result.refined_by == ()


def test_detectors_chain_in_order() -> None:
    def first(evidence: FailureEvidence, c: Classification, /) -> Classification | None:
        return replace(c, message=c.message + " [first]")

    def second(evidence: FailureEvidence, c: Classification, /) -> Classification | None:
        assert c.message.endswith("[first]")
        return replace(c, message=c.message + " [second]")

    result = classify(FailureEvidence(exit_code=1), detectors=[first, second])
    assert result.message.endswith("[first] [second]")
    assert len(result.refined_by) == 2


def test_detector_returning_none_changes_nothing() -> None:
    result = classify(FailureEvidence(exit_code=1), detectors=[lambda e, c: None])
    assert result == classify_evidence(FailureEvidence(exit_code=1))


# --------------------------------------------------------------------------- entry points


class _ClassDetector:
    def __call__(self, evidence: FailureEvidence, c: Classification, /) -> Classification | None:
        return replace(c, message="from class detector")


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("fake_orch_detectors")
    module.to_infra = _to_infra  # type: ignore[attr-defined]
    module.ClassDetector = _ClassDetector  # type: ignore[attr-defined]
    module.not_callable = 42  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_orch_detectors", module)
    return "fake_orch_detectors"


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_load_detectors_from_fake_entry_points(
    fake_module: str, caplog: pytest.LogCaptureFixture
) -> None:
    eps = [
        _ep("z-infra", f"{fake_module}:to_infra"),
        _ep("a-class", f"{fake_module}:ClassDetector"),
        _ep("missing", "no_such_module_xyz:detect"),
        _ep("number", f"{fake_module}:not_callable"),
    ]
    seen_groups: list[str] = []

    def source(group: str) -> list[EntryPoint]:
        seen_groups.append(group)
        return eps

    with caplog.at_level(logging.WARNING):
        detectors = load_detectors(source=source)
    assert seen_groups == [ENTRY_POINT_GROUP]
    assert [d.name for d in detectors] == ["a-class", "z-infra"]  # sorted, broken ones skipped
    assert "missing" in caplog.text and "number" in caplog.text
    result = classify(FailureEvidence(exit_code=1), detectors=detectors)
    assert result.failure_class is FailureClass.INFRASTRUCTURE
    assert result.refined_by == ("a-class", "z-infra")


def test_load_detectors_discovers_installed_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "acme_detect.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import replace

            def detect(evidence, classification):
                return replace(classification, message="acme saw it")
            """
        )
    )
    dist = tmp_path / "acme_detect-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-detect\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nacme = acme_detect:detect\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    detectors = load_detectors()
    assert "acme" in [d.name for d in detectors]
    acme = next(d for d in detectors if d.name == "acme")
    assert classify(FailureEvidence(exit_code=1), detectors=[acme]).message == "acme saw it"


def test_default_detectors_start_with_builtin() -> None:
    detectors = default_detectors()
    assert detectors[0] is BUILTIN_DETECTOR
    assert default_detectors() is detectors  # loaded once
    throttled = FailureEvidence(exit_code=1, output_tail="Error: 429 Too Many Requests")
    assert classify(throttled).failure_class is FailureClass.INFRASTRUCTURE


# --------------------------------------------------------------------------- built-in plugin

TRACEBACK = """\
Running aider...
Traceback (most recent call last):
  File "/usr/bin/aider", line 8, in <module>
    sys.exit(main())
             ^^^^^^
  File "/usr/lib/aider/main.py", line 12, in main
    cfg["model"]
KeyError: 'model'
"""


def test_builtin_names_python_exception() -> None:
    result = classify(FailureEvidence(exit_code=1, output_tail=TRACEBACK), [BUILTIN_DETECTOR])
    assert result.failure_class is FailureClass.ADAPTER_ERROR
    assert result.counts_against_adapter
    assert "exited with code 1" in result.message
    assert "KeyError: 'model'" in result.message
    assert result.refined_by == ("builtin",)


def test_builtin_takes_last_of_chained_tracebacks() -> None:
    chained = (
        TRACEBACK
        + "\nDuring handling of the above exception, another exception occurred:\n\n"
        + 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        + "    raise ValueError('bad config')\nmypkg.errors.ConfigError: bad config\n"
    )
    assert last_python_exception(chained) == "mypkg.errors.ConfigError: bad config"


def test_no_traceback_no_change() -> None:
    assert last_python_exception("just some output\nError: oops") is None
    result = classify(FailureEvidence(exit_code=1, output_tail="oops"), [BUILTIN_DETECTOR])
    assert result.refined_by == ()


@pytest.mark.parametrize(
    "line",
    [
        "anthropic.RateLimitError: Error code: 429 - rate_limit_error",
        "litellm.RateLimitError: rate limit exceeded for model gpt-4o",
        "HTTP 429 Too Many Requests",
        "You exceeded your current quota, please check your plan and billing details.",
        "Error code: 529 - {'type': 'error', 'error': {'type': 'overloaded_error'}}",
        "The model is currently overloaded with other requests.",
        "Claude AI usage limit reached|1735689600",
        "google.api_core.exceptions.ResourceExhausted: 429 RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Generate Content API requests'",
    ],
)
def test_builtin_throttling_becomes_infrastructure(line: str) -> None:
    evidence = FailureEvidence(exit_code=1, output_tail=f"working...\n{line}\n")
    result = classify(evidence, [BUILTIN_DETECTOR])
    assert result.failure_class is FailureClass.INFRASTRUCTURE
    assert not result.counts_against_adapter
    assert "throttled" in result.message


@pytest.mark.parametrize(
    "line",
    [
        "Added a rate limiter middleware to api/server.py",
        "def test_rate_limiting(): assert limiter.allow()",
        "Applied edit to src/quota.py",
        "Processed 429 files",
    ],
)
def test_builtin_does_not_mistake_code_talk_for_throttling(line: str) -> None:
    assert throttling_line(line) is None


def test_builtin_throttling_on_timeout_and_empty_diff() -> None:
    tail = "retrying in 30s: 429 Too Many Requests"
    for evidence in (
        FailureEvidence(timed_out=True, output_tail=tail),
        FailureEvidence(exit_code=0, diff_empty=True, output_tail=tail),
    ):
        assert classify(evidence, [BUILTIN_DETECTOR]).failure_class is FailureClass.INFRASTRUCTURE


def test_builtin_leaves_gate_failures_alone() -> None:
    evidence = FailureEvidence(
        exit_code=0,
        diff_empty=False,
        gate_passed=False,
        gate_failed_checks=("unit",),
        output_tail="429 Too Many Requests",
    )
    assert classify(evidence, [BUILTIN_DETECTOR]).failure_class is FailureClass.GATE_FAILED


def test_builtin_throttling_traceback_names_exception() -> None:
    tail = (
        'Traceback (most recent call last):\n  File "cli.py", line 3, in run\n'
        "    client.create()\nopenai.RateLimitError: Error code: 429\n"
    )
    result = classify(FailureEvidence(exit_code=1, output_tail=tail), [BUILTIN_DETECTOR])
    assert result.failure_class is FailureClass.INFRASTRUCTURE
    assert "openai.RateLimitError" in result.message


def test_diff_too_large_is_its_own_class_below_adapter_failures() -> None:
    from dataclasses import replace as _replace

    from core.engine.resilience.classification import FailureEvidence, classify_evidence
    from core.models import FailureClass

    ev = FailureEvidence(
        exit_code=0, diff_empty=False, diff_too_large_bytes=2_000_000, gate_passed=False
    )
    verdict = classify_evidence(ev)
    assert verdict.failure_class is FailureClass.DIFF_TOO_LARGE
    assert "2000000 bytes" in verdict.message and not verdict.counts_against_adapter
    assert classify_evidence(_replace(ev, exit_code=1)).failure_class is FailureClass.ADAPTER_ERROR
    assert classify_evidence(_replace(ev, timed_out=True)).failure_class is (
        FailureClass.ADAPTER_TIMEOUT
    )

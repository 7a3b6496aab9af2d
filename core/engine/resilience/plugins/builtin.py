"""The built-in error detector: Python tracebacks and AI-provider throttling.

Why these two: most adapters are Python CLIs or wrap AI APIs, and the two most useful things
to read from their output are (1) *which* exception killed the tool, so a human sees
``KeyError: 'model'`` instead of "exited with code 1", and (2) whether the provider throttled
us (HTTP 429, rate limits, exhausted quota, "overloaded"). Throttling is not the adapter's
fault and passes with time, so it is reclassified ``infrastructure``: retried on the same
adapter, after backoff, without feeding that adapter's circuit breaker.

Patterns are deliberately specific ("rate limit exceeded", "status 429") rather than bare
words, because an AI tool's output also contains the code it wrote (which may well implement
rate limiting).
"""

from __future__ import annotations

import re
from dataclasses import replace

from core.engine.resilience.classification import (
    Classification,
    FailureEvidence,
    NamedDetector,
)
from core.models import FailureClass

_TRACEBACK_HEADER = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Z]\w*)(?::\s?(.*))?$")
_MAX_DETAIL = 200

_THROTTLE_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"rate[ _-]?limit(?:ed\b|[ _-]?(?:exceeded|reached|error|hit))",
        r"(?:hit|reached|exceeded)\s+(?:the\s+|your\s+|a\s+)?(?:rate|usage)[ _-]?limit",
        r"usage[ _-]?limit[ _-]?(?:reached|exceeded)",
        r"too many requests",
        r"(?:status|code|http|error)\W{0,3}(?:code\W{0,3})?\b429\b",
        r"\b429\b\W{0,3}too many",
        r"(?:quota)\W{0,3}(?:\w+\W{1,3}){0,2}(?:exceeded|exhausted|reached)",
        r"exceeded your (?:current )?quota",
        r"insufficient_quota",
        r"resource[ _]exhausted",
        r"overloaded_error",
        r"(?:is|are|currently|server|api|model)\s+overloaded",
        r"(?:status|code|http|error)\W{0,3}(?:code\W{0,3})?\b529\b",
    )
)

#: Classes the throttling rule may turn into ``infrastructure``. A gate failure is about the
#: change itself, so throttling messages in the adapter's log do not excuse it.
_THROTTLE_APPLIES = frozenset(
    {FailureClass.ADAPTER_ERROR, FailureClass.ADAPTER_TIMEOUT, FailureClass.EMPTY_DIFF}
)


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def last_python_exception(output: str) -> str | None:
    """The ``Type: message`` line of the last Python traceback in ``output``, if any."""
    start = output.rfind(_TRACEBACK_HEADER)
    if start < 0:
        return None
    for line in output[start + len(_TRACEBACK_HEADER) :].splitlines():
        if not line.strip() or line[:1] in (" ", "\t"):
            continue  # frames, source lines and carets are indented
        match = _EXCEPTION_LINE.match(line.rstrip())
        if match:
            return _short(line)
    return None


def throttling_line(output: str) -> str | None:
    """The (last) output line showing provider throttling, if any."""
    for line in reversed(output.splitlines()):
        if any(p.search(line) for p in _THROTTLE_PATTERNS):
            return _short(line)
    return None


def detect(evidence: FailureEvidence, classification: Classification, /) -> Classification | None:
    """Name the Python exception; reclassify provider throttling as ``infrastructure``."""
    failure = classification.failure_class
    if failure is None:
        return None
    exception = (
        last_python_exception(evidence.output_tail)
        if failure is FailureClass.ADAPTER_ERROR
        else None
    )
    throttled = throttling_line(evidence.output_tail) if failure in _THROTTLE_APPLIES else None
    if throttled is not None:
        detail = exception or throttled
        return Classification.failure(
            FailureClass.INFRASTRUCTURE,
            f"AI provider throttled the adapter (rate limit/quota/overload): {detail}",
        )
    if exception is not None:
        return replace(classification, message=f"{classification.message}: raised {exception}")
    return None


BUILTIN_DETECTOR = NamedDetector("builtin", detect)

"""Decide an attempt's :class:`~core.models.FailureClass` in one place, from evidence.

Why one place: the class decides everything downstream (whether to retry, on which adapter,
whether the adapter's circuit breaker is fed, what the task, DB, ledger and events say). If the
embedded backend and the Kubernetes backend each guessed on their own, the same crash would be
retried on one and not on the other. Both backends therefore reduce what they saw to a
:class:`FailureEvidence` and call :func:`classify`.

Precedence, highest first (the first that applies wins)::

    cancelled > infrastructure > adapter_timeout > adapter_error > diff_too_large
      > empty_diff > gate_failed

* ``cancelled``: an operator asked for it; nothing else matters.
* ``infrastructure``: the platform failed (could not start, evicted, node lost, image pull,
  OOM-killed by the platform, pod deleted). A timeout or exit code seen afterwards is a symptom.
* ``adapter_timeout``: the budget ran out; the kill signal / exit code that follows is ours.
* ``adapter_error``: the tool exited non-zero or died of a signal, or the adapter named its
  own failure (``adapter_error``: an ``api`` adapter's HTTP error or unusable reply).
* ``diff_too_large``: the tool exited cleanly but its diff exceeded the hard limit of what is
  kept; nothing was stored, and a change that cannot be kept is not judged.
* ``empty_diff``: the tool exited cleanly but changed nothing (unless the task allows it).
* ``gate_failed``: the change exists but the acceptance checks failed.

Classification is extensible: *error detectors* (the seed's phase-6 hooks) may refine a
failure's class and message from the captured output (:func:`refine`). A detector can never
turn a failure into a success, a success into a failure, or touch a cancellation, and a
detector that raises is logged and skipped. Which detectors run -- the built-in one and those
registered under an entry point -- is :mod:`core.engine.resilience.detectors`' business;
:func:`~core.engine.resilience.detectors.classify` is the entry point for both backends.
"""

from __future__ import annotations

import logging
import signal as signal_module
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from core.models import FailureClass, TaskState

logger = logging.getLogger(__name__)

#: Classes that feed the adapter's circuit breaker: the adapter itself misbehaved.
COUNTED_CLASSES: frozenset[FailureClass] = frozenset(
    {FailureClass.ADAPTER_ERROR, FailureClass.ADAPTER_TIMEOUT}
)

#: Longest message a classification carries (it ends up in DB rows, events and CR status).
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class FailureEvidence:
    """Everything a backend observed about one finished attempt (nothing interpreted yet)."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    #: The attempt could not start (missing binary, worktree failed, spawn error...).
    start_error: str | None = None
    #: A platform reason from Kubernetes (Evicted, NodeLost, ImagePullBackOff, OOMKilled...).
    infrastructure_reason: str | None = None
    #: The adapter failed for a reason it could name (an ``api`` adapter: HTTP error, no diff
    #: in the reply, a diff that does not apply).
    adapter_error: str | None = None
    #: None: no diff was taken (e.g. the attempt never got that far).
    diff_empty: bool | None = None
    #: The diff exceeded the hard limit (its size, in bytes; None: within it).
    diff_too_large_bytes: int | None = None
    allow_empty_diff: bool = False
    #: None: the gate did not run.
    gate_passed: bool | None = None
    gate_failed_checks: tuple[str, ...] = ()
    #: The last few KiB of the adapter's output, for detectors.
    output_tail: str = ""

    @property
    def effective_signal(self) -> int | None:
        """The terminating signal, also when only a negative ``returncode`` says so."""
        if self.signal is not None:
            return self.signal
        if self.exit_code is not None and self.exit_code < 0:
            return -self.exit_code
        return None


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one attempt. ``failure_class is None`` means success."""

    failure_class: FailureClass | None
    message: str
    counts_against_adapter: bool
    #: Names of the detectors that changed this classification, in order.
    refined_by: tuple[str, ...] = ()

    @property
    def succeeded(self) -> bool:
        return self.failure_class is None

    @classmethod
    def success(cls, message: str = "succeeded") -> Classification:
        return cls(None, message, counts_against_adapter=False)

    @classmethod
    def failure(cls, failure_class: FailureClass, message: str) -> Classification:
        """A failure with the default breaker accounting for its class."""
        return cls(
            failure_class,
            _clip(message),
            counts_against_adapter=failure_class in COUNTED_CLASSES,
        )


@runtime_checkable
class ErrorDetector(Protocol):
    """A phase-6 hook: look at the evidence and the current verdict, maybe refine it.

    Return ``None`` for "no opinion", or a new :class:`Classification` (use
    :meth:`Classification.failure` or :func:`dataclasses.replace`).
    """

    def __call__(
        self, evidence: FailureEvidence, classification: Classification, /
    ) -> Classification | None: ...


@dataclass(frozen=True, slots=True)
class NamedDetector:
    """A detector with the name it is logged and recorded under."""

    name: str
    detect: ErrorDetector = field(compare=False)


DetectorLike = ErrorDetector | NamedDetector


def _clip(message: str) -> str:
    message = message.strip()
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 3] + "..."


def _signal_name(number: int) -> str:
    try:
        return signal_module.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify_evidence(evidence: FailureEvidence) -> Classification:
    """The built-in rules only, in the documented precedence (no detectors)."""
    if evidence.cancelled:
        return Classification.failure(FailureClass.CANCELLED, "attempt was cancelled")
    if evidence.start_error is not None:
        return Classification.failure(
            FailureClass.INFRASTRUCTURE,
            f"could not start the attempt: {evidence.start_error}",
        )
    if evidence.infrastructure_reason is not None:
        return Classification.failure(
            FailureClass.INFRASTRUCTURE,
            f"platform failure: {evidence.infrastructure_reason}",
        )
    if evidence.timed_out:
        return Classification.failure(
            FailureClass.ADAPTER_TIMEOUT,
            "adapter did not finish within its time budget",
        )
    if evidence.adapter_error is not None:
        return Classification.failure(FailureClass.ADAPTER_ERROR, evidence.adapter_error)
    sig = evidence.effective_signal
    if sig is not None:
        return Classification.failure(
            FailureClass.ADAPTER_ERROR, f"adapter was killed by {_signal_name(sig)}"
        )
    if evidence.exit_code is not None and evidence.exit_code != 0:
        return Classification.failure(
            FailureClass.ADAPTER_ERROR, f"adapter exited with code {evidence.exit_code}"
        )
    if evidence.diff_too_large_bytes is not None:
        return Classification.failure(
            FailureClass.DIFF_TOO_LARGE,
            f"the diff exceeded the hard limit ({evidence.diff_too_large_bytes} bytes seen); "
            "nothing was kept (raise --max-diff-bytes or split the task)",
        )
    if evidence.diff_empty is True and not evidence.allow_empty_diff:
        return Classification.failure(
            FailureClass.EMPTY_DIFF, "adapter finished but changed nothing"
        )
    if evidence.gate_passed is False:
        checks = ", ".join(evidence.gate_failed_checks) or "unnamed checks"
        return Classification.failure(FailureClass.GATE_FAILED, f"test gate failed: {checks}")
    return Classification.success()


def _detector_name(detector: DetectorLike) -> str:
    if isinstance(detector, NamedDetector):
        return detector.name
    return getattr(detector, "__qualname__", None) or type(detector).__qualname__


def _accept(name: str, before: Classification, after: object) -> Classification | None:
    """Check a detector's answer against the rules; ``None`` means ignore it."""
    if after is None:
        return None
    if not isinstance(after, Classification):
        logger.warning("error detector %s returned %r, not a Classification", name, after)
        return None
    if after.failure_class is None:
        logger.warning("error detector %s tried to turn a failure into success; ignored", name)
        return None
    if after.failure_class is FailureClass.CANCELLED:
        logger.warning("error detector %s tried to classify as cancelled; ignored", name)
        return None
    if after == before:
        return None
    return replace(after, message=_clip(after.message), refined_by=(*before.refined_by, name))


def refine(
    evidence: FailureEvidence,
    classification: Classification,
    detectors: Iterable[DetectorLike],
) -> Classification:
    """Run ``detectors`` in order over a failure; each sees the previous one's verdict."""
    if classification.failure_class in (None, FailureClass.CANCELLED):
        return classification
    current = classification
    for detector in detectors:
        name = _detector_name(detector)
        call = detector.detect if isinstance(detector, NamedDetector) else detector
        try:
            answer = call(evidence, current)
        except Exception:  # a plugin must never break classification
            logger.warning("error detector %s raised; ignored", name, exc_info=True)
            continue
        accepted = _accept(name, current, answer)
        if accepted is not None:
            current = accepted
    return current


def task_state(classification: Classification) -> TaskState:
    """The terminal state an attempt with this classification ends in."""
    match classification.failure_class:
        case None:
            return TaskState.COMPLETED
        case FailureClass.ADAPTER_TIMEOUT:
            return TaskState.TIMEOUT
        case FailureClass.CANCELLED:
            return TaskState.CANCELLED
        case _:
            return TaskState.FAILED

"""What to do after a failed attempt: retry or not, on which adapter, after how long.

Why a pure function: the decision depends on the policy, the task's attempt history, the
adapter chain, the remaining budget and the breakers, and it must come out the same on the
embedded and the Kubernetes backend and in crash recovery. Keeping it free of I/O and sleeping
lets the executor own the waiting and lets tests (including hypothesis) explore it exhaustively.

Rules (defaults follow :class:`core.models.RetryPolicy`):

* Only classes in ``policy.retry_on`` are retried; ``cancelled`` never is, ``gate_failed`` and
  ``empty_diff`` only when listed. Never more than ``policy.max_attempts`` attempts in total,
  on all adapters together.
* ``infrastructure`` and ``gate_failed`` retry the *same* adapter (the platform failed / the
  change needs fixing, with the gate's summary as extra input: :func:`gate_feedback`).
* ``adapter_error``, ``adapter_timeout`` and ``empty_diff`` move to the next fallback adapter
  of the chain when there is one, else stay on the same adapter.
* An adapter whose breaker does not admit work is skipped in favour of the next candidate; if
  no candidate admits work the decision says ``waiting_for_breaker`` (the task stays PENDING
  with a visible reason) instead of spinning.
* The backoff comes from tenacity's ``wait_exponential`` plus jitter from an injected
  :class:`random.Random`, capped at ``backoff_max_seconds`` *after* the jitter; an
  ``infrastructure`` failure waits at least ``infrastructure_backoff_seconds`` (doubling per
  retry, same cap): the platform or a dependency may still be coming up. A retry whose
  delay would leave less than ``min_attempt_seconds`` of the task budget is not made.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_base, wait_exponential

from core.engine.resilience.classification import Classification
from core.models import CheckStatus, FailureClass, GateResult, RetryPolicy

#: Classes that move the task to the next fallback adapter (the adapter did the wrong thing).
SWITCHING_CLASSES: frozenset[FailureClass] = frozenset(
    {FailureClass.ADAPTER_ERROR, FailureClass.ADAPTER_TIMEOUT, FailureClass.EMPTY_DIFF}
)

#: An attempt that would get less than this many seconds of budget is not worth starting.
DEFAULT_MIN_ATTEMPT_SECONDS = 1.0


class _wait_jitter(wait_base):
    """Uniform jitter in ``[0, max_seconds]`` from an injected generator (tenacity's own
    ``wait_random`` uses the global :mod:`random`, which tests cannot control)."""

    def __init__(self, max_seconds: float, rng: random.Random) -> None:
        self.max_seconds = max_seconds
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.rng.uniform(0.0, self.max_seconds) if self.max_seconds > 0 else 0.0


class BackoffSchedule:
    """The delay before each retry: ``initial * multiplier**(n-1) + jitter``, capped."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng if rng is not None else random.Random()
        self._wait = wait_exponential(
            multiplier=policy.backoff_initial_seconds,
            exp_base=policy.backoff_multiplier,
            max=policy.backoff_max_seconds,
        ) + _wait_jitter(policy.jitter_seconds, self.rng)
        self._state = RetryCallState(Retrying(), None, (), {})

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1: before the second attempt)."""
        if retry_number < 1:
            raise ValueError("retry_number starts at 1")
        self._state.attempt_number = retry_number
        raw = float(self._wait(self._state))
        return min(max(0.0, raw), self.policy.backoff_max_seconds)


@dataclass(frozen=True, slots=True)
class AdapterChain:
    """The adapters a task may use: the routed primary first, then its fallbacks."""

    adapter_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.adapter_ids:
            raise ValueError("an adapter chain needs at least the primary adapter")
        if len(set(self.adapter_ids)) != len(self.adapter_ids):
            raise ValueError(f"duplicate adapter in chain {self.adapter_ids}")

    @classmethod
    def of(cls, primary: str, fallbacks: Sequence[str] = ()) -> AdapterChain:
        """Build from a routing decision; repeated ids are dropped, order kept."""
        return cls(tuple(dict.fromkeys((primary, *fallbacks))))

    @property
    def primary(self) -> str:
        return self.adapter_ids[0]

    def preference(self, current: str, *, switch: bool) -> tuple[str, ...]:
        """Candidates for the next attempt, best first.

        ``switch``: the later fallbacks, then ``current``, then the earlier ones; else
        ``current`` first, then the chain onwards. An id not in the chain: the chain order.
        """
        if current not in self.adapter_ids:
            return self.adapter_ids
        i = self.adapter_ids.index(current)
        after, before = self.adapter_ids[i + 1 :], self.adapter_ids[:i]
        return (*after, current, *before) if switch else (current, *after, *before)


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """One finished attempt of a task, as the retry decision needs it."""

    attempt: int
    adapter_id: str
    classification: Classification


@dataclass(frozen=True, slots=True)
class AdapterSelection:
    """Which adapter the next attempt should use, and whether it must wait for a breaker."""

    adapter_id: str
    waiting_for_breaker: bool
    reason: str


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    next_adapter_id: str | None
    delay_seconds: float
    reason: str
    next_attempt: int | None = None
    failure_class: FailureClass | None = None
    #: No candidate's breaker admits work now: park the task PENDING with ``reason``, and
    #: start it when ``next_adapter_id``'s breaker admits again (no earlier than the delay).
    waiting_for_breaker: bool = False
    #: Pass :func:`gate_feedback` of the failed gate to the next attempt.
    include_gate_feedback: bool = False
    alternatives: tuple[str, ...] = field(default=(), compare=False)
    #: The retry was not made because the task's time budget would not cover it.
    budget_exhausted: bool = False


def select_adapter(candidates: Sequence[str], admits: Mapping[str, bool]) -> AdapterSelection:
    """The first candidate whose breaker admits work, else wait for the first one."""
    for adapter_id in candidates:
        if admits.get(adapter_id, True):
            return AdapterSelection(adapter_id, False, f"adapter {adapter_id} admits work")
    first = candidates[0]
    names = ", ".join(candidates)
    return AdapterSelection(
        first, True, f"circuit breaker open for every candidate adapter ({names})"
    )


def first_adapter(chain: AdapterChain, admits: Mapping[str, bool]) -> AdapterSelection:
    """The adapter for a task's first attempt: the primary, or a fallback if its breaker is open."""
    return select_adapter(chain.adapter_ids, admits)


def _stop(
    reason: str, failure_class: FailureClass | None, *, budget: bool = False
) -> RetryDecision:
    return RetryDecision(
        False, None, 0.0, reason, failure_class=failure_class, budget_exhausted=budget
    )


def decide_retry(
    policy: RetryPolicy,
    chain: AdapterChain,
    history: Sequence[AttemptOutcome],
    *,
    remaining_seconds: float,
    admits: Mapping[str, bool] | None = None,
    schedule: BackoffSchedule | None = None,
    min_attempt_seconds: float = DEFAULT_MIN_ATTEMPT_SECONDS,
) -> RetryDecision:
    """Decide about the next attempt after ``history[-1]`` (the attempt just finished).

    ``admits`` maps adapter id to whether its breaker admits work now (missing: admits).
    """
    if not history:
        raise ValueError("decide_retry needs at least the attempt that just finished")
    last = history[-1]
    failure = last.classification.failure_class
    attempts_made = max(last.attempt, len(history))
    if failure is None:
        return _stop("attempt succeeded", None)
    if failure is FailureClass.CANCELLED:
        return _stop("attempt was cancelled; cancelled tasks are not retried", failure)
    if failure not in policy.retry_on:
        return _stop(f"{failure} is not retried (not in the policy's retry_on)", failure)
    if attempts_made >= policy.max_attempts:
        return _stop(
            f"attempts exhausted ({attempts_made} of max_attempts={policy.max_attempts})",
            failure,
        )
    if schedule is None:
        schedule = BackoffSchedule(policy)
    delay = schedule.delay(attempts_made)
    if failure is FailureClass.INFRASTRUCTURE:
        floor = policy.infrastructure_backoff_seconds * policy.backoff_multiplier ** (
            attempts_made - 1
        )
        delay = max(delay, min(floor, policy.backoff_max_seconds))
    if remaining_seconds - delay < max(min_attempt_seconds, 0.0) or remaining_seconds <= delay:
        return _stop(
            f"task budget exhausted: a {delay:.2f}s backoff would leave too little of the "
            f"remaining {max(remaining_seconds, 0.0):.2f}s",
            failure,
            budget=True,
        )
    switch = failure in SWITCHING_CLASSES
    candidates = chain.preference(last.adapter_id, switch=switch)
    selection = select_adapter(candidates, admits or {})
    target = selection.adapter_id
    if target == last.adapter_id:
        where = f"the same adapter {target}"
    elif chain.adapter_ids.index(target) > 0:
        where = f"fallback adapter {target}"
    else:
        where = f"adapter {target}"
    reason = (
        f"{failure} on {last.adapter_id} (attempt {attempts_made}): "
        f"retry as attempt {attempts_made + 1} on {where} after {delay:.2f}s"
    )
    if selection.waiting_for_breaker:
        reason += f"; waiting: {selection.reason}"
    return RetryDecision(
        retry=True,
        next_adapter_id=target,
        delay_seconds=delay,
        reason=reason,
        next_attempt=attempts_made + 1,
        failure_class=failure,
        waiting_for_breaker=selection.waiting_for_breaker,
        include_gate_feedback=failure is FailureClass.GATE_FAILED,
        alternatives=tuple(c for c in candidates if c != target),
    )


def gate_feedback(gate: GateResult, *, max_chars: int = 4000) -> str:
    """The extra input for an attempt that follows a gate failure: what failed and why.

    Bounded to ``max_chars``; every failed check is named even when its output is cut.
    """
    header = ["The previous attempt's change failed the test gate. Fix these problems:"]
    if not gate.applied:
        header.append("- the diff did not apply cleanly to a fresh checkout of the base commit")
    failed = [
        c for c in gate.checks if c.status not in (CheckStatus.PASSED, CheckStatus.PRE_EXISTING)
    ]
    for check in failed:
        code = "" if check.exit_code is None else f", exit code {check.exit_code}"
        header.append(f"- check {check.name!r}: {check.status}{code}")
    text = "\n".join(header)
    tails = [(c.name, c.output_tail.strip()) for c in failed if c.output_tail.strip()]
    if tails:
        room = max(0, max_chars - len(text)) // len(tails)
        for name, tail in tails:
            budget = room - len(name) - 40
            if budget <= 0:
                break
            shown = tail if len(tail) <= budget else "..." + tail[-(budget - 3) :]
            text += f"\n\nOutput of {name!r} (last part):\n{shown}"
    return text[:max_chars]

"""One time budget per task, spanning all of its attempts and the backoff between them.

Why: a per-attempt timeout alone lets a task with five attempts and a 30-minute adapter
timeout run for 2.5 hours plus backoff. The seed gives each *task* a budget; every attempt gets
what is left of it, never more, and a retry whose backoff would eat the rest is not started.

The deadline is on an injected monotonic clock (immune to wall-clock jumps). A monotonic
reading does not survive a restart, so after crash recovery the executor rebuilds the budget
with :meth:`TaskBudget.resume` from the time already spent (wall-clock ``started_at`` of the
task, or the sum of recorded attempt durations and backoffs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class TaskBudget:
    """A deadline on a monotonic clock; ask :meth:`remaining` before each attempt."""

    total_seconds: float
    deadline: float
    clock: Clock = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def start(cls, total_seconds: float, clock: Clock = time.monotonic) -> TaskBudget:
        return cls.resume(total_seconds, 0.0, clock)

    @classmethod
    def resume(
        cls, total_seconds: float, spent_seconds: float, clock: Clock = time.monotonic
    ) -> TaskBudget:
        """A budget of which ``spent_seconds`` are already gone (e.g. before a restart)."""
        if not math.isfinite(total_seconds) or total_seconds <= 0:
            raise ValueError(f"a task budget must be a positive number, not {total_seconds!r}")
        spent = max(0.0, spent_seconds)
        return cls(total_seconds, clock() + total_seconds - spent, clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.deadline - self.clock())

    def spent(self) -> float:
        return min(self.total_seconds, self.total_seconds - (self.deadline - self.clock()))

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def attempt_timeout(self, adapter_timeout_seconds: float | None = None) -> float:
        """The timeout to give the next attempt: what remains, capped by the adapter's own."""
        remaining = self.remaining()
        if adapter_timeout_seconds is None:
            return remaining
        return min(remaining, adapter_timeout_seconds)

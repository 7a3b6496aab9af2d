"""When a chaos run SIGKILLs its operator process and when it starts it again (issue 11)."""

from __future__ import annotations

import random
import signal
import time

from tests.e2e.chaos_plan import Plan
from tests.e2e.operator_harness import OperatorProcess


class Killer:
    """When to SIGKILL one operator process and when to start it again.

    A share of the kills (``startup_kill_share``) lands at a random moment of the start-up
    (imports, database check, informers' first lists, the Lease); the others at a random
    moment of ``plan.uptime`` seconds after the process started leading (its log says so), so
    they hit reconciles in flight rather than an interpreter still importing.
    """

    def __init__(self, op: OperatorProcess, plan: Plan, rng: random.Random) -> None:
        self.op = op
        self.plan = plan
        self.rng = rng
        self.kill_at: float | None = None
        self.after_leading: float | None = None
        self.leading_since: float | None = None
        self.restart_at: float | None = None
        self.offset = 0
        self.while_leading = 0

    def start(self) -> None:
        self.offset = self.op.log.stat().st_size if self.op.log.exists() else 0
        self.op.start()
        now = time.monotonic()
        self.leading_since = None
        if self.rng.random() < self.plan.startup_kill_share:
            self.kill_at, self.after_leading = now + self.rng.uniform(0.2, 6.0), None
        else:
            self.kill_at, self.after_leading = None, self.rng.uniform(*self.plan.uptime)

    def _leading(self) -> bool:
        if self.leading_since is None and self.op.log.exists():
            with open(self.op.log, "rb") as fh:
                fh.seek(self.offset)
                if b"started leading" in fh.read():
                    self.leading_since = time.monotonic()
        return self.leading_since is not None

    def step(self, now: float) -> bool:
        """Kill or restart when it is time; True when it killed."""
        if self.op.proc is None:
            if self.restart_at is not None and now >= self.restart_at:
                self.restart_at = None
                self.start()
            return False
        if self.kill_at is None and self._leading():
            assert self.leading_since is not None and self.after_leading is not None
            self.kill_at = self.leading_since + self.after_leading
        if self.kill_at is None or now < self.kill_at:
            return False
        if self._leading():
            self.while_leading += 1
        self.op.proc.send_signal(signal.SIGKILL)
        self.op.proc.wait(timeout=30)
        self.op.proc = None
        self.restart_at = now + self.rng.uniform(*self.plan.restart_delay)
        return True

    def ensure_running(self) -> None:
        if self.op.proc is None:
            self.restart_at = None
            self.start()

"""The backend interface: how the engine runs one attempt of one task.

Like a transport in httpx, a backend knows *where* an attempt runs (a local process group in
a git worktree, or a Kubernetes Job) and nothing about retries, budget, gate decisions, state,
ledger or database: those belong to the lifecycle (``core.engine.lifecycle``) and the
recorder. An attempt runs in two steps, like the operator's adapter Job and gate Job: the
adapter (:meth:`ExecutionBackend.run_adapter`), then, when the lifecycle says the diff is
worth judging, the test gate (:meth:`ExecutionBackend.run_gate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.engine.redaction import SHAPES_ONLY, Redactor
from core.engine.workspace import CapturedDiff
from core.identity import TaskKey
from core.models import (
    AdapterSpec,
    DiffSummary,
    GateCheck,
    GateResult,
    IsolationLevel,
    TaskSpec,
    TokenUsage,
)


@dataclass(frozen=True)
class AttemptRequest:
    key: TaskKey
    task: TaskSpec
    adapter: AdapterSpec
    attempt: int
    repo_url: str
    timeout_seconds: float
    gate_checks: tuple[GateCheck, ...]
    gate_baseline: bool
    #: Cap of the attempt's log (adapter output and notes, framing included).
    max_log_bytes: int
    #: Hard limit of the diff: a larger one is not kept (the attempt is diff_too_large).
    max_diff_bytes: int
    extra_input: str | None = None
    #: Masks the secrets the adapter receives in everything the attempt writes.
    redactor: Redactor = SHAPES_ONLY
    #: Cap of each gate check's output in the log (None: ``max_log_bytes``).
    max_gate_log_bytes: int | None = None

    @property
    def run_id(self) -> str:
        return self.key.run_id


@dataclass(frozen=True)
class AttemptOutcome:
    """Evidence about the adapter step of one attempt; the lifecycle classifies it.

    A kept diff is already in the evidence store: ``diff.summary.patch_ref`` names it."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    start_error: str | None = None
    infrastructure_reason: str | None = None
    duration_seconds: float = 0.0
    output_tail: str = ""
    diff: CapturedDiff | None = None
    log_path: Path | None = None
    log_bytes: int = 0
    log_truncated: bool = False
    #: ``api`` adapters: a failure the adapter named, the server's Retry-After, token usage.
    adapter_error: str | None = None
    retry_after_seconds: float | None = None
    usage: TokenUsage | None = None
    #: How the attempt's processes were confined (None: the backend does not say).
    isolation: IsolationLevel | None = None


@dataclass
class AdapterRun:
    """An attempt after its adapter step: the evidence, and what the gate step needs."""

    outcome: AttemptOutcome
    #: Backend-private state kept for the gate step and :meth:`ExecutionBackend.release`.
    handle: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class LogCounts:
    """The attempt's task log once closed (adapter and gate output together)."""

    path: Path | None
    bytes: int
    truncated: bool


class AttemptHooks(Protocol):
    """Callbacks into the executor while an attempt runs."""

    def started(self, pgid: int | None, workspace: Path | None) -> None: ...

    def validating(self, diff: DiffSummary) -> None: ...


class ExecutionBackend(Protocol):
    name: str

    def run_adapter(self, request: AttemptRequest, hooks: AttemptHooks) -> AdapterRun: ...

    def run_gate(self, request: AttemptRequest, run: AdapterRun) -> GateResult: ...

    def release(self, run: AdapterRun) -> LogCounts:
        """Close the attempt's log and remove its worktrees (after the gate, if any)."""
        ...

    def cleanup_attempt(self, key: TaskKey, attempt: int) -> None:
        """Remove what an interrupted attempt left behind (worktrees, processes)."""
        ...

    def drain(self) -> None:
        """Wait until what :meth:`release` removes in the background is gone."""
        ...

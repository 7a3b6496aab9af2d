"""The backend interface: how the engine runs one attempt of one task.

Like a transport in httpx, a backend knows *where* an attempt runs (a local process group in
a git worktree, or a Kubernetes Job) and nothing about retries, state, ledger or database,
which the executor owns. Both backends return the same evidence, so classification, gate
semantics and recording are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.engine.workspace import CapturedDiff
from core.models import AdapterSpec, DiffSummary, GateCheck, GateResult, TaskSpec


@dataclass(frozen=True)
class AttemptRequest:
    run_id: str
    task: TaskSpec
    adapter: AdapterSpec
    attempt: int
    repo_url: str
    timeout_seconds: float
    gate_checks: tuple[GateCheck, ...]
    gate_baseline: bool
    max_log_bytes: int
    max_diff_bytes: int
    extra_input: str | None = None


@dataclass(frozen=True)
class AttemptOutcome:
    """Evidence about one attempt; the executor classifies it."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    start_error: str | None = None
    infrastructure_reason: str | None = None
    duration_seconds: float = 0.0
    output_tail: str = ""
    diff: CapturedDiff | None = None
    gate: GateResult | None = None
    log_path: Path | None = None
    log_bytes: int = 0
    log_truncated: bool = False
    waiting_reason: str | None = None


class AttemptHooks(Protocol):
    """Callbacks into the executor while an attempt runs."""

    def started(self, pgid: int | None, workspace: Path | None) -> None: ...

    def validating(self, diff: DiffSummary) -> None: ...


class ExecutionBackend(Protocol):
    name: str

    def run_attempt(self, request: AttemptRequest, hooks: AttemptHooks) -> AttemptOutcome: ...

    def cleanup_attempt(self, run_id: str, task_id: str, attempt: int) -> None:
        """Remove what an interrupted attempt left behind (worktrees, processes)."""
        ...

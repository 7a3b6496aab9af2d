"""The integration worker's models: its verdicts, its ledger record and its results file.

Apart from :mod:`core.models` (which re-exports every name here and registers the results
file's schema) for the same reason as :mod:`core.gate_models`: the integration has its own
vocabulary, and keeping it here keeps ``models.py`` under its size limit. Like the gate's
models, this module imports nothing of the engine and nothing of ``core.models``: the
failure classes an integration verdict maps to live in ``core.models``
(``FailureClass.MERGE_CONFLICT``, ``FailureClass.MERGE_GATE_FAILED``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.gate_models import GateResult

COMMIT = r"^[0-9a-f]{40}$"
#: Longest feedback an adapter gets about a failed integration (it goes into its prompt).
MAX_FEEDBACK_CHARS = 4000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntegrationOutcome(StrEnum):
    """What became of a completed task's change on the integration branch."""

    MERGED = "merged"
    CONFLICT = "conflict"
    GATE_FAILED = "gate_failed"
    SKIPPED = "skipped"


class IntegrationFailure(_Model):
    """Integration's verdict on a completed attempt that sent its task back to the adapter.

    Set on that attempt's :class:`~core.models.AttemptResult` (``integration``) when the
    task is reopened: the attempt is then no longer final, and the next attempt gets
    ``feedback`` as extra input and starts from ``rebase_commit`` of ``rebase_repository``
    (the integration branch's head) instead of the task's own base commit.
    """

    outcome: Literal[IntegrationOutcome.CONFLICT, IntegrationOutcome.GATE_FAILED]
    message: str = Field(max_length=500, description="One line: what failed.")
    feedback: str = Field(
        max_length=MAX_FEEDBACK_CHARS, description="What the next attempt's prompt is told."
    )
    rebase_repository: str | None = Field(
        default=None, description="Repository holding rebase_commit (the integration repository)."
    )
    rebase_commit: str | None = Field(
        default=None, pattern=COMMIT, description="The next attempts start from this commit."
    )
    decided_at: datetime


class IntegrationRecord(_Model):
    """The integration part of a ledger entry of kind ``integration`` (one per verdict)."""

    outcome: IntegrationOutcome
    branch: str
    repository: str = Field(description="The repository the branch lives in (under the work dir).")
    parent_commit: str = Field(
        pattern=COMMIT, description="The branch head the change was applied onto."
    )
    commit: str | None = Field(
        default=None, pattern=COMMIT, description="The change's commit on the branch (merged)."
    )
    reason: str = Field(default="", description="Why it was not merged (conflict, gate, skip).")
    conflict_files: list[str] = Field(default_factory=list)
    gate: GateResult | None = Field(
        default=None, description="The merged-tree gate that failed it (gate_failed)."
    )
    batch: int = Field(default=0, ge=0, description="The batch it was decided in (0: none).")
    gate_runs: int = Field(
        default=0, ge=0, description="Gate runs of that integration run when it was decided."
    )
    sent_back: IntegrationFailure | None = Field(
        default=None,
        description="Set when the task was sent back to its adapter: the verdict as the task "
        "received it (message, feedback, where the next attempt starts).",
    )
    next_attempt: int | None = None
    backoff_seconds: float = Field(default=0.0, ge=0)
    retry_decision: str = Field(
        default="", description="The retry policy's reason to send the task back or not."
    )

    @property
    def reopened(self) -> bool:
        return self.sent_back is not None


class IntegrationTaskResult(_Model):
    task_id: str
    outcome: IntegrationOutcome
    commit: str | None = Field(default=None, description="The task's commit on the branch.")
    attempt: int | None = Field(default=None, description="The attempt whose change it is.")
    adapter_id: str | None = None
    task_state: str = Field(description="The task's execution state now.")
    reason: str = ""
    reopened: bool = False


class IntegrationStats(_Model):
    merged: int = 0
    conflict: int = 0
    gate_failed: int = 0
    skipped: int = 0
    batches: int = 0
    gate_runs: int = Field(default=0, description="Merged-tree gate runs made (all batches).")
    one_by_one_gate_runs: int = Field(
        default=0, description="Gate runs one-by-one integration needs: merged + gate_failed."
    )
    gate_runs_per_merge: float | None = None
    one_by_one_gate_runs_per_merge: float | None = None


class IntegrationResults(_Model):
    """``.state/integration_results.json``: the run's integration branch and every task on it."""

    schema_version: Literal[1] = 1
    run_id: str
    repository: str = Field(
        description="Path or URL of the repository that holds the branch (the URL once pushed)."
    )
    local_repository: str = Field(description="The repository under the work dir.")
    pushed: bool = False
    branch: str
    base_commit: str = Field(pattern=COMMIT)
    head_commit: str = Field(pattern=COMMIT)
    generated_at: datetime
    stats: IntegrationStats
    tasks: list[IntegrationTaskResult] = Field(description="Every task of the run, queue order.")

"""The ``Integration`` resource: one run's integration branch on Kubernetes, as pydantic models.

Apart from :mod:`core.resources` (which it builds on) because it is a separate concern -- the
integration worker's (``core.engine.integration_worker``), driven by the operator
(``core.kube.integration_controller``) -- and to keep that module under its size limit. The
CRD ``integrations.orchestrator.dev`` is generated from these models like the others, and the
status is the projection of ``.state/integration_results.json`` (see
:func:`status_of_results`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from core.api_rules import name_rule
from core.models import COMMIT_PATTERN, Identifier, IntegrationResults
from core.resources import ApiModel, Resources
from core.rules import Rule

#: Tasks listed in status (the counts in ``stats`` stay exact).
STATUS_TASKS = 200
#: A git branch name as the integration accepts it (refs/heads/<this>): no leading '-', '.'
#: or '/' (the pattern), and no '..', '//', trailing '/' or '.lock' (the rule).
BRANCH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}$"
BRANCH_RULE = Rule(
    cel="!self.contains('..') && !self.contains('//') && !self.endsWith('/') "
    "&& !self.endsWith('.lock')",
    message="a branch name must not contain '..' or '//' nor end with '/' or '.lock'",
    check=lambda b: ".." not in b and "//" not in b and not b.endswith(("/", ".lock")),
)

INTEGRATION_NAME_RULE = name_rule(
    "Integration", "it is a label value of its gate Jobs and starts their names"
)


class BatchSpec(ApiModel):
    """How many changes the merged-tree gate judges at once (see README: Batches)."""

    model_rules = (
        Rule(
            cel="self.maxSize >= self.size",
            message="batch.maxSize must be at least batch.size",
            check=lambda b: b.max_size >= b.size,
        ),
    )

    size: int = Field(default=4, ge=1, le=256, description="Changes gated at once (first batch).")
    adaptive: bool = Field(
        default=True,
        description="Double the batch after a passing one, halve it after a failing one.",
    )
    max_size: int = Field(default=32, ge=1, le=256, description="The adaptive limit.")


class IntegrationSpec(ApiModel):
    """Integrate one run's COMPLETED TaskExecutions of this namespace. Immutable once created."""

    run_id: Identifier = Field(
        description="The run (TaskExecution spec.runId) whose completed tasks are merged, in "
        "queue order (creation order, then task id)."
    )
    branch: Annotated[str, Field(pattern=BRANCH_PATTERN), BRANCH_RULE] | None = Field(
        default=None,
        description="Branch pushed to the tasks' repository. Default: "
        "orchestrator/integration/<runId>.",
    )
    base_commit: Annotated[str, Field(pattern=COMMIT_PATTERN)] | None = Field(
        default=None,
        description="Commit the branch starts from. Default: the tasks' common base; when "
        "bases differ, the newest all the others are ancestors of.",
    )
    batch: BatchSpec = Field(default_factory=BatchSpec, description="Speculative batching.")
    resources: Resources = Field(
        default_factory=Resources, description="CPU/memory of the gate pods (request = limit)."
    )
    pending_timeout_seconds: float = Field(
        default=300,
        gt=0,
        le=3600,
        description="How long a gate pod may take to start before the gate run is given up "
        "(an infrastructure failure: the integration is tried again, nothing is blamed).",
    )


class IntegrationTaskStatus(ApiModel):
    task_id: str
    outcome: Literal["merged", "conflict", "gate_failed", "skipped"]
    commit: str | None = Field(default=None, description="The task's commit on the branch.")
    attempt: int | None = None
    adapter: str | None = None
    task_state: str = Field(description="The task's execution state now.")
    reason: str = Field(default="", max_length=1000)


class IntegrationStatsStatus(ApiModel):
    merged: int = 0
    conflict: int = 0
    gate_failed: int = 0
    skipped: int = 0
    batches: int = 0
    gate_runs: int = Field(default=0, description="Merged-tree gate runs (gate Jobs) made.")
    one_by_one_gate_runs: int = Field(
        default=0, description="Gate runs one-by-one integration needs: merged + gate_failed."
    )


IntegrationState = Literal["Pending", "Waiting", "Running", "Succeeded", "Failed"]


class IntegrationStatus(ApiModel):
    """The integration branch as the operator recorded it (``integration_results.json``)."""

    state: IntegrationState = Field(
        default="Pending",
        description="Waiting: tasks of the run are unfinished; Running: merging and gating; "
        "Succeeded: every completed task has a verdict; Failed: see reason and message.",
    )
    reason: str = ""
    message: str = Field(default="", max_length=2000)
    observed_generation: int | None = None
    repository: str | None = Field(default=None, description="Where the branch is pushed.")
    branch: str | None = None
    base_commit: str | None = None
    head_commit: str | None = None
    pushed: bool = Field(default=False, description="The repository's branch is at headCommit.")
    gate_job: str | None = Field(default=None, description="The gate Job running now.")
    stats: IntegrationStatsStatus | None = None
    tasks: Annotated[list[IntegrationTaskStatus], Field(max_length=STATUS_TASKS)] = Field(
        default_factory=list,
        description=f"Every task of the run in queue order (the first {STATUS_TASKS}).",
    )
    tasks_digest: str | None = Field(
        default=None, description="The run's finished TaskExecutions this state is about."
    )
    updated_at: datetime | None = None


def status_of_results(results: IntegrationResults) -> dict[str, object]:
    """The status fields ``integration_results.json`` carries, for a merge patch."""
    stats = results.stats
    return {
        "repository": results.repository,
        "branch": results.branch,
        "baseCommit": results.base_commit,
        "headCommit": results.head_commit,
        "pushed": results.pushed,
        "stats": IntegrationStatsStatus(
            merged=stats.merged,
            conflict=stats.conflict,
            gate_failed=stats.gate_failed,
            skipped=stats.skipped,
            batches=stats.batches,
            gate_runs=stats.gate_runs,
            one_by_one_gate_runs=stats.one_by_one_gate_runs,
        ).model_dump(mode="json", by_alias=True),
        "tasks": [
            IntegrationTaskStatus(
                task_id=t.task_id,
                outcome=t.outcome.value,
                commit=t.commit,
                attempt=t.attempt,
                adapter=t.adapter_id,
                task_state=t.task_state,
                reason=t.reason[:1000],
            ).model_dump(mode="json", by_alias=True, exclude_none=True)
            for t in results.tasks[:STATUS_TASKS]
        ],
    }

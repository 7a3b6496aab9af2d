"""Pydantic models at the edges: phase-4 inputs, adapters, results, ledger entries, task states.

Everything that crosses a file, database or API boundary is one of these models, so that bad
input is refused with a message naming the field, and the JSON Schemas in ``schema/`` are
generated from the same definitions (``orchestrator schema generate``).

The task state machine lives here too, in one place: :func:`transition` is the only function
that may change a task's state.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import IllegalTransitionError
from core.gate_models import CHECK_NAME_PATTERN as CHECK_NAME_PATTERN
from core.gate_models import GATE_PLACEHOLDERS as GATE_PLACEHOLDERS
from core.gate_models import MAX_TEST_NAMES as MAX_TEST_NAMES
from core.gate_models import RERUN_PLACEHOLDERS as RERUN_PLACEHOLDERS
from core.gate_models import CheckResult as CheckResult
from core.gate_models import CheckStatus as CheckStatus
from core.gate_models import GateCheck as GateCheck
from core.gate_models import GatePolicy as GatePolicy
from core.gate_models import GateResult as GateResult
from core.gate_models import ReportFormat as ReportFormat
from core.gate_models import TamperReport as TamperReport
from core.gate_models import TestCounts as TestCounts
from core.gate_models import TestNames as TestNames
from core.gate_models import check_placeholders

SCHEMA_VERSION = 1

#: Identifiers end up in file names, DB keys, Job names and labels: DNS-label friendly.
IDENTIFIER_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
COMMIT_PATTERN = r"^[0-9a-f]{40}$"

Identifier = Annotated[
    str,
    Field(
        pattern=IDENTIFIER_PATTERN,
        description="Lower-case letters, digits and '-', 1-63 characters (a DNS label).",
    ),
]

#: Placeholders an adapter command template may use. Values are paths and ids the executor
#: makes itself; task text is never substituted into a command (it reaches the tool as a file
#: or on stdin).
COMMAND_PLACEHOLDERS = frozenset(
    {
        "prompt_file",
        "workspace",
        "task_id",
        "attempt",
        "python",
        "workdir",
        "target_paths",
    }
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- task states


class TaskState(StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    VALIDATING = "VALIDATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.TIMEOUT, TaskState.CANCELLED}
)

#: The one table of legal moves. Back-edges to PENDING are retries and crash recovery.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    # PENDING -> FAILED/TIMEOUT: a waiting task given up (policy or budget ran out) without
    # another attempt.
    TaskState.PENDING: frozenset(
        {TaskState.IN_PROGRESS, TaskState.CANCELLED, TaskState.FAILED, TaskState.TIMEOUT}
    ),
    TaskState.IN_PROGRESS: frozenset(
        {
            TaskState.VALIDATING,
            TaskState.FAILED,
            TaskState.TIMEOUT,
            TaskState.CANCELLED,
            TaskState.PENDING,
        }
    ),
    TaskState.VALIDATING: frozenset(
        {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED, TaskState.PENDING}
    ),
    TaskState.COMPLETED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.TIMEOUT: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


def transition(current: TaskState, target: TaskState) -> TaskState:
    """Return ``target`` if the move is legal, else raise :class:`IllegalTransitionError`."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransitionError(f"illegal task state transition {current} -> {target}")
    return target


class FailureClass(StrEnum):
    INFRASTRUCTURE = "infrastructure"
    ADAPTER_ERROR = "adapter_error"
    ADAPTER_TIMEOUT = "adapter_timeout"
    EMPTY_DIFF = "empty_diff"
    GATE_FAILED = "gate_failed"
    CANCELLED = "cancelled"


class EventName(StrEnum):
    TASK_STARTED = "TASK_STARTED"
    TASK_COMPLETED = "TASK_COMPLETED"
    TASK_FAILED = "TASK_FAILED"
    EXECUTION_FINISHED = "EXECUTION_FINISHED"
    #: Not in the seed's contract: an attempt failed and the task will be tried again.
    ATTEMPT_FAILED = "ATTEMPT_FAILED"
    SAFE_MODE_ENTERED = "SAFE_MODE_ENTERED"
    SAFE_MODE_LEFT = "SAFE_MODE_LEFT"


# --------------------------------------------------------------------------- adapters


class AdapterKind(StrEnum):
    PROCESS = "process"
    PATCH = "patch"
    MANUAL = "manual"


class CommandTemplate(StrEnum):
    """Ready-made commands for AI coding CLIs (see ``core.engine.adapters``)."""

    AIDER = "aider"
    CLAUDE_CODE = "claude-code"
    CODEX = "codex"
    OPENCODE = "opencode"


class RetryPolicy(_Model):
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts per task, on all adapters together."
    )
    backoff_initial_seconds: float = Field(default=1.0, ge=0, le=3600)
    backoff_max_seconds: float = Field(default=60.0, ge=0, le=86_400)
    backoff_multiplier: float = Field(default=2.0, ge=1, le=10)
    jitter_seconds: float = Field(default=1.0, ge=0, le=3600)
    min_attempt_seconds: float = Field(
        default=1.0, ge=0, le=3600, description="No retry that would get less budget than this."
    )
    retry_on: list[FailureClass] = Field(
        default_factory=lambda: [
            FailureClass.INFRASTRUCTURE,
            FailureClass.ADAPTER_ERROR,
            FailureClass.ADAPTER_TIMEOUT,
        ],
        description="Failure classes that are tried again (gate_failed is off by default).",
    )


class BreakerPolicy(_Model):
    failure_threshold: int = Field(
        default=3, ge=1, le=1000, description="Consecutive counted failures that open it."
    )
    cooldown_seconds: float = Field(
        default=60.0, ge=0, le=86_400, description="OPEN -> HALF_OPEN after this long."
    )
    half_open_max_trials: int = Field(default=1, ge=1, le=100)
    window_size: int = Field(
        default=0, ge=0, le=100, description="Recent counted outcomes for the rate rule; 0: off."
    )
    failure_rate_threshold: float = Field(
        default=1.0, gt=0, le=1, description="Open when a full window fails at this rate."
    )
    trial_lease_seconds: float | None = Field(
        default=3600.0, gt=0, description="Reclaim a HALF_OPEN trial slot after this long."
    )


class SandboxSpec(_Model):
    """How the embedded backend confines this adapter's processes (see ``core.engine.sandbox``).

    The sandbox itself is not optional per adapter: every process adapter and gate check runs
    in it unless the executor was started with ``--no-sandbox``. What an adapter may choose
    is whether its processes reach the network. On Kubernetes the pod is the sandbox and the
    Adapter's egress rules decide the network; these fields are not used there.
    """

    network: bool = Field(
        default=True,
        description="The adapter's process may use the network (AI CLIs call their model API). "
        "False: it gets a network namespace of its own with only a loopback interface.",
    )
    gate_network: bool | None = Field(
        default=None,
        description="The same for the test gate's checks of this adapter's attempts; "
        "unset: as `network`.",
    )

    @property
    def checks_network(self) -> bool:
        return self.network if self.gate_network is None else self.gate_network


class IsolationLevel(StrEnum):
    """How an attempt's processes were confined (recorded per attempt)."""

    #: Unconfined: the executor was started with --no-sandbox; the adapter could do anything
    #: the executor's user can.
    NONE = "none"
    #: Embedded sandbox (bubblewrap): own mount, PID, IPC and UTS namespaces; only the tree
    #: and the attempt's scratch dirs writable; the work dir's state and mirrors hidden.
    SANDBOX = "sandbox"
    #: The same, and a network namespace of its own (loopback only).
    SANDBOX_NO_NETWORK = "sandbox-no-network"
    #: A Kubernetes pod (the Kubernetes backend): the pod's security context and the
    #: NetworkPolicy confine it.
    POD = "pod"


class HealthProbe(_Model):
    command: list[str] = Field(min_length=1)
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    interval_seconds: float = Field(default=30.0, gt=0, le=86_400)


class AdapterSpec(_Model):
    """How one adapter turns a task into a change of the working tree."""

    id: Identifier
    kind: AdapterKind
    description: str = ""
    template: CommandTemplate | None = Field(
        default=None,
        description="Use a built-in command for an AI CLI instead of `command`.",
    )
    command: list[str] | None = Field(
        default=None,
        description="argv run in the workspace (kind=process). Placeholders: "
        + ", ".join("{" + p + "}" for p in sorted(COMMAND_PLACEHOLDERS)),
    )
    stdin: Literal["none", "prompt"] = Field(
        default="none",
        description="'prompt' feeds the prompt file to the tool's stdin.",
    )
    env: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(
        default_factory=list,
        description="Names of executor environment variables passed through (e.g. the tool's "
        "own API key). Nothing else from the executor's environment reaches the adapter.",
    )
    timeout_seconds: float = Field(default=1800.0, gt=0, le=7 * 86_400)
    gate: list[GateCheck] = Field(default_factory=list, description="Default test gate.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    health_check: HealthProbe | None = None
    sandbox: SandboxSpec = Field(
        default_factory=SandboxSpec,
        description="Embedded backend: network access of the adapter's sandboxed processes.",
    )

    @field_validator("command")
    @classmethod
    def _command_placeholders(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_placeholders(value, COMMAND_PLACEHOLDERS)

    @field_validator("pass_env")
    @classmethod
    def _env_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> AdapterSpec:
        if self.kind is AdapterKind.PROCESS:
            if (self.command is None) == (self.template is None):
                raise ValueError("a process adapter needs exactly one of `command` or `template`")
        elif self.command is not None or self.template is not None:
            raise ValueError(f"a {self.kind} adapter takes no `command`/`template`")
        return self


# --------------------------------------------------------------------------- phase-4 inputs


class TaskSpec(_Model):
    """One task as phase 4 queued it: what to change, where, and how to check it."""

    task_id: Identifier
    title: str = ""
    prompt: str = Field(min_length=1, description="Instructions for the adapter.")
    repo: str = Field(
        min_length=1,
        description="Git repository: a path relative to the work dir, a bundle, or a URL.",
    )
    base_commit: str = Field(
        pattern=COMMIT_PATTERN,
        description="Full 40-hex commit the attempt starts from.",
    )
    target_paths: list[str] = Field(default_factory=list)
    patch: str | None = Field(
        default=None,
        description="Unified diff (git --binary) applied by the `patch` adapter.",
    )
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=7 * 86_400,
        description="Budget for all attempts; else adapter's.",
    )
    gate: list[GateCheck] | None = Field(default=None, description="Overrides the adapter's gate.")
    gate_baseline: bool = Field(
        default=False,
        description="Run the gate on the unpatched base first (pre-existing).",
    )
    gate_policy: GatePolicy = Field(
        default_factory=GatePolicy, description="Flaky reruns, tamper handling, fuzzy apply."
    )
    allow_empty_diff: bool = Field(default=False, description="An empty diff counts as success.")
    retry: RetryPolicy | None = Field(default=None, description="Overrides the adapter's policy.")

    @field_validator("target_paths")
    @classmethod
    def _relative_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"target path {path!r} must be relative and stay in the repo")
        return value


def _unique(ids: list[str], what: str) -> None:
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise ValueError(f"duplicate {what} {item!r}")
        seen.add(item)


class TaskQueue(_Model):
    """``.state/task_queue.json``: the tasks of a run, in execution order."""

    schema_version: Literal[1] = 1
    run_id: Identifier
    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tasks(self) -> TaskQueue:
        _unique([t.task_id for t in self.tasks], "task_id")
        return self


class RoutingDecision(_Model):
    task_id: Identifier
    adapter_id: Identifier
    fallback_adapter_ids: list[Identifier] = Field(default_factory=list)
    rationale: str = ""


class RoutingDecisions(_Model):
    """``.state/routing_decisions.json``: the adapter registry and one decision per task."""

    schema_version: Literal[1] = 1
    run_id: Identifier
    adapters: list[AdapterSpec] = Field(min_length=1)
    decisions: list[RoutingDecision] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> RoutingDecisions:
        _unique([a.id for a in self.adapters], "adapter id")
        _unique([d.task_id for d in self.decisions], "decision for task_id")
        return self


class RoutingCompleteFlag(_Model):
    """``.state/ROUTING_COMPLETE``: written by phase 4 when routing of a run is final."""

    run_id: Identifier
    completed_at: datetime


# --------------------------------------------------------------------------- results


FileStatus = Literal["added", "modified", "deleted", "renamed", "copied", "type_changed"]


class FileChange(_Model):
    path: str
    old_path: str | None = None
    status: FileStatus
    binary: bool = False
    insertions: int = 0
    deletions: int = 0


class DiffSummary(_Model):
    sha256: str = Field(description="sha256 of the full diff, also when the stored copy is cut.")
    bytes: int = Field(ge=0)
    files_changed: int = Field(ge=0)
    insertions: int = Field(ge=0)
    deletions: int = Field(ge=0)
    binary_files: int = Field(default=0, ge=0)
    truncated: bool = False
    empty: bool
    files: list[FileChange] = Field(default_factory=list)


class AttemptResult(_Model):
    attempt: int = Field(ge=1)
    adapter_id: Identifier
    state: TaskState
    failure_class: FailureClass | None = None
    failure_message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    started_at: datetime
    finished_at: datetime
    duration_seconds: float = Field(ge=0)
    log_path: str | None = None
    log_bytes: int = 0
    log_truncated: bool = False
    diff: DiffSummary | None = None
    gate: GateResult | None = None
    isolation: IsolationLevel | None = Field(
        default=None,
        description="How the attempt's adapter and gate processes were confined; absent when "
        "not known (an attempt interrupted before it reported, or recorded by an older version).",
    )
    final: bool = Field(default=True, description="False when the task was tried again after.")
    task_final_state: TaskState | None = Field(
        default=None,
        description="The state the task ended in, on its final attempt (the task's state can "
        "differ from the attempt's: a budget spent after an adapter_error ends TIMEOUT).",
    )
    backoff_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Backoff scheduled after this attempt before the next one (0 when final); "
        "charged to the task's budget like the attempt's own duration.",
    )


class TaskResult(_Model):
    task_id: Identifier
    state: TaskState
    adapter_id: Identifier = Field(description="The adapter phase 4 routed the task to.")
    final_adapter_id: Identifier | None = None
    attempts: list[AttemptResult] = Field(default_factory=list)
    failure_class: FailureClass | None = None
    failure_message: str = ""
    wait_reason: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_seconds: float | None = None

    @property
    def last(self) -> AttemptResult | None:
        return self.attempts[-1] if self.attempts else None


class ExecutionResults(_Model):
    """``.state/execution_results.json``: the outcome of every task of a run."""

    schema_version: Literal[1] = 1
    run_id: Identifier
    backend: str
    generated_at: datetime
    finished: bool = Field(description="True when no task of the run is left to execute.")
    summary: dict[str, int]
    tasks: list[TaskResult]


class LedgerEntry(_Model):
    """One line of ``.state/patch_ledger.jsonl``; ``hash`` chains it to the line before."""

    seq: int = Field(ge=1)
    run_id: Identifier
    task_id: Identifier
    task_uid: str | None = Field(
        default=None, description="The TaskExecution's uid (Kubernetes); absent when embedded."
    )
    scope: str | None = Field(
        default=None,
        description="The TaskExecution's namespace (Kubernetes); absent when embedded.",
    )
    attempt: int = Field(ge=1)
    adapter_id: Identifier
    base_commit: str = Field(pattern=COMMIT_PATTERN)
    state: TaskState
    failure_class: FailureClass | None = None
    diff_sha256: str | None = None
    diff_bytes: int = 0
    files_changed: int = 0
    insertions: int = 0
    deletions: int = 0
    truncated: bool = False
    patch_ref: str | None = Field(default=None, description="Content-addressed copy of the diff.")
    result: AttemptResult
    recorded_at: datetime
    prev_hash: str
    hash: str


#: Models whose JSON Schema is generated into ``schema/``, by file name.
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "task_queue.schema.json": TaskQueue,
    "routing_decisions.schema.json": RoutingDecisions,
    "routing_complete.schema.json": RoutingCompleteFlag,
    "execution_results.schema.json": ExecutionResults,
    "patch_ledger_entry.schema.json": LedgerEntry,
    "adapter.schema.json": AdapterSpec,
}

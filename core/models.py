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

from core.argv import COMMAND_PLACEHOLDERS as COMMAND_PLACEHOLDERS
from core.argv import GATE_PLACEHOLDERS as GATE_PLACEHOLDERS
from core.argv import (
    PROBE_PLACEHOLDERS,
    AdapterArgv,
    ProbeArgv,
    TargetPaths,
    argv_description,
)
from core.errors import IllegalTransitionError
from core.gate_models import CHECK_NAME_PATTERN as CHECK_NAME_PATTERN
from core.gate_models import MAX_TEST_NAMES as MAX_TEST_NAMES
from core.gate_models import RERUN_PLACEHOLDERS as RERUN_PLACEHOLDERS
from core.gate_models import CheckResult as CheckResult
from core.gate_models import CheckStatus as CheckStatus
from core.gate_models import GateCheck as GateCheck
from core.gate_models import GateChecks as GateChecks
from core.gate_models import GatePolicy as GatePolicy
from core.gate_models import GateResult as GateResult
from core.gate_models import ReportFormat as ReportFormat
from core.gate_models import TamperReport as TamperReport
from core.gate_models import TestCounts as TestCounts
from core.gate_models import TestNames as TestNames
from core.integration_models import IntegrationFailure as IntegrationFailure
from core.integration_models import IntegrationOutcome as IntegrationOutcome
from core.integration_models import IntegrationRecord as IntegrationRecord
from core.integration_models import IntegrationResults as IntegrationResults
from core.rules import RuledModel, Unique

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


class _Model(RuledModel):
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


def reopen(current: TaskState) -> TaskState:
    """The one way out of a terminal state: COMPLETED -> PENDING, when the integration worker
    sends a completed change back to its adapter (merge conflict, merged-tree gate failure).

    Not an edge of :data:`TRANSITIONS`, so that no ordinary write can re-open a finished task
    by accident; only the store's ``reopen_task`` calls this.
    """
    if current is not TaskState.COMPLETED:
        raise IllegalTransitionError(f"only a COMPLETED task can be reopened, not a {current} one")
    return TaskState.PENDING


class FailureClass(StrEnum):
    INFRASTRUCTURE = "infrastructure"
    ADAPTER_ERROR = "adapter_error"
    ADAPTER_TIMEOUT = "adapter_timeout"
    EMPTY_DIFF = "empty_diff"
    GATE_FAILED = "gate_failed"
    CANCELLED = "cancelled"
    #: The diff exceeded the hard limit of what is kept: nothing was stored or judged.
    DIFF_TOO_LARGE = "diff_too_large"
    #: The completed change conflicts with the changes merged before it (integration).
    MERGE_CONFLICT = "merge_conflict"
    #: The completed change fails the gate on the merged tree (integration).
    MERGE_GATE_FAILED = "merge_gate_failed"


#: The failure class of an integration verdict that sends a task back to its adapter.
INTEGRATION_FAILURE_CLASSES: dict[IntegrationOutcome, FailureClass] = {
    IntegrationOutcome.CONFLICT: FailureClass.MERGE_CONFLICT,
    IntegrationOutcome.GATE_FAILED: FailureClass.MERGE_GATE_FAILED,
}


class EventName(StrEnum):
    TASK_STARTED = "TASK_STARTED"
    TASK_COMPLETED = "TASK_COMPLETED"
    TASK_FAILED = "TASK_FAILED"
    EXECUTION_FINISHED = "EXECUTION_FINISHED"
    #: Not in the seed's contract: an attempt failed and the task will be tried again.
    ATTEMPT_FAILED = "ATTEMPT_FAILED"
    SAFE_MODE_ENTERED = "SAFE_MODE_ENTERED"
    SAFE_MODE_LEFT = "SAFE_MODE_LEFT"
    #: The integration worker (core.engine.integration_worker): one per verdict, one per run.
    INTEGRATION_MERGED = "INTEGRATION_MERGED"
    INTEGRATION_CONFLICT = "INTEGRATION_CONFLICT"
    INTEGRATION_GATE_FAILED = "INTEGRATION_GATE_FAILED"
    INTEGRATION_SKIPPED = "INTEGRATION_SKIPPED"
    INTEGRATION_FINISHED = "INTEGRATION_FINISHED"
    #: A completed task sent back to its adapter by the integration worker.
    TASK_REOPENED = "TASK_REOPENED"
    #: Not in the seed's event list: one of its ``ai_escalation_triggers`` fired (a person
    #: should look); see ``core.engine.escalation``.
    ESCALATION = "ESCALATION"


# --------------------------------------------------------------------------- adapters


class AdapterKind(StrEnum):
    PROCESS = "process"
    PATCH = "patch"
    MANUAL = "manual"
    API = "api"


class ApiProtocol(StrEnum):
    """What an ``api`` adapter's endpoint speaks (see ``core.engine.api_adapter``)."""

    OPENAI_CHAT = "openai-chat"
    WEBHOOK = "webhook"


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ApiSpec(_Model):
    """How an ``api`` adapter reaches its HTTP endpoint."""

    protocol: ApiProtocol = Field(
        description="openai-chat: OpenAI-compatible Chat Completions (vLLM, llama.cpp, Ollama, "
        "gateways); webhook: POST the task as JSON, receive {\"patch\": \"<unified diff>\"}."
    )
    url: str = Field(
        pattern=r"^https?://[^/@\s]+(/\S*)?$",
        description="openai-chat: the API's base URL (e.g. http://host:8000/v1; "
        "/chat/completions is appended); webhook: the URL the task is POSTed to. No "
        "credentials in the URL: use api_key_env.",
    )
    model: str | None = Field(
        default=None, min_length=1, description="Model name (required for openai-chat)."
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_PATTERN,
        description="Environment variable holding the API key (on Kubernetes: set it from a "
        "Secret in the Adapter's env). Sent only in the auth header, never logged.",
    )
    api_key_header: str = Field(
        default="Authorization",
        pattern=r"^[A-Za-z0-9-]+$",
        description="Header carrying the key: Authorization gets 'Bearer <key>', any other "
        "header the bare key.",
    )
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    read_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="Longest wait for the reply (never more than the attempt's budget); "
        "exceeding it is an adapter_timeout.",
    )
    max_context_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        le=16 * 1024 * 1024,
        description="Budget for the target files' contents sent with the task.",
    )
    max_retry_after_seconds: float = Field(
        default=600.0,
        ge=0,
        le=86_400,
        description="Longest server-requested delay (Retry-After of a 429/503) honoured.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    system_prompt: str | None = Field(
        default=None, description="openai-chat: replaces the built-in system prompt."
    )

    @model_validator(mode="after")
    def _protocol_fields(self) -> ApiSpec:
        if self.protocol is ApiProtocol.OPENAI_CHAT and not self.model:
            raise ValueError("an openai-chat endpoint needs `model`")
        return self


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
    retry_on: Annotated[list[FailureClass], Field(max_length=len(FailureClass)), Unique()] = Field(
        default_factory=lambda: [
            FailureClass.INFRASTRUCTURE,
            FailureClass.ADAPTER_ERROR,
            FailureClass.ADAPTER_TIMEOUT,
        ],
        description="Failure classes that are tried again (gate_failed is off by default).",
    )
    infrastructure_backoff_seconds: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="Least backoff before retrying an infrastructure failure (a dependency "
        "may still be starting), doubled per retry up to backoff_max_seconds.",
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
    command: ProbeArgv = Field(
        description=argv_description("The probe, run in an empty directory", PROBE_PLACEHOLDERS)
    )
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
    command: AdapterArgv | None = Field(
        default=None,
        description=argv_description("Run in the workspace (kind=process)", COMMAND_PLACEHOLDERS),
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
    gate: GateChecks = Field(default_factory=list, description="Default test gate.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    health_check: HealthProbe | None = None
    api: ApiSpec | None = Field(default=None, description="The endpoint (kind=api).")
    sandbox: SandboxSpec = Field(
        default_factory=SandboxSpec,
        description="Embedded backend: network access of the adapter's sandboxed processes.",
    )

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
        if (self.kind is AdapterKind.API) != (self.api is not None):
            raise ValueError("`api` is required for an api adapter and only allowed there")
        return self


# --------------------------------------------------------------------------- phase-4 inputs


class TaskSpec(_Model):
    """One task as phase 4 queued it: what to change, where, and how to check it."""

    # an error message never repeats the input: a refused repository URL carries
    # credentials, a prompt may be a megabyte (both reach status messages and Events)
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

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
    target_paths: TargetPaths = Field(
        default_factory=list, description="Files to change (relative paths in the repository)."
    )
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
    gate: GateChecks | None = Field(default=None, description="Overrides the adapter's gate.")
    gate_baseline: bool = Field(
        default=False,
        description="Run the gate on the unpatched base first (pre-existing).",
    )
    gate_policy: GatePolicy = Field(
        default_factory=GatePolicy, description="Flaky reruns, tamper handling, fuzzy apply."
    )
    allow_empty_diff: bool = Field(default=False, description="An empty diff counts as success.")
    retry: RetryPolicy | None = Field(default=None, description="Overrides the adapter's policy.")

    @field_validator("repo")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        problem = url_credentials(value)
        if problem:
            raise ValueError(
                f"the repository URL carries {problem}; credentials would be stored in the "
                "database, the ledger and the logs. Remove them from the URL and give git "
                "access another way (a credential helper, an SSH key, a token in the adapter's "
                "environment)"
            )
        return value


def url_credentials(url: str) -> str | None:
    """What credential a repository URL carries, if any: a password in its userinfo, or a
    user name (a token) on http(s). ``git@host:path`` and ``ssh://git@host`` name a user
    only, which is not a secret."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    authority = rest.split("/", 1)[0]
    if "@" not in authority:
        return None
    userinfo = authority.rsplit("@", 1)[0]
    if ":" in userinfo:
        return "a password (user:password@)"
    if scheme.lower() in ("http", "https", "ftp", "ftps"):
        return "a user name or token (token@)"
    return None


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
    fallback_adapter_ids: Annotated[list[Identifier], Field(max_length=10), Unique()] = Field(
        default_factory=list
    )
    rationale: str = ""

    @model_validator(mode="after")
    def _fallbacks(self) -> RoutingDecision:
        # what a TaskExecution's CRD refuses too: a run the embedded backend accepts can
        # also be submitted to Kubernetes
        if self.adapter_id in self.fallback_adapter_ids:
            raise ValueError("fallback_adapter_ids must not repeat adapter_id")
        return self


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
    sha256: str = Field(
        description="sha256 of the full diff; '' when it exceeded the hard limit (capture "
        "stopped there)."
    )
    bytes: int = Field(
        ge=0, description="Size of the full diff (when truncated: the bytes seen, > the limit)."
    )
    files_changed: int = Field(ge=0, description="All changed files (the list may be shorter).")
    insertions: int = Field(ge=0)
    deletions: int = Field(ge=0)
    binary_files: int = Field(default=0, ge=0)
    truncated: bool = Field(
        default=False,
        description="The diff exceeded the hard limit: it was not kept (class diff_too_large).",
    )
    empty: bool
    files: list[FileChange] = Field(
        default_factory=list, description="The first 200 changed files (files_changed: all)."
    )
    patch_ref: str | None = Field(
        default=None,
        description="Evidence-store key of the full diff (content-addressed, compressed); "
        "`orchestrator export` writes it out.",
    )
    patch_stored_bytes: int | None = Field(
        default=None, ge=0, description="Bytes the evidence store keeps for it (compressed)."
    )


class TokenUsage(_Model):
    """Tokens an ``api`` adapter's endpoint reported for one attempt."""

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)


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
    integration: IntegrationFailure | None = Field(
        default=None,
        description="Set when the integration worker sent this completed attempt's change back "
        "(merge conflict or merged-tree gate failure): the attempt is then not final.",
    )
    usage: TokenUsage | None = Field(
        default=None, description="Tokens the endpoint reported (api adapters)."
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
    """One line of ``.state/patch_ledger.jsonl``; ``hash`` chains it to the line before.

    ``kind`` ``attempt`` (absent from the line): one finished attempt. ``integration``: the
    integration worker's verdict on a completed attempt's change (``integration``); its other
    fields repeat that attempt's (the same ``patch_ref``, ``result``...), ``state`` and
    ``failure_class`` say what the verdict made of the task.
    """

    seq: int = Field(ge=1)
    kind: Literal["attempt", "integration"] = "attempt"
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
    integration: IntegrationRecord | None = None
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
    "integration_results.schema.json": IntegrationResults,
}

"""The Kubernetes API of the controller: ``TaskExecution`` and ``Adapter`` in
``orchestrator.dev/v1alpha1``, as pydantic models.

The CRDs in ``crds/`` are generated from these models (``orchestrator schema generate``), and
the operator parses every object through them, so the API server's validation and ours can
not drift apart. Field names are camelCase as in every Kubernetes API; the engine's own
policies (retry, breaker, gate checks, probes) are reused with camelCase aliases, and
:func:`task_spec` / :func:`adapter_spec` convert to the engine's models.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from core.api_rules import (
    CIDR_RULE,
    CREDENTIALS_REF_MESSAGE,
    IMAGE_RULE,
    QUEUE_NAME_RULE,
    REPO_CREDENTIALS_RULE,
    REPO_RULE,
    RESERVED_ENV_PREFIX,
    SECRET_KEY_PATTERN,
    SUBDOMAIN_PATTERN,
    quantity_rule,
)
from core.argv import (
    COMMAND_PLACEHOLDERS,
    ENV_NAME_PATTERN,
    MAX_CHECKS,
    MAX_ENV,
    AdapterArgv,
    EnvValue,
    TargetPaths,
    argv_description,
)
from core.models import (
    COMMIT_PATTERN,
    AdapterSpec,
    ApiSpec,
    BreakerPolicy,
    CommandTemplate,
    DiffSummary,
    FailureClass,
    GateCheck,
    GatePolicy,
    HealthProbe,
    Identifier,
    RetryPolicy,
    TaskSpec,
    TaskState,
    TokenUsage,
)
from core.rules import Rule, RuledModel, Unique

GROUP = "orchestrator.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
#: How long a Job may wait for a Kueue queue's admission when ``queueTimeoutSeconds`` is unset.
DEFAULT_QUEUE_TIMEOUT_SECONDS = 86400.0


class _Api(RuledModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ApiModel(_Api):
    """The base of API models outside this module (camelCase aliases, unknown fields refused,
    frozen)."""


class Retry(RetryPolicy):
    model_config = _Api.model_config


class Breaker(BreakerPolicy):
    model_config = _Api.model_config


class Check(GateCheck):
    model_config = _Api.model_config


class Probe(HealthProbe):
    model_config = _Api.model_config


class Api(ApiSpec):
    model_config = _Api.model_config


#: Gate checks as the API carries them: at most MAX_CHECKS, names unique.
Checks = Annotated[list[Check], Field(max_length=MAX_CHECKS), Unique("name")]


# --------------------------------------------------------------------------- names and refs


class AdapterReference(_Api):
    name: Identifier = Field(description="Name of an Adapter in the same namespace.")


class SecretReference(_Api):
    name: str = Field(
        max_length=253,
        pattern=SUBDOMAIN_PATTERN,
        description="Name of a Secret in the same namespace.",
    )


class SecretKeySelector(_Api):
    name: str = Field(max_length=253, pattern=SUBDOMAIN_PATTERN, description="Secret name.")
    key: str = Field(max_length=253, pattern=SECRET_KEY_PATTERN, description="Key in the Secret.")


class EnvVar(_Api):
    model_rules = (
        Rule(
            cel="has(self.value) != has(self.secretKeyRef)",
            message="each env entry needs exactly one of value or secretKeyRef",
            check=lambda e: (e.value is None) != (e.secret_key_ref is None),
        ),
    )

    name: Annotated[
        str,
        Rule(
            cel=f"!self.startsWith('{RESERVED_ENV_PREFIX}')",
            message=f"names starting with {RESERVED_ENV_PREFIX} are the runner's own; "
            "choose another name",
            check=lambda name: not name.startswith(RESERVED_ENV_PREFIX),
        ),
    ] = Field(max_length=256, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: EnvValue | None = Field(default=None, description="Literal value.")
    secret_key_ref: SecretKeySelector | None = Field(
        default=None, description="Take the value from a Secret (e.g. the tool's API key)."
    )


# --------------------------------------------------------------------------- quantities, CIDRs


class Resources(_Api):
    cpu: Annotated[str, Field(max_length=64), quantity_rule("cpu")] = Field(
        default="1", description="CPU request and limit, e.g. 500m."
    )
    memory: Annotated[str, Field(max_length=64), quantity_rule("memory")] = Field(
        default="1Gi", description="Memory request and limit, e.g. 512Mi."
    )


Port = Annotated[int, Field(ge=1, le=65535)]


class EgressRule(_Api):
    cidr: Annotated[str, Field(max_length=64), CIDR_RULE] = Field(
        description="Destination CIDR the adapter pods may reach (host bits zero)."
    )
    ports: Annotated[list[Port], Field(max_length=32), Unique()] = Field(
        default_factory=list, description="TCP ports, 1-65535 (empty: all)."
    )


# --------------------------------------------------------------------------- Adapter


class AdapterKind(StrEnum):
    PROCESS = "process"
    PATCH = "patch"
    MANUAL = "manual"
    API = "api"


class AdapterResourceSpec(_Api):
    """How an adapter turns a task into a change; shared by every TaskExecution naming it."""

    model_rules = (
        Rule(
            cel="self.kind != 'process' || (has(self.command) != has(self.template))",
            message="a process adapter needs exactly one of command or template",
            check=lambda a: (
                a.kind is not AdapterKind.PROCESS or ((a.command is None) != (a.template is None))
            ),
        ),
        Rule(
            cel="self.kind == 'process' || (!has(self.command) && !has(self.template))",
            message="only process adapters take command or template",
            check=lambda a: (
                a.kind is AdapterKind.PROCESS or (a.command is None and a.template is None)
            ),
        ),
        Rule(
            cel="self.kind == 'api' ? has(self.api) : !has(self.api)",
            message="an api adapter needs spec.api (its endpoint), and only api adapters take it",
            check=lambda a: (a.kind is AdapterKind.API) == (a.api is not None),
        ),
        Rule(
            cel="!has(self.api) || !has(self.api.apiKeyEnv) || "
            "(has(self.env) && self.env.exists(e, e.name == self.api.apiKeyEnv))",
            message="api.apiKeyEnv must name a variable of spec.env (take its value from a "
            "Secret with secretKeyRef)",
            check=lambda a: (
                a.api is None
                or a.api.api_key_env is None
                or any(e.name == a.api.api_key_env for e in a.env)
            ),
            field_path=".api.apiKeyEnv",
        ),
    )

    kind: AdapterKind = Field(
        description="process: run a command; patch: apply spec.task.patch; manual: a human's "
        "patch in spec.task.patch; api: call an HTTP endpoint (spec.api) from the adapter pod "
        "and apply the diff it answers with."
    )
    description: str = Field(default="", max_length=1000, description="What this adapter is.")
    image: Annotated[str, Field(max_length=512), IMAGE_RULE] | None = Field(
        default=None,
        description="Image of the adapter pod; it must contain the runner (build FROM the "
        "project image). Default: the operator's runner image.",
    )
    template: CommandTemplate | None = Field(
        default=None, description="Built-in command for an AI CLI (aider, claude-code, ...)."
    )
    command: AdapterArgv | None = Field(
        default=None,
        description=argv_description("Run in the checkout (kind=process)", COMMAND_PLACEHOLDERS),
    )
    stdin: Literal["none", "prompt"] = Field(
        default="none", description="'prompt' feeds the prompt file to the tool's stdin."
    )
    env: Annotated[list[EnvVar], Field(max_length=MAX_ENV), Unique("name")] = Field(
        default_factory=list, description="Environment of the tool (names unique)."
    )
    timeout_seconds: float = Field(
        default=1800, gt=0, le=604800, description="Default budget of a task on this adapter."
    )
    resources: Resources = Field(
        default_factory=Resources, description="CPU/memory of adapter pods (request = limit)."
    )
    gate: Checks = Field(default_factory=list, description="Default test-gate checks.")
    retry: Retry = Field(
        default_factory=Retry, description="Attempts, backoff and which failures retry."
    )
    breaker: Breaker = Field(
        default_factory=Breaker, description="Circuit breaker thresholds of this adapter."
    )
    health_check: Probe | None = Field(default=None, description="Optional probe command.")
    api: Api | None = Field(
        default=None,
        description="kind=api: the endpoint. Set apiKeyEnv to a variable of `env` taken from a "
        "Secret (secretKeyRef), and list the endpoint in `egress`.",
    )
    egress: Annotated[list[EgressRule], Field(max_length=32)] = Field(
        default_factory=list,
        description="Where this Adapter's adapter pods may connect (its gate pods never): the "
        "operator keeps a NetworkPolicy `orchestrator-adapter-<name>` with these rules (added "
        "to the chart's default-deny). Policies see connections after a Service's DNAT: name "
        "pod addresses, not Service IPs.",
    )


class AdapterResourceStatus(_Api):
    breaker_state: Literal["CLOSED", "OPEN", "HALF_OPEN"] = "CLOSED"
    consecutive_failures: int = 0
    opened_at: datetime | None = None
    healthy: bool | None = None
    message: str = ""


# --------------------------------------------------------------------------- TaskExecution

#: The prompt and an inline patch live in the custom resource, which etcd caps at about
#: 1.5 MiB (they reach the runner pod as a file through the evidence store, so no
#: environment variable limit applies); a larger patch is named by reference (patchFrom).
MAX_TASK_TEXT_BYTES = 1024 * 1024


def _text_bytes(task: TaskText) -> int:
    return len(task.prompt.encode()) + len((task.patch or "").encode())


class Source(_Api):
    repo: Annotated[str, Field(max_length=2048), REPO_RULE, REPO_CREDENTIALS_RULE] = Field(
        description="Git URL the pods clone (https://, git://, ssh://), without credentials."
    )
    base_commit: str = Field(pattern=COMMIT_PATTERN, description="Full 40-hex commit.")
    #: Only in the schema so that it is refused with a message (the API server prunes an
    #: unknown field silently, and a manifest written for the old field would then run
    #: without the credentials its author meant). Nothing reads it.
    credentials_secret_ref: dict[str, str] | None = Field(
        default=None,
        description="Not supported: refused (runner pods clone without credentials).",
    )

    model_rules = (
        Rule(
            cel="!has(self.credentialsSecretRef)",
            message=CREDENTIALS_REF_MESSAGE,
            check=lambda source: source.credentials_secret_ref is None,
            field_path=".credentialsSecretRef",
        ),
    )


class KeyReference(_Api):
    name: str = Field(max_length=253, pattern=SUBDOMAIN_PATTERN, description="Object name.")
    key: str = Field(max_length=253, pattern=SECRET_KEY_PATTERN, description="Key in it.")


class EvidencePatch(_Api):
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of a patch in the operator's evidence store (e.g. an earlier "
        "attempt's status.diff.sha256, or one uploaded to an S3 store as "
        "patches/<sha256>.diff.gz).",
    )


def _one_source(p: PatchSource) -> bool:
    return sum(x is not None for x in (p.config_map_key_ref, p.secret_key_ref, p.evidence)) == 1


class PatchSource(_Api):
    """A patch too large for the custom resource (etcd stores at most about 1.5 MiB)."""

    model_rules = (
        Rule(
            cel="(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) + "
            "(has(self.evidence) ? 1 : 0) == 1",
            message="patchFrom needs exactly one of configMapKeyRef, secretKeyRef or evidence",
            check=_one_source,
        ),
    )

    config_map_key_ref: KeyReference | None = Field(
        default=None,
        description="A key of a ConfigMap in the namespace (data or binaryData), mounted in "
        "the adapter pod by the kubelet (the operator does not read it).",
    )
    secret_key_ref: KeyReference | None = Field(
        default=None, description="A key of a Secret in the namespace, mounted likewise."
    )
    evidence: EvidencePatch | None = Field(
        default=None, description="A patch in the evidence store, by its sha256."
    )


class TaskText(_Api):
    model_rules = (
        Rule(
            cel="size(bytes(self.prompt)) + (has(self.patch) ? size(bytes(self.patch)) : 0)"
            f" <= {MAX_TASK_TEXT_BYTES}",
            message=f"prompt and patch together may hold at most {MAX_TASK_TEXT_BYTES // 1024} "
            "KiB (UTF-8): the custom resource is stored in etcd; name a larger patch in "
            "patchFrom",
            check=lambda t: _text_bytes(t) <= MAX_TASK_TEXT_BYTES,
        ),
        Rule(
            cel="!(has(self.patch) && has(self.patchFrom))",
            message="give the patch inline (patch) or by reference (patchFrom), not both",
            check=lambda t: t.patch is None or t.patch_from is None,
        ),
    )

    title: str = Field(default="", max_length=500)
    prompt: str = Field(
        min_length=1, max_length=MAX_TASK_TEXT_BYTES, description="Instructions for the adapter."
    )
    target_paths: TargetPaths = Field(
        default_factory=list,
        description="Files to change: relative paths in the repository, none starting with '-'.",
    )
    patch: str | None = Field(
        default=None,
        max_length=MAX_TASK_TEXT_BYTES,
        description="Unified diff, for `patch` and `manual` adapters.",
    )
    patch_from: PatchSource | None = Field(
        default=None,
        description="The unified diff by reference (ConfigMap, Secret or evidence store), "
        "for `patch` and `manual` adapters, when it is too large for the resource.",
    )


class GateSpec(_Api):
    checks: Checks | None = Field(
        default=None, description="Checks on the patched tree; default: the adapter's."
    )
    baseline: bool = Field(
        default=False,
        description="Run the checks on the base first: only tests the patch broke fail the gate.",
    )
    flaky_reruns: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Rerun a failing test alone up to this many times; passing on a rerun makes "
        "it flaky (recorded, not blamed).",
    )
    on_tamper: Literal["flag", "fail"] = Field(
        default="flag",
        description="Baseline failures removed/skipped by the patch, tracked files changed by a "
        "check: flag them in the result, or also fail the gate.",
    )
    fuzzy_apply: bool = Field(
        default=False,
        description="Allow a fuzzy apply (less context, whitespace ignored) after git apply "
        "--index and --3way.",
    )


class TaskExecutionSpec(_Api):
    """One routed task to execute. Immutable once created."""

    model_rules = (
        Rule(
            cel="!has(self.fallbackAdapterRefs) || "
            "self.fallbackAdapterRefs.all(f, f.name != self.adapterRef.name)",
            message="fallbackAdapterRefs must not repeat adapterRef",
            check=lambda s: all(f.name != s.adapter_ref.name for f in s.fallback_adapter_refs),
            field_path=".fallbackAdapterRefs",
        ),
    )

    run_id: Identifier = Field(default="k8s", description="Run this task belongs to.")
    task_id: Identifier | None = Field(default=None, description="Default: metadata.name.")
    source: Source = Field(description="The repository and the commit every attempt starts from.")
    task: TaskText = Field(description="What to change.")
    adapter_ref: AdapterReference = Field(description="The Adapter to use first.")
    fallback_adapter_refs: Annotated[
        list[AdapterReference], Field(max_length=10), Unique("name")
    ] = Field(default_factory=list, description="Adapters to fall back to, in order.")
    timeout_seconds: float | None = Field(
        default=None, gt=0, le=604800, description="Budget for all attempts; default: adapter's."
    )
    retry: Retry | None = Field(default=None, description="Default: the adapter's policy.")
    gate: GateSpec = Field(
        default_factory=GateSpec, description="The test gate run on the patched tree."
    )
    allow_empty_diff: bool = Field(default=False, description="An empty diff is a success.")
    pending_timeout_seconds: float = Field(
        default=300,
        gt=0,
        le=3600,
        description="How long an attempt's pod may take to start (scheduling, image pull, "
        "mounts) before the attempt ends as an infrastructure failure; the adapter's budget "
        "counts from the container's start.",
    )
    queue_name: Annotated[str, Field(max_length=63), QUEUE_NAME_RULE] | None = Field(
        default=None,
        description="A Kueue LocalQueue in this namespace: the attempt's Jobs are created "
        "suspended with the label kueue.x-k8s.io/queue-name and start when Kueue admits them "
        "(its ClusterQueue's quota). The wait for admission is charged neither to the budget "
        "nor to pendingTimeoutSeconds; it is bounded by queueTimeoutSeconds. Default: no "
        "queue, the Jobs start at once.",
    )
    queue_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=604800,
        description="With queueName: how long an attempt's Job may wait for Kueue's admission "
        "before the attempt ends as an infrastructure failure (its pod's grant to the evidence "
        "store is issued for this wait too). Default: 86400 (one day).",
    )

    @property
    def queue_wait_limit_seconds(self) -> float:
        """``queueTimeoutSeconds`` or its default. Not a schema default: a TaskExecution
        without a queue is stored exactly as before the queue fields existed."""
        return self.queue_timeout_seconds or DEFAULT_QUEUE_TIMEOUT_SECONDS


class Condition(_Api):
    """``metav1.Condition``."""

    type: str
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = None
    last_transition_time: datetime
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""


#: Test names a status keeps per list (the counts are exact; the DB has up to MAX_TEST_NAMES).
STATUS_TEST_NAMES = 10


class TestList(_Api):
    """A set of tests in status: the exact count and the first few ids."""

    __test__ = False

    count: int = 0
    names: list[str] = Field(default_factory=list, max_length=STATUS_TEST_NAMES)


class CheckSummary(_Api):
    name: str
    status: str
    exit_code: int | None = None
    duration_seconds: float = 0
    granularity: Literal["test", "check"] = Field(
        default="check", description="test: judged per test; check: by exit status only."
    )
    tests: int | None = Field(default=None, description="Tests in the patched tree's report.")
    new_failures: TestList | None = Field(
        default=None, description="Failing after the patch, not before: these fail the gate."
    )
    pre_existing_failures: TestList | None = None
    fixed: TestList | None = None
    flaky: TestList | None = Field(default=None, description="Passed when rerun alone.")
    removed_failing: TestList | None = Field(
        default=None, description="Failing at baseline, removed or skipped by the patch."
    )
    note: str = ""


class TamperSummary(_Api):
    flagged: bool = False
    fails_gate: bool = False
    modified_files: list[str] = Field(default_factory=list, max_length=STATUS_TEST_NAMES)
    deleted_test_files: list[str] = Field(default_factory=list, max_length=STATUS_TEST_NAMES)
    removed_failing_tests: TestList | None = None


class GateSummary(_Api):
    passed: bool
    applied: bool
    apply_method: str | None = None
    checks: list[CheckSummary] = Field(default_factory=list)
    tamper: TamperSummary | None = Field(
        default=None, description="Present when tampering was flagged."
    )


class DiffStatus(_Api):
    sha256: str
    bytes: int
    files_changed: int
    insertions: int
    deletions: int
    binary_files: int = 0
    truncated: bool = False
    empty: bool = False
    patch_ref: str | None = Field(default=None, description="Evidence-store key of the diff.")
    patch_stored_bytes: int | None = None


class UsageStatus(_Api):
    """Tokens an api adapter's endpoint reported for the attempt."""

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)


def usage_status(usage: TokenUsage | None) -> UsageStatus | None:
    return None if usage is None else UsageStatus.model_validate(usage.model_dump())


def usage_of(status: UsageStatus | None) -> TokenUsage | None:
    """Inverse of :func:`usage_status`."""
    return None if status is None else TokenUsage.model_validate(status.model_dump())


class AttemptStatus(_Api):
    attempt: int
    adapter: str
    job_name: str
    gate_job_name: str | None = None
    trial: bool = Field(default=False, description="Ran as a HALF_OPEN breaker trial.")
    state: TaskState
    failure_class: FailureClass | None = None
    message: str = ""
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    diff: DiffStatus | None = None
    gate: GateSummary | None = None
    log_bytes: int = Field(default=0, description="Bytes of the attempt's captured log.")
    log_truncated: bool = Field(default=False, description="The log hit its cap.")
    pod_started_at: datetime | None = Field(
        default=None, description="When the adapter's container started (its budget's start)."
    )
    usage: UsageStatus | None = Field(
        default=None, description="api adapters: tokens the endpoint reported."
    )


class TaskExecutionStatus(_Api):
    state: TaskState = TaskState.PENDING
    attempt: int = 0
    adapter: str | None = None
    reason: str = ""
    failure_class: FailureClass | None = None
    message: str = ""
    job_name: str | None = None
    gate_job_name: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    not_before: datetime | None = Field(default=None, description="Next attempt after this.")
    diff: DiffStatus | None = None
    gate: GateSummary | None = None
    attempts: list[AttemptStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


def diff_status(diff: DiffSummary | None) -> DiffStatus | None:
    """The diff summary as status carries it: the same fields, without the per-file list."""
    return None if diff is None else DiffStatus.model_validate(diff.model_dump(exclude={"files"}))


def adapter_spec(name: str, spec: AdapterResourceSpec) -> AdapterSpec:
    """The engine's view of an Adapter resource (env vars reach the pod through the Job)."""
    return AdapterSpec(
        id=name,
        kind=spec.kind.value,
        description=spec.description,
        template=spec.template,
        command=spec.command,
        stdin=spec.stdin,
        pass_env=[e.name for e in spec.env],
        timeout_seconds=spec.timeout_seconds,
        gate=[GateCheck.model_validate(c.model_dump()) for c in spec.gate],
        retry=RetryPolicy.model_validate(spec.retry.model_dump()),
        breaker=BreakerPolicy.model_validate(spec.breaker.model_dump()),
        health_check=HealthProbe.model_validate(spec.health_check.model_dump())
        if spec.health_check
        else None,
        api=ApiSpec.model_validate(spec.api.model_dump()) if spec.api else None,
    )


def task_spec(name: str, spec: TaskExecutionSpec) -> TaskSpec:
    """The engine's view of a TaskExecution."""
    checks = spec.gate.checks
    return TaskSpec(
        task_id=spec.task_id or name,
        title=spec.task.title,
        prompt=spec.task.prompt,
        repo=spec.source.repo,
        base_commit=spec.source.base_commit,
        target_paths=spec.task.target_paths,
        patch=spec.task.patch,
        timeout_seconds=spec.timeout_seconds,
        gate=[GateCheck.model_validate(c.model_dump()) for c in checks]
        if checks is not None
        else None,
        gate_baseline=spec.gate.baseline,
        gate_policy=GatePolicy(
            flaky_reruns=spec.gate.flaky_reruns,
            on_tamper=spec.gate.on_tamper,
            fuzzy_apply=spec.gate.fuzzy_apply,
        ),
        allow_empty_diff=spec.allow_empty_diff,
        retry=RetryPolicy.model_validate(spec.retry.model_dump()) if spec.retry else None,
    )

"""The Kubernetes API of the controller: ``TaskExecution`` and ``Adapter`` in
``orchestrator.dev/v1alpha1``, as pydantic models.

The CRDs in ``crds/`` are generated from these models (``orchestrator schema generate``), and
the operator parses every object through them, so the API server's validation and ours can
not drift apart. Field names are camelCase as in every Kubernetes API; the engine's own
policies (retry, breaker, gate checks, probes) are reused with camelCase aliases, and
:func:`task_spec` / :func:`adapter_spec` convert to the engine's models.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

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
    IDENTIFIER_PATTERN,
    AdapterSpec,
    BreakerPolicy,
    CommandTemplate,
    DiffSummary,
    FailureClass,
    GateCheck,
    HealthProbe,
    Identifier,
    RetryPolicy,
    TaskSpec,
    TaskState,
)
from core.rules import Rule, RuledModel, Unique, cel_string
from core.rules import matches as rules_matches

GROUP = "orchestrator.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class _Api(RuledModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Retry(RetryPolicy):
    model_config = _Api.model_config


class Breaker(BreakerPolicy):
    model_config = _Api.model_config


class Check(GateCheck):
    model_config = _Api.model_config


class Probe(HealthProbe):
    model_config = _Api.model_config


#: Gate checks as the API carries them: at most MAX_CHECKS, names unique.
Checks = Annotated[list[Check], Field(max_length=MAX_CHECKS), Unique("name")]


# --------------------------------------------------------------------------- names and refs

#: A DNS subdomain (RFC 1123): what Kubernetes requires of a Secret's name.
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 (a pattern, not a secret)
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)


def name_rule(kind: str, why: str) -> Rule:
    """``metadata.name`` of a ``kind`` must be a DNS label (an object-level rule of the CRD)."""
    return Rule(
        cel=f"self.metadata.name.matches({cel_string(IDENTIFIER_PATTERN)})",
        message=f"metadata.name of {kind} objects must be a DNS label: lower-case letters, digits "
        f"and '-', at most 63 characters, starting and ending with a letter or digit ({why})",
        check=lambda name: _IDENTIFIER.fullmatch(name) is not None,
        field_path=".metadata.name",
    )


#: Checked by the API server at the CRD's root; the operator's twin: core.kube.validation.
TASK_EXECUTION_NAME_RULE = name_rule(
    "TaskExecution",
    "it is the default task id and a label value, and starts the names of its Jobs",
)
ADAPTER_NAME_RULE = name_rule(
    "Adapter", "it is the adapter's id, a label value of its pods and names its NetworkPolicy"
)


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


#: Environment variables the runner sets itself in adapter pods; an Adapter may not set them.
RESERVED_ENV_PREFIX = "ORCHESTRATOR_"


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

_QUANTITY = re.compile(
    r"^[+]?(?P<number>[0-9]+(?:[.][0-9]*)?|[.][0-9]+)(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)


def _positive_quantity(text: str) -> bool:
    """A Kubernetes quantity above zero (the grammar of ``resource.Quantity``).

    Hand-written rather than the kubernetes client's ``parse_quantity`` because this layer
    must not import the client, and the question is only "is this a quantity above zero".
    """
    found = _QUANTITY.fullmatch(text)
    return found is not None and any(c in "123456789" for c in found["number"])


def _quantity_rule(what: str) -> Rule:
    return Rule(
        cel="isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
        message=f"{what} must be a Kubernetes quantity above zero, e.g. "
        + ("500m or 2" if what == "cpu" else "512Mi or 2Gi"),
        check=_positive_quantity,
    )


def _canonical_cidr(text: str) -> bool:
    """An IPv4 or IPv6 CIDR whose host bits are zero (what CEL's ``cidr()`` accepts)."""
    if "/" not in text or "%" in text:
        return False
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return False
    prefix = text.rsplit("/", 1)[1]
    if prefix != str(int(prefix)) or text != text.strip():
        return False
    return not (isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped)


CIDR_RULE = Rule(
    cel="isCIDR(self) && cidr(self).ip() == cidr(self).masked().ip()",
    message="must be a CIDR with its host bits zero, e.g. 10.0.0.0/8, 192.0.2.10/32 or "
    "2001:db8::/32",
    check=_canonical_cidr,
)


class Resources(_Api):
    cpu: Annotated[str, Field(max_length=64), _quantity_rule("cpu")] = Field(
        default="1", description="CPU request and limit, e.g. 500m."
    )
    memory: Annotated[str, Field(max_length=64), _quantity_rule("memory")] = Field(
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

_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REPO_PART = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
#: An image reference (the grammar of distribution/reference, which the kubelet applies).
IMAGE_PATTERN = (
    rf"^(?:(?:{_DOMAIN_PART}(?:[.]{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?/)?"
    rf"{_REPO_PART}(?:/{_REPO_PART})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
IMAGE_RULE = rules_matches(
    IMAGE_PATTERN,
    "must be an image reference such as registry.example/team/aider:1.2 (lower-case "
    "repository path, optional :tag and @sha256:digest)",
)


class AdapterKind(StrEnum):
    PROCESS = "process"
    PATCH = "patch"
    MANUAL = "manual"


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
    )

    kind: AdapterKind = Field(
        description="process: run a command; patch: apply spec.task.patch; manual: a human's "
        "patch in spec.task.patch."
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
    egress: Annotated[list[EgressRule], Field(max_length=32)] = Field(
        default_factory=list,
        description="Where this Adapter's pods may connect: the operator keeps a NetworkPolicy "
        "`orchestrator-adapter-<name>` with these rules (added to the chart's default-deny).",
    )


class AdapterResourceStatus(_Api):
    breaker_state: Literal["CLOSED", "OPEN", "HALF_OPEN"] = "CLOSED"
    consecutive_failures: int = 0
    opened_at: datetime | None = None
    healthy: bool | None = None
    message: str = ""


# --------------------------------------------------------------------------- TaskExecution

#: Where runner pods can clone from: a URL with a scheme git understands without helpers.
REPO_PATTERN = r"^(https?|git|ssh|file)://[^\x00-\x20\x7f]+$"
REPO_RULE = rules_matches(
    REPO_PATTERN,
    "must be a git URL the pods can clone: https://, http://, git://, ssh:// (or file:// "
    "inside the runner image), without spaces",
)
#: The prompt and a patch reach the runner pod in one environment variable, and Linux caps
#: one at 128 KiB (MAX_ARG_STRLEN): this bound leaves room for the rest of the request.
MAX_TASK_TEXT_BYTES = 96 * 1024


def _text_bytes(task: TaskText) -> int:
    return len(task.prompt.encode()) + len((task.patch or "").encode())


class Source(_Api):
    repo: Annotated[str, Field(max_length=2048), REPO_RULE] = Field(
        description="Git URL the pods clone (https://, git://, ssh://)."
    )
    base_commit: str = Field(pattern=COMMIT_PATTERN, description="Full 40-hex commit.")
    credentials_secret_ref: SecretReference | None = Field(
        default=None, description="Secret with git credentials (username/password keys)."
    )


class TaskText(_Api):
    model_rules = (
        Rule(
            cel="size(bytes(self.prompt)) + (has(self.patch) ? size(bytes(self.patch)) : 0)"
            f" <= {MAX_TASK_TEXT_BYTES}",
            message=f"prompt and patch together may hold at most {MAX_TASK_TEXT_BYTES // 1024} "
            "KiB (UTF-8): they reach the runner pod in an environment variable, which Linux "
            "caps at 128 KiB; shorten them",
            check=lambda t: _text_bytes(t) <= MAX_TASK_TEXT_BYTES,
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


class GateSpec(_Api):
    checks: Checks | None = Field(
        default=None, description="Checks on the patched tree; default: the adapter's."
    )
    baseline: bool = Field(
        default=False, description="Run the checks on the base first (pre-existing failures)."
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


class Condition(_Api):
    """``metav1.Condition``."""

    type: str
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = None
    last_transition_time: datetime
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""


class CheckSummary(_Api):
    name: str
    status: str
    exit_code: int | None = None
    duration_seconds: float = 0


class GateSummary(_Api):
    passed: bool
    applied: bool
    apply_method: str | None = None
    checks: list[CheckSummary] = Field(default_factory=list)


class DiffStatus(_Api):
    sha256: str
    bytes: int
    files_changed: int
    insertions: int
    deletions: int
    binary_files: int = 0
    truncated: bool = False
    empty: bool = False


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
        allow_empty_diff=spec.allow_empty_diff,
        retry=RetryPolicy.model_validate(spec.retry.model_dump()) if spec.retry else None,
    )

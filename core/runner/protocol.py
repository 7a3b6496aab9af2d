"""The contract between the operator and the runner in an adapter or gate pod.

The operator puts one :class:`RunnerRequest` (JSON) into its evidence store and gives the
pod a grant (:mod:`core.engine.evidence_grants`, ``$ORCHESTRATOR_GRANT``, a few KiB): the
pod's init container (``python -m core.runner fetch``) downloads the request (and a patch
to apply) into an emptyDir, checked against the grant's sha256, which the runner container
mounts read-only: the request reaches ``python -m core.runner adapter|gate`` as a file
(``$ORCHESTRATOR_REQUEST_FILE``), never in an environment variable (Linux caps one at
128 KiB). The runner uploads its full log and full diff through the grant's upload URLs and
writes to stdout, one JSON record per line:

* its own notes (``stream: "orchestrator"``), few and small; with no log upload grant
  (a runner started by hand) every log record, in the format of
  :class:`core.engine.task_log.TaskLog`;
* as the last line, ``{"orchestrator_result": <RunnerResult>}``: the small report (exit
  status, diff summary, and the sha256, size and key of each upload).

The operator reads the pod log through the API and turns it back into records and a result
with :func:`parse_pod_log`. A pod log without a result line means the pod was killed or
deleted before the runner finished: an infrastructure failure. Nothing in this module (or
anywhere in ``core.runner``) needs Kubernetes API access.

Exit codes of the runner process: :data:`EXIT_OK` whenever a result was printed, whatever the
adapter or the gate did; :data:`EXIT_BAD_REQUEST` when the request is missing or invalid
(the message on stderr names the field); :data:`EXIT_RUNNER_FAILED` when the runner itself
failed (clone or checkout, unreadable patch file, git error): the operator classifies that as
infrastructure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.engine.evidence_grants import UploadedEvidence
from core.models import (
    AdapterKind,
    AdapterSpec,
    DiffSummary,
    GateCheck,
    GateResult,
    Identifier,
    TaskSpec,
    TokenUsage,
)

#: Environment variable naming the request file (JSON of :class:`RunnerRequest`).
REQUEST_FILE_ENV = "ORCHESTRATOR_REQUEST_FILE"
#: Where the init container puts the inputs (an emptyDir, read-only in the runner container).
INPUTS_ENV = "ORCHESTRATOR_INPUTS"
DEFAULT_INPUTS_DIR = "/etc/orchestrator/inputs"
DEFAULT_REQUEST_FILE = f"{DEFAULT_INPUTS_DIR}/request.json"
#: Environment variable naming the writable work dir (an emptyDir in the pod).
WORKDIR_ENV = "ORCHESTRATOR_WORKDIR"
DEFAULT_WORKDIR = "/work"
#: Optional: seconds between SIGTERM and SIGKILL of the adapter's process group.
GRACE_ENV = "ORCHESTRATOR_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 5.0
#: Where the init container puts the diff a gate (or a patch adapter) applies.
DEFAULT_PATCH_FILE = f"{DEFAULT_INPUTS_DIR}/patch"
#: Key of the last stdout record.
RESULT_KEY = "orchestrator_result"

EXIT_OK = 0
EXIT_BAD_REQUEST = 2
EXIT_RUNNER_FAILED = 3

RunnerKind = Literal["adapter", "gate"]
#: Upload slots of a grant.
DIFF_SLOT = "diff"
LOG_SLOT = "log"


class RunnerRequest(BaseModel):
    """What one adapter or gate pod must do (the file ``$ORCHESTRATOR_REQUEST_FILE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: RunnerKind = Field(description="Must match the runner's command-line argument.")
    run_id: Identifier
    task: TaskSpec
    adapter: AdapterSpec
    attempt: int = Field(ge=1)
    repo_url: str = Field(min_length=1, description="What `git clone` gets (URL or path).")
    timeout_seconds: float = Field(
        gt=0, description="The adapter's inner budget; gate checks have their own timeouts."
    )
    max_log_bytes: int = Field(default=2 * 1024 * 1024, ge=0)
    max_diff_bytes: int = Field(default=5 * 1024 * 1024, ge=0)
    extra_input: str | None = Field(default=None, description="Feedback from the last attempt.")
    gate_checks: list[GateCheck] = Field(default_factory=list)
    gate_baseline: bool = False
    patch_file: str | None = Field(
        default=None,
        description="The diff to apply: the gate's (always), or a patch adapter's when the "
        "task names its patch by reference (the init container's download, a mounted "
        "ConfigMap or Secret key).",
    )

    @model_validator(mode="after")
    def _kind_inputs(self) -> RunnerRequest:
        if self.kind == "gate" and not self.patch_file:
            raise ValueError("patch_file: required when kind is 'gate'")
        if (
            self.kind == "adapter"
            and self.adapter.kind in (AdapterKind.PATCH, AdapterKind.MANUAL)
            and self.task.patch is None
            and self.patch_file is None
        ):
            raise ValueError(
                f"task.patch: required for a {self.adapter.kind.value} adapter (or patch_file)"
            )
        return self


class RunnerResult(BaseModel):
    """The runner's report, the last stdout line as ``{"orchestrator_result": ...}``.

    Adapter mode fills the process fields and ``diff``; gate mode fills ``gate`` (its process
    fields stay ``None``/``False``: every check carries its own status and exit code).
    """

    # a newer runner image may add fields; an older operator must still read the result
    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: RunnerKind
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    cancelled: bool = Field(default=False, description="The pod was asked to stop (SIGTERM).")
    start_error: str | None = Field(default=None, description="The adapter could not start.")
    duration_seconds: float = Field(default=0.0, ge=0)
    output_tail: str = ""
    diff: DiffSummary | None = None
    patch_b64: str | None = Field(
        default=None,
        description="Only without an upload grant (a runner started by hand): the full diff, "
        "base64 ('' for an empty diff). In a pod the diff is uploaded (`patch`).",
    )
    patch: UploadedEvidence | None = Field(
        default=None, description="The full diff as uploaded through the grant."
    )
    log: UploadedEvidence | None = Field(
        default=None, description="The full log (capped) as uploaded through the grant."
    )
    upload_error: str | None = Field(
        default=None, description="An upload through the grant failed: the evidence is lost."
    )
    gate: GateResult | None = None
    adapter_error: str | None = Field(
        default=None, description="api adapters: the failure the adapter named."
    )
    infrastructure_reason: str | None = Field(
        default=None, description="api adapters: throttled / unavailable (HTTP 429, 503)."
    )
    retry_after_seconds: float | None = Field(
        default=None, ge=0, description="api adapters: the server's Retry-After."
    )
    usage: TokenUsage | None = Field(default=None, description="api adapters: tokens used.")
    log_bytes: int = Field(default=0, ge=0)
    log_truncated: bool = False
    runner_version: str = ""

    def result_line(self) -> str:
        """The stdout line carrying this result (ASCII-only JSON, no trailing newline)."""
        # ensure_ascii: file names that are not UTF-8 (surrogate escapes) survive as \\udcXX
        return json.dumps({RESULT_KEY: self.model_dump(mode="json")}, ensure_ascii=True)


@dataclass(frozen=True)
class ParsedLog:
    """A pod log turned back into log records and the runner's result."""

    records: list[dict[str, Any]] = field(default_factory=list)
    #: None when there is no (complete) result line: the pod was killed or deleted.
    result: RunnerResult | None = None


def parse_pod_log(text: str) -> ParsedLog:
    """Split a pod log (stdout and stderr interleaved) into records and the result.

    Lines that are not JSON objects (stderr of the runner, a torn last line) are kept as
    ``{"stream": "raw", "line": ...}``. The result is the last well-formed result line.
    """
    records: list[dict[str, Any]] = []
    result: RunnerResult | None = None
    # split on "\n" only: str.splitlines() would also cut at U+2028 and friends, which JSON
    # written with ensure_ascii=False leaves unescaped inside strings
    for raw in text.split("\n"):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            records.append({"stream": "raw", "line": line})
            continue
        if RESULT_KEY in value:
            try:
                result = RunnerResult.model_validate(value[RESULT_KEY])
            except ValidationError:
                records.append({"stream": "raw", "line": line})
            continue
        records.append(value)
    return ParsedLog(records=records, result=result)

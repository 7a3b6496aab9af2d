"""An attempt's bulk through the evidence store: its pod's inputs in, its evidence out.

Why a module of its own: the reconciler decides *when* a Job starts and an attempt is
recorded; this decides *how* its bytes travel, so that nothing bulk goes through etcd, an
environment variable or the pod log:

* in (:meth:`AttemptIO.prepare`): the runner request (prompt, and a patch adapter's inline
  patch) is stored content-addressed under ``requests/`` and the pod gets a
  :class:`~core.engine.evidence_grants.Grant`: a download for the request (and for a patch
  to apply: the gate's diff, or a patch the task names by its sha256), and uploads for
  its log and, for an adapter, its diff, each for exactly one ``incoming/`` key and a byte
  limit, valid until the Job's backstop deadline;
* out (:meth:`AttemptIO.adopt_patch`, :meth:`AttemptIO.log_records`): what the pod says it
  uploaded is checked against what arrived (sha256, size) before anything is recorded;
  the diff moves to its content address, the log is read into the task's log file and its
  upload deleted.

Every store call is blocking I/O: the reconciler runs them in a thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from core.engine.evidence import EvidenceRef, patch_key
from core.engine.evidence_grants import (
    Grant,
    GrantingStore,
    Upload,
    UploadedEvidence,
    adopt_patch,
    incoming_key,
    read_upload,
    store_request,
)
from core.errors import EvidenceError, RequestTooLargeError
from core.identity import TaskKey
from core.models import DiffSummary
from core.runner.protocol import DIFF_SLOT, LOG_SLOT, RunnerRequest

#: Gzip of incompressible bytes is a little larger than they are.
_GZIP_SLACK = 64 * 1024
#: A grant outlives the Job's backstop deadline by this much (clock skew, a slow upload).
GRANT_MARGIN = timedelta(minutes=10)
#: A request never holds more than the CR it comes from (etcd's 1.5 MiB) and the feedback.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def _sent_limit(content_limit: int) -> int:
    return content_limit + content_limit // 100 + _GZIP_SLACK


@dataclass(frozen=True)
class PatchInput:
    """A patch the pod applies, from the store: its sha256 (and size when known)."""

    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class PodInputs:
    grant: Grant
    request_key: str

    @property
    def fetch_grant(self) -> str:
        """``$ORCHESTRATOR_GRANT`` of the init container: the downloads only."""
        return self.grant.only(downloads=True).env_value()

    @property
    def runner_grant(self) -> str:
        """``$ORCHESTRATOR_GRANT`` of the runner container: the uploads only."""
        return self.grant.only(downloads=False).env_value()


class AttemptIO:
    def __init__(
        self,
        store: GrantingStore,
        *,
        max_diff_bytes: int,
        max_log_bytes: int,
    ) -> None:
        self.store = store
        self.max_diff_bytes = max_diff_bytes
        self.max_log_bytes = max_log_bytes

    def prepare(
        self,
        key: TaskKey,
        request: RunnerRequest,
        *,
        expires_at: datetime,
        patch: PatchInput | None = None,
    ) -> PodInputs:
        """Store the request and issue the pod's grant (``expires_at``: the Job's backstop)."""
        data = request.model_dump_json().encode()
        if len(data) > MAX_REQUEST_BYTES:
            raise RequestTooLargeError(
                f"the runner request is {len(data)} bytes (limit {MAX_REQUEST_BYTES})"
            )
        expires = expires_at + GRANT_MARGIN
        request_key, sha, size = store_request(self.store, data)
        downloads = {
            "request": self.store.download_grant(
                request_key, sha256=sha, size=size, max_bytes=size, expires_at=expires
            )
        }
        if patch is not None:
            downloads["patch"] = self.store.download_grant(
                patch_key(patch.sha256),
                sha256=patch.sha256,
                size=patch.size,
                max_bytes=self.max_diff_bytes,
                expires_at=expires,
            )
        role = request.kind

        def slot(name: str, limit: int) -> Upload:
            where = incoming_key(key.scope, key.uid, request.attempt, role, name)
            return self.store.upload_grant(where, max_bytes=_sent_limit(limit), expires_at=expires)

        uploads = {LOG_SLOT: slot("log.jsonl.gz", self.max_log_bytes)}
        if role == "adapter":
            uploads[DIFF_SLOT] = slot("diff.gz", self.max_diff_bytes)
        return PodInputs(
            Grant(expires_at=expires, downloads=downloads, uploads=uploads), request_key
        )

    def patch_exists(self, sha256: str) -> bool:
        return self.store.exists(patch_key(sha256))

    def adopt_patch(self, diff: DiffSummary, uploaded: UploadedEvidence) -> DiffSummary:
        """The adapter's uploaded diff, checked against the summary and stored by its sha256;
        the summary then names it (``patch_ref``). :class:`EvidenceError` on any mismatch."""
        if uploaded.sha256 != diff.sha256 or uploaded.size != diff.bytes:
            raise EvidenceError(
                f"the uploaded diff ({uploaded.size} bytes, sha256 {uploaded.sha256[:12]}) is "
                f"not the diff the runner measured ({diff.bytes} bytes, {diff.sha256[:12]})"
            )
        ref: EvidenceRef = adopt_patch(self.store, uploaded, max_size=self.max_diff_bytes)
        return diff.model_copy(
            update={"patch_ref": ref.key, "patch_stored_bytes": ref.stored_bytes}
        )

    def log_records(self, uploaded: UploadedEvidence) -> list[dict[str, Any]]:
        """The records of an uploaded log (checked), its upload then deleted."""
        data = read_upload(self.store, uploaded, max_size=_sent_limit(self.max_log_bytes))
        records: list[dict[str, Any]] = []
        for raw in data.decode("utf-8", errors="replace").split("\n"):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = None
            records.append(value if isinstance(value, dict) else {"stream": "raw", "line": raw})
        return records

    def discard(self, uploaded: UploadedEvidence) -> None:
        self.store.delete(uploaded.key)

"""The project's one exception hierarchy.

Callers decide what to do from the *type*: a :class:`RetryableError` may be tried again, a
:class:`RetriesExhaustedError` means the policy gave up, and an :class:`UnrecoverableError`
must stop the work with its message shown to a human (it names the file/field and the fix).

Kubernetes API answers map onto the same tree (:class:`KubeApiError` and its subclasses), so a
caller can tell a confirmed absence (:class:`NotFoundError`) from a blip worth retrying
(:class:`TransientApiError`, also an :class:`InfrastructureError`) and from a request the API
server will refuse again (:class:`RejectedError`, also an :class:`UnrecoverableError`).
"""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """Base of every error this project raises on purpose."""


class UnrecoverableError(OrchestratorError):
    """Retrying cannot help: the input, configuration or environment must be fixed first."""


class KubeConfigError(UnrecoverableError):
    """No usable Kubernetes client configuration (kubeconfig or in-cluster service account)."""


class EntryContractError(UnrecoverableError):
    """A phase-4 input is missing or invalid; nothing has been executed."""

    def __init__(self, where: str, problem: str, fix: str) -> None:
        self.where = where
        self.problem = problem
        self.fix = fix
        super().__init__(f"{where}: {problem}\n  fix: {fix}")


class IllegalTransitionError(UnrecoverableError):
    """A task state change that the state machine does not allow."""


class LedgerIntegrityError(UnrecoverableError):
    """The patch ledger was edited, reordered or truncated."""


class DatabaseSchemaError(UnrecoverableError):
    """The database is missing tables or is not at the expected migration."""


class EvidenceError(UnrecoverableError):
    """Stored evidence (a patch) is missing, unreadable or does not match its hash."""


class RequestTooLargeError(EvidenceError):
    """A runner request over the limit a pod is handed: the task's inputs are too large."""


class ConfigError(UnrecoverableError):
    """A setting the process cannot work with (named in the message)."""


class MissingCommitError(UnrecoverableError):
    """A task's base commit is not in its repository (fetched): no attempt can start."""


class RetryableError(OrchestratorError):
    """A transient failure: the same operation may succeed when tried again."""


class InfrastructureError(RetryableError):
    """The platform failed (could not start, evicted, lost), not the adapter."""


class RetriesExhaustedError(OrchestratorError):
    """The retry policy gave up; ``last`` holds the final failure."""

    def __init__(self, message: str, last: BaseException | None = None) -> None:
        self.last = last
        super().__init__(message)


class QueueShutDownError(OrchestratorError):
    """The work queue was shut down and has no key left to hand out: the worker stops."""


# --------------------------------------------------------------------------- Kubernetes API


class KubeApiError(OrchestratorError):
    """The Kubernetes API server answered with an error, or did not answer at all.

    ``status`` is the HTTP status (None: no answer: timeout, connection refused or reset),
    ``reason`` the API server's ``Status.reason`` (``NotFound``, ``Conflict``, ...), ``message``
    its ``Status.message``; ``verb``/``resource``/``namespace``/``name`` say which call failed.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        reason: str = "",
        verb: str = "",
        resource: str = "",
        namespace: str | None = None,
        name: str | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.verb = verb
        self.resource = resource
        self.namespace = namespace
        self.name = name
        code = "no answer" if status is None else str(status)
        where = "/".join(p for p in (namespace, resource, name) if p)
        super().__init__(f"Kubernetes API {verb} {where}: {code} {reason}: {message}".strip())


class TransientApiError(KubeApiError, InfrastructureError):
    """5xx, 429 or no answer (timeout, connection): the same call may succeed later.

    Never evidence that an object is gone: only :class:`NotFoundError` is.
    """


class NotFoundError(KubeApiError):
    """404: the API server confirmed that the object (or its namespace) does not exist."""


class ConflictError(KubeApiError):
    """409: a resourceVersion or uid precondition failed, or the name is taken.

    The object changed since it was read: read it again and decide again (never blindly
    repeat the same write).
    """


class ExpiredError(KubeApiError):
    """410 Gone: a watch asked for a resourceVersion older than the server still keeps.

    List again (or watch without a resourceVersion) and continue from there.
    """


class RejectedError(KubeApiError, UnrecoverableError):
    """Any other 4xx (400 bad request, 401/403 not allowed, 422 invalid): sending the same
    request again gets the same answer. ``message`` is the API server's own explanation."""


class ForeignObjectError(UnrecoverableError):
    """An object with the name we need exists but is not ours (no owner reference with our
    uid): it must not be adopted, overwritten or trusted. ``existing`` is that object."""

    def __init__(self, message: str, existing: dict[str, Any]) -> None:
        self.existing = existing
        super().__init__(message)

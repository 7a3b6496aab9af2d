"""The project's one exception hierarchy.

Callers decide what to do from the *type*: a :class:`RetryableError` may be tried again, a
:class:`RetriesExhaustedError` means the policy gave up, and an :class:`UnrecoverableError`
must stop the work with its message shown to a human (it names the file/field and the fix).
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error this project raises on purpose."""


class UnrecoverableError(OrchestratorError):
    """Retrying cannot help: the input, configuration or environment must be fixed first."""


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

"""SQLAlchemy table definitions: the seed's ``tasks``, ``adapters``, ``execution_log`` and
``patch_history``.

Idempotency lives in the schema: every row an attempt writes has a natural unique key
(run, task, uid, attempt, event), so replaying an attempt hits the key instead of adding a row.

Identity (see :mod:`core.identity`): ``scope`` is the Kubernetes namespace ('' on the embedded
backend) and ``uid`` the TaskExecution's uid ('' on the embedded backend). An adapter and its
breaker are (scope, id); a task is (run_id, task_id, uid).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}  # noqa: RUF012


class Adapter(Base):
    __tablename__ = "adapters"

    scope: Mapped[str] = mapped_column(String(63), primary_key=True, default="")
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]]
    breaker_state: Mapped[str] = mapped_column(String(16), default="CLOSED")
    breaker_failures: Mapped[int] = mapped_column(Integer, default=0)
    breaker_opened_at: Mapped[datetime | None]
    breaker_half_open_in_flight: Mapped[int] = mapped_column(Integer, default=0)
    breaker_version: Mapped[int] = mapped_column(Integer, default=0)
    breaker_tripped_at: Mapped[datetime | None]
    breaker_updated_at: Mapped[datetime | None]
    breaker_window: Mapped[str] = mapped_column(String(100), default="")
    health_status: Mapped[str | None] = mapped_column(String(16))
    health_checked_at: Mapped[datetime | None]
    health_message: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime]


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        ForeignKeyConstraint(
            ["scope", "adapter_id"], ["adapters.scope", "adapters.id"], name="fk_tasks_adapter"
        ),
    )

    run_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), primary_key=True, default="")
    scope: Mapped[str] = mapped_column(String(63), default="")
    seq: Mapped[int] = mapped_column(Integer, comment="position in the phase-4 queue")
    adapter_id: Mapped[str] = mapped_column(String(63))
    current_adapter_id: Mapped[str | None] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failure_class: Mapped[str | None] = mapped_column(String(32))
    failure_message: Mapped[str | None] = mapped_column(Text)
    wait_reason: Mapped[str | None] = mapped_column(Text)
    spec: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]
    pid: Mapped[int | None] = mapped_column(Integer, comment="process group of the live attempt")
    workspace: Mapped[str | None] = mapped_column(Text, comment="worktree of the live attempt")
    attempt_started_at: Mapped[datetime | None] = mapped_column(
        comment="when the live attempt started (an interrupted one is charged from here)"
    )
    attempt_timeout_seconds: Mapped[float | None] = mapped_column(
        Float, comment="the budget granted to the live attempt"
    )
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime]


class ExecutionLog(Base):
    __tablename__ = "execution_log"
    __table_args__ = (UniqueConstraint("event_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_key: Mapped[str] = mapped_column(String(255))
    run_id: Mapped[str] = mapped_column(String(63), index=True)
    task_id: Mapped[str | None] = mapped_column(String(63))
    task_uid: Mapped[str] = mapped_column(String(64), default="")
    attempt: Mapped[int | None] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(32))
    state: Mapped[str | None] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class PatchHistory(Base):
    __tablename__ = "patch_history"
    __table_args__ = (
        UniqueConstraint("seq"),
        UniqueConstraint("entry_hash"),
        UniqueConstraint(
            "run_id", "task_id", "task_uid", "attempt", name="uq_patch_history_attempt"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str] = mapped_column(String(63))
    task_id: Mapped[str] = mapped_column(String(63))
    task_uid: Mapped[str] = mapped_column(String(64), default="")
    scope: Mapped[str] = mapped_column(String(63), default="")
    attempt: Mapped[int] = mapped_column(Integer)
    adapter_id: Mapped[str] = mapped_column(String(63))
    base_commit: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(16))
    failure_class: Mapped[str | None] = mapped_column(String(32))
    diff_sha256: Mapped[str | None] = mapped_column(String(64))
    diff_bytes: Mapped[int] = mapped_column(Integer, default=0)
    files_changed: Mapped[int] = mapped_column(Integer, default=0)
    insertions: Mapped[int] = mapped_column(Integer, default=0)
    deletions: Mapped[int] = mapped_column(Integer, default=0)
    truncated: Mapped[bool] = mapped_column(default=False)
    patch_ref: Mapped[str | None] = mapped_column(
        String(255), comment="evidence-store key of the full diff (never the bytes)"
    )
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime]


class GateTestResult(Base):
    """One test of one check of one attempt's gate that did not simply pass.

    Outcomes: ``new_failure`` (blamed), ``pre_existing``, ``fixed``, ``flaky`` (failed on the
    patched tree, passed alone), ``baseline_flaky``, ``removed`` (failing at baseline, removed
    or skipped by the patch). Passing tests are only counted, in the attempt's result. The
    unique key makes recording an attempt twice a no-op; ``test_key`` (sha256 of the id)
    keeps the key short for ids of any length.
    """

    __tablename__ = "gate_test_results"
    __table_args__ = (
        UniqueConstraint(
            "run_id",
            "task_id",
            "task_uid",
            "attempt",
            "check_name",
            "test_key",
            "outcome",
            name="uq_gate_test_results_attempt",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(63))
    task_id: Mapped[str] = mapped_column(String(63))
    task_uid: Mapped[str] = mapped_column(String(64), default="")
    scope: Mapped[str] = mapped_column(String(63), default="")
    attempt: Mapped[int] = mapped_column(Integer)
    check_name: Mapped[str] = mapped_column(String(63))
    test_key: Mapped[str] = mapped_column(String(64), index=True)
    test_id: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    recorded_at: Mapped[datetime]


class Integration(Base):
    """The integration branch of a run (one per run and scope): where it lives and its head."""

    __tablename__ = "integrations"

    run_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    scope: Mapped[str] = mapped_column(String(63), primary_key=True, default="")
    source: Mapped[str] = mapped_column(Text, comment="the tasks' repository (path or URL)")
    repository: Mapped[str] = mapped_column(Text, comment="the repository holding the branch")
    branch: Mapped[str] = mapped_column(String(255))
    base_commit: Mapped[str] = mapped_column(String(40))
    head_commit: Mapped[str] = mapped_column(String(40))
    pushed_to: Mapped[str | None] = mapped_column(Text)
    pushed_commit: Mapped[str | None] = mapped_column(String(40))
    gate_runs: Mapped[int] = mapped_column(Integer, default=0)
    batches: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class IntegrationTask(Base):
    """The integration worker's verdict on one completed attempt's change; mirrors its ledger
    entry (``ledger_seq``, ``entry_hash``: the anchor ``ledger verify`` checks the tail with)."""

    __tablename__ = "integration_tasks"
    __table_args__ = (
        UniqueConstraint("ledger_seq"),
        UniqueConstraint("entry_hash"),
        UniqueConstraint(
            "run_id", "task_id", "task_uid", "attempt", name="uq_integration_tasks_attempt"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(63), index=True)
    task_id: Mapped[str] = mapped_column(String(63))
    task_uid: Mapped[str] = mapped_column(String(64), default="")
    scope: Mapped[str] = mapped_column(String(63), default="")
    attempt: Mapped[int] = mapped_column(Integer)
    adapter_id: Mapped[str] = mapped_column(String(63))
    outcome: Mapped[str] = mapped_column(String(16))
    commit: Mapped[str | None] = mapped_column(String(40))
    parent_commit: Mapped[str] = mapped_column(String(40))
    base_commit: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text, default="")
    reopened: Mapped[bool] = mapped_column(default=False)
    batch: Mapped[int] = mapped_column(Integer, default=0)
    gate_runs: Mapped[int] = mapped_column(Integer, default=0)
    ledger_seq: Mapped[int] = mapped_column(Integer)
    entry_hash: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime]


class Escalation(Base):
    """One escalation (a seed ``ai_escalation_trigger`` fired; see ``core.engine.escalation``).

    ``escalation_key`` names the fact (the breaker trip, the task, the attempt...), so a
    replayed recording inserts nothing and nobody is told twice. ``notified_at`` /
    ``notify_error`` record the webhook's delivery, ``event_posted_at`` the operator's Events.
    """

    __tablename__ = "escalations"
    __table_args__ = (UniqueConstraint("escalation_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    escalation_key: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(String(32), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[str] = mapped_column(String(63), default="")
    task_id: Mapped[str | None] = mapped_column(String(63))
    task_uid: Mapped[str] = mapped_column(String(64), default="")
    scope: Mapped[str] = mapped_column(String(63), default="")
    attempt: Mapped[int | None] = mapped_column(Integer)
    adapter_id: Mapped[str | None] = mapped_column(String(63))
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    notified_at: Mapped[datetime | None]
    notify_error: Mapped[str | None] = mapped_column(Text)
    #: When the operator posted its Kubernetes Warning Events (core.kube.escalation_events).
    event_posted_at: Mapped[datetime | None]


REQUIRED_TABLES = {"tasks": {"adapter_id"}, "adapters": {"id"}}

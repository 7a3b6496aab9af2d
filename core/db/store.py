"""All database writes of the engine, each one idempotent.

A task's state change and the event it causes are written in one transaction, so the
database never shows a state without its event or the other way round. Events and ledger
mirrors are keyed (run/task/attempt/event, ledger seq and hash): replaying an attempt after
a crash runs the same statements and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db.tables import Adapter, ExecutionLog, PatchHistory, Task
from core.errors import UnrecoverableError
from core.models import (
    AdapterSpec,
    AttemptResult,
    EventName,
    FailureClass,
    LedgerEntry,
    TaskResult,
    TaskSpec,
    TaskState,
    transition,
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class TaskRecord:
    run_id: str
    task_id: str
    seq: int
    adapter_id: str
    current_adapter_id: str | None
    status: TaskState
    attempts: int
    failure_class: FailureClass | None
    failure_message: str | None
    wait_reason: str | None
    spec: TaskSpec
    attempt_results: tuple[AttemptResult, ...]
    pid: int | None
    workspace: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None

    def result(self) -> TaskResult:
        return TaskResult(
            task_id=self.task_id,
            state=self.status,
            adapter_id=self.adapter_id,
            final_adapter_id=self.current_adapter_id,
            attempts=list(self.attempt_results),
            failure_class=self.failure_class,
            failure_message=self.failure_message or "",
            wait_reason=self.wait_reason,
            started_at=self.started_at,
            finished_at=self.finished_at,
            duration_seconds=self.duration_seconds,
        )


@dataclass(frozen=True)
class Event:
    key: str
    run_id: str
    task_id: str | None
    attempt: int | None
    event: str
    state: str | None
    payload: dict[str, Any]
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "ts": self.created_at.isoformat(timespec="milliseconds"),
            "event": self.event,
            "event_key": self.key,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "state": self.state,
            **self.payload,
        }


def _record(row: Task) -> TaskRecord:
    return TaskRecord(
        run_id=row.run_id,
        task_id=row.task_id,
        seq=row.seq,
        adapter_id=row.adapter_id,
        current_adapter_id=row.current_adapter_id,
        status=TaskState(row.status),
        attempts=row.attempts,
        failure_class=FailureClass(row.failure_class) if row.failure_class else None,
        failure_message=row.failure_message,
        wait_reason=row.wait_reason,
        spec=TaskSpec.model_validate(row.spec),
        attempt_results=tuple(
            AttemptResult.model_validate(a) for a in (row.result or {}).get("attempts", [])
        ),
        pid=row.pid,
        workspace=row.workspace,
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        duration_seconds=row.duration_seconds,
    )


class Store:
    def __init__(self, engine: Engine, now: Callable[[], datetime] = _utcnow) -> None:
        self.engine = engine
        self._now = now

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _insert_ignore(self, session: Session, table: Table, values: dict[str, Any]) -> bool:
        """INSERT that is a no-op on a unique-key conflict; True if a row was added."""
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        result = session.execute(insert(table).values(**values).on_conflict_do_nothing())
        return bool(getattr(result, "rowcount", 0))

    # ------------------------------------------------------------------ inputs

    def sync_inputs(
        self,
        run_id: str,
        adapters: Sequence[AdapterSpec],
        tasks: Sequence[tuple[int, TaskSpec, str]],
    ) -> None:
        """Make sure every adapter and routed task (seq, spec, adapter_id) has its row.

        Existing rows keep their state: a restart resumes, it does not reset.
        """
        now = self._now()
        with self._session() as s:
            for spec in adapters:
                row = s.get(Adapter, spec.id)
                data = spec.model_dump(mode="json")
                if row is None:
                    s.add(Adapter(id=spec.id, kind=spec.kind.value, spec=data, updated_at=now))
                elif row.spec != data:
                    row.spec, row.kind, row.updated_at = data, spec.kind.value, now
            for seq, task, adapter_id in tasks:
                row_t = s.get(Task, (run_id, task.task_id))
                if row_t is None:
                    s.add(
                        Task(
                            run_id=run_id,
                            task_id=task.task_id,
                            seq=seq,
                            adapter_id=adapter_id,
                            status=TaskState.PENDING.value,
                            attempts=0,
                            spec=task.model_dump(mode="json"),
                            result={"attempts": []},
                            updated_at=now,
                        )
                    )
                elif row_t.spec != task.model_dump(mode="json") and row_t.attempts > 0:
                    raise UnrecoverableError(
                        f"task {task.task_id!r} of run {run_id!r} changed in task_queue.json after "
                        "it started; a started task's spec is fixed.\n  fix: restore the original "
                        "spec or queue the change as a new task id"
                    )

    # ------------------------------------------------------------------ reads

    def task(self, run_id: str, task_id: str) -> TaskRecord:
        with self._session() as s:
            row = s.get(Task, (run_id, task_id))
            if row is None:
                raise KeyError(f"{run_id}/{task_id}")
            return _record(row)

    def tasks(self, run_id: str) -> list[TaskRecord]:
        with self._session() as s:
            rows = s.scalars(select(Task).where(Task.run_id == run_id).order_by(Task.seq))
            return [_record(r) for r in rows]

    def runs(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(Task.run_id).distinct().order_by(Task.run_id)))

    def adapters(self) -> list[Adapter]:
        with self._session() as s:
            return list(s.scalars(select(Adapter).order_by(Adapter.id)))

    def events(self, run_id: str | None = None) -> list[Event]:
        with self._session() as s:
            query = select(ExecutionLog).order_by(ExecutionLog.id)
            if run_id is not None:
                query = query.where(ExecutionLog.run_id == run_id)
            return [
                Event(
                    key=r.event_key,
                    run_id=r.run_id,
                    task_id=r.task_id,
                    attempt=r.attempt,
                    event=r.event,
                    state=r.state,
                    payload=r.payload,
                    created_at=_aware(r.created_at) or self._now(),
                )
                for r in s.scalars(query)
            ]

    def ledger_anchor(self) -> list[tuple[int, str]]:
        with self._session() as s:
            return [tuple(r) for r in s.execute(select(PatchHistory.seq, PatchHistory.entry_hash))]  # type: ignore[misc]

    def mirrored_seqs(self) -> set[int]:
        with self._session() as s:
            return set(s.scalars(select(PatchHistory.seq)))

    # ------------------------------------------------------------------ writes

    def _event(
        self,
        s: Session,
        run_id: str,
        event: EventName,
        *,
        task_id: str | None = None,
        attempt: int | None = None,
        state: TaskState | None = None,
        payload: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Event | None:
        ev = Event(
            key=key or f"{run_id}/{task_id}/{attempt}/{event.value}",
            run_id=run_id,
            task_id=task_id,
            attempt=attempt,
            event=event.value,
            state=state.value if state else None,
            payload=payload or {},
            created_at=self._now(),
        )
        values = {
            "event_key": ev.key,
            "run_id": ev.run_id,
            "task_id": ev.task_id,
            "attempt": ev.attempt,
            "event": ev.event,
            "state": ev.state,
            "payload": ev.payload,
            "created_at": ev.created_at,
        }
        inserted = self._insert_ignore(s, ExecutionLog.__table__, values)  # type: ignore[arg-type]
        return ev if inserted else None

    def _locked(self, s: Session, run_id: str, task_id: str) -> Task:
        row = s.scalars(
            select(Task).where(Task.run_id == run_id, Task.task_id == task_id).with_for_update()
        ).one_or_none()
        if row is None:
            raise KeyError(f"{run_id}/{task_id}")
        return row

    def begin_attempt(
        self, run_id: str, task_id: str, attempt: int, adapter_id: str
    ) -> list[Event]:
        with self._session() as s:
            row = self._locked(s, run_id, task_id)
            if row.status == TaskState.IN_PROGRESS.value and row.attempts == attempt:
                return []  # replayed (e.g. an operator restarted after creating the Job)
            row.status = transition(TaskState(row.status), TaskState.IN_PROGRESS).value
            now = self._now()
            row.attempts, row.current_adapter_id, row.wait_reason = attempt, adapter_id, None
            row.started_at = row.started_at or now
            row.pid = row.workspace = None
            row.updated_at = now
            ev = self._event(
                s,
                run_id,
                EventName.TASK_STARTED,
                task_id=task_id,
                attempt=attempt,
                state=TaskState.IN_PROGRESS,
                payload={"adapter_id": adapter_id},
            )
            return [ev] if ev else []

    def set_process(
        self, run_id: str, task_id: str, pid: int | None, workspace: str | None
    ) -> None:
        with self._session() as s:
            s.execute(
                update(Task)
                .where(Task.run_id == run_id, Task.task_id == task_id)
                .values(pid=pid, workspace=workspace, updated_at=self._now())
            )

    def set_validating(self, run_id: str, task_id: str) -> None:
        with self._session() as s:
            row = self._locked(s, run_id, task_id)
            if row.status == TaskState.VALIDATING.value:
                return
            row.status = transition(TaskState(row.status), TaskState.VALIDATING).value
            row.updated_at = self._now()

    def set_waiting(self, run_id: str, task_id: str, reason: str | None) -> None:
        """Leave a PENDING task waiting (breaker open, human patch, safe mode) and say why."""
        with self._session() as s:
            row = self._locked(s, run_id, task_id)
            if TaskState(row.status) is not TaskState.PENDING:
                raise UnrecoverableError(f"task {task_id} is {row.status}, not PENDING")
            row.wait_reason, row.updated_at = reason, self._now()

    def finish_attempt(
        self,
        run_id: str,
        task_id: str,
        result: AttemptResult,
        *,
        final: bool,
        entry: LedgerEntry | None,
        patch: bytes | None = None,
    ) -> list[Event]:
        """Record a finished attempt: the task becomes terminal (``final``) or PENDING again.

        Idempotent: an attempt already recorded is not recorded twice.
        """
        events: list[Event] = []
        with self._session() as s:
            row = self._locked(s, run_id, task_id)
            if entry is not None:
                self._mirror(s, entry, patch)
            attempts = list((row.result or {}).get("attempts", []))
            if any(a["attempt"] == result.attempt for a in attempts):
                return events
            target = result.state if final else TaskState.PENDING
            row.status = transition(TaskState(row.status), target).value
            row.result = {"attempts": [*attempts, result.model_dump(mode="json")]}
            row.pid = row.workspace = None
            now = self._now()
            row.updated_at = now
            row.failure_class = result.failure_class.value if result.failure_class else None
            row.failure_message = result.failure_message or None
            if final:
                row.finished_at = result.finished_at
                started = _aware(row.started_at) or result.started_at
                row.duration_seconds = round((result.finished_at - started).total_seconds(), 3)
            name = (
                (
                    EventName.TASK_COMPLETED
                    if target is TaskState.COMPLETED
                    else EventName.TASK_FAILED
                )
                if final
                else EventName.ATTEMPT_FAILED
            )
            payload: dict[str, Any] = {
                "adapter_id": result.adapter_id,
                "failure_class": row.failure_class,
                "message": result.failure_message,
                "duration_seconds": result.duration_seconds,
            }
            if result.diff is not None:
                payload["diff_sha256"] = result.diff.sha256
                payload["files_changed"] = result.diff.files_changed
            ev = self._event(
                s,
                run_id,
                name,
                task_id=task_id,
                attempt=result.attempt,
                state=target,
                payload=payload,
            )
            if ev:
                events.append(ev)
        return events

    def set_health(self, adapter_id: str, healthy: bool, message: str, at: datetime) -> None:
        with self._session() as s:
            s.execute(
                update(Adapter)
                .where(Adapter.id == adapter_id)
                .values(
                    health_status="healthy" if healthy else "unhealthy",
                    health_message=message,
                    health_checked_at=at,
                    updated_at=self._now(),
                )
            )

    def give_up(self, run_id: str, task_id: str, reason: str) -> list[Event]:
        """End a waiting task without another attempt (its policy or budget ran out)."""
        with self._session() as s:
            row = self._locked(s, run_id, task_id)
            current = TaskState(row.status)
            if current.terminal:
                return []
            timed_out = row.failure_class == FailureClass.ADAPTER_TIMEOUT.value
            target = TaskState.TIMEOUT if timed_out else TaskState.FAILED
            row.status = transition(current, target).value
            now = self._now()
            row.failure_message = f"{row.failure_message or ''}\n{reason}".strip()
            row.wait_reason, row.finished_at, row.updated_at = None, now, now
            started = _aware(row.started_at)
            row.duration_seconds = round((now - started).total_seconds(), 3) if started else None
            ev = self._event(
                s,
                run_id,
                EventName.TASK_FAILED,
                task_id=task_id,
                attempt=row.attempts,
                state=target,
                payload={"failure_class": row.failure_class, "message": reason},
            )
            return [ev] if ev else []

    def cancel(self, run_id: str, task_id: str, reason: str) -> list[Event]:
        """A task cancelled from outside (e.g. its TaskExecution was deleted)."""
        with self._session() as s:
            row = self._locked(s, run_id, task_id)
            current = TaskState(row.status)
            if current.terminal:
                return []
            row.status = transition(current, TaskState.CANCELLED).value
            now = self._now()
            row.failure_class, row.failure_message = FailureClass.CANCELLED.value, reason
            row.wait_reason, row.finished_at, row.updated_at = None, now, now
            row.pid = row.workspace = None
            ev = self._event(
                s,
                run_id,
                EventName.TASK_FAILED,
                task_id=task_id,
                attempt=row.attempts,
                state=TaskState.CANCELLED,
                payload={"failure_class": FailureClass.CANCELLED.value, "message": reason},
            )
            return [ev] if ev else []

    def mirror_ledger(self, entry: LedgerEntry, patch: bytes | None) -> bool:
        with self._session() as s:
            return self._mirror(s, entry, patch)

    def _mirror(self, s: Session, entry: LedgerEntry, patch: bytes | None) -> bool:
        values = {
            "seq": entry.seq,
            "run_id": entry.run_id,
            "task_id": entry.task_id,
            "attempt": entry.attempt,
            "adapter_id": entry.adapter_id,
            "base_commit": entry.base_commit,
            "state": entry.state.value,
            "failure_class": entry.failure_class.value if entry.failure_class else None,
            "diff_sha256": entry.diff_sha256,
            "diff_bytes": entry.diff_bytes,
            "files_changed": entry.files_changed,
            "insertions": entry.insertions,
            "deletions": entry.deletions,
            "truncated": entry.truncated,
            "patch": patch,
            "prev_hash": entry.prev_hash,
            "entry_hash": entry.hash,
            "recorded_at": entry.recorded_at,
        }
        return self._insert_ignore(s, PatchHistory.__table__, values)  # type: ignore[arg-type]

    def run_event(
        self, run_id: str, event: EventName, payload: dict[str, Any], key: str
    ) -> list[Event]:
        with self._session() as s:
            ev = self._event(s, run_id, event, payload=payload, key=key)
            return [ev] if ev else []

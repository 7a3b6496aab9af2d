"""All database writes of the engine, each one idempotent.

A task's state change and the event it causes are written in one transaction, so the
database never shows a state without its event or the other way round. Finishing an attempt
also feeds the adapter's circuit breaker in that same transaction, so a replayed attempt is
never counted twice. Events and ledger mirrors are keyed (task identity/attempt/event,
ledger seq and hash): replaying an attempt after a crash runs the same statements and changes
nothing.

Every task is addressed by its :class:`~core.identity.TaskKey` and every adapter by
(scope, id); see :mod:`core.identity`. Which state a task ends in is decided by the
lifecycle (``core.engine.lifecycle``) and handed in: this module records, it never decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from core.db.breaker_rows import feed
from core.db.insert import insert_ignore
from core.db.tables import Adapter, ExecutionLog, PatchHistory, Task
from core.errors import UnrecoverableError
from core.identity import EMBEDDED_SCOPE, TaskKey
from core.models import (
    INTEGRATION_FAILURE_CLASSES,
    AdapterSpec,
    AttemptResult,
    EventName,
    FailureClass,
    LedgerEntry,
    TaskResult,
    TaskSpec,
    TaskState,
    reopen,
    transition,
)

#: Applied to an adapter's breaker columns inside the recording transaction; returns the new
#: columns or None (see ``core.engine.resilience.breaker_store.BreakerFeed``).
BreakerUpdate = Callable[[dict[str, Any] | None], dict[str, Any] | None]


def _utcnow() -> datetime:
    return datetime.now(UTC)


# The writes of every attempt, built once with bound parameters: a statement built per call
# costs SQLAlchemy more Python (coercions, cache key, the ORM's session sync) than SQLite
# takes to run it. Core statements on the table: no ORM object is loaded for them.
_TASKS: Table = Task.__table__  # type: ignore[assignment]
_BY_KEY = (
    (_TASKS.c.run_id == bindparam("k_run"))
    & (_TASKS.c.task_id == bindparam("k_task"))
    & (_TASKS.c.uid == bindparam("k_uid"))
)
_SET_PROCESS = (
    update(_TASKS)
    .where(_BY_KEY)
    .values(pid=bindparam("pid"), workspace=bindparam("workspace"), updated_at=bindparam("now"))
)
#: PENDING -> IN_PROGRESS, the only legal way in; any other row (a replay, an illegal move)
#: is left to the full check.
_BEGIN = (
    update(_TASKS)
    .where(_BY_KEY & (_TASKS.c.status == TaskState.PENDING.value))
    .values(
        status=TaskState.IN_PROGRESS.value,
        attempts=bindparam("b_attempt"),
        current_adapter_id=bindparam("b_adapter"),
        wait_reason=None,
        started_at=func.coalesce(
            _TASKS.c.started_at, bindparam("b_begun", type_=_TASKS.c.started_at.type)
        ),
        attempt_started_at=bindparam("b_begun", type_=_TASKS.c.attempt_started_at.type),
        attempt_timeout_seconds=bindparam("b_timeout"),
        pid=None,
        workspace=None,
        updated_at=bindparam("now", type_=_TASKS.c.updated_at.type),
    )
)
#: IN_PROGRESS -> VALIDATING, the only legal way in; any other row is left to the full check.
_SET_VALIDATING = (
    update(_TASKS)
    .where(_BY_KEY & (_TASKS.c.status == TaskState.IN_PROGRESS.value))
    .values(status=TaskState.VALIDATING.value, updated_at=bindparam("now"))
)


_TASK = select(_TASKS).where(_BY_KEY)
_TASK_LOCKED = _TASK.with_for_update()


def _finish_statement(final: bool) -> Any:
    """The write of a finished attempt; ``final``: the task's end time and duration too."""
    columns = [
        "status",
        "result",
        "updated_at",
        "failure_class",
        "failure_message",
        *(("finished_at", "duration_seconds") if final else ()),
    ]
    values: dict[str, Any] = {c: bindparam(f"f_{c}", type_=_TASKS.c[c].type) for c in columns}
    values |= {"pid": None, "workspace": None}
    values |= {"attempt_started_at": None, "attempt_timeout_seconds": None}
    return update(_TASKS).where(_BY_KEY).values(values)


#: A finished attempt's row, written in one statement after the row is read (and locked)
#: with a Core select: the ORM's load and flush of the row cost more Python than both.
_FINISH = {False: _finish_statement(False), True: _finish_statement(True)}


def _key_params(key: TaskKey) -> dict[str, Any]:
    return {"k_run": key.run_id, "k_task": key.task_id, "k_uid": key.uid}


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class TaskRecord:
    key: TaskKey
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
    attempt_started_at: datetime | None = None
    attempt_timeout_seconds: float | None = None

    @property
    def run_id(self) -> str:
        return self.key.run_id

    @property
    def task_id(self) -> str:
        return self.key.task_id

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
    task_uid: str = ""

    def as_json(self) -> dict[str, Any]:
        record = {
            "ts": self.created_at.isoformat(timespec="milliseconds"),
            "event": self.event,
            "event_key": self.key,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "state": self.state,
        }
        if self.task_uid:
            record["task_uid"] = self.task_uid
        return {**record, **self.payload}


def _record(row: Any) -> TaskRecord:
    """From a :class:`Task` object or a row of the ``tasks`` table (same attribute names)."""
    return TaskRecord(
        key=TaskKey(row.run_id, row.task_id, row.uid, row.scope),
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
        attempt_started_at=_aware(row.attempt_started_at),
        attempt_timeout_seconds=row.attempt_timeout_seconds,
    )


#: A task's row: key, queue order (seq), spec, first Adapter.
TaskRow = tuple[TaskKey, int, TaskSpec, str]


def _new_task_values(
    key: TaskKey, seq: int, task: TaskSpec, adapter_id: str, now: datetime
) -> dict[str, Any]:
    return {
        "run_id": key.run_id,
        "task_id": key.task_id,
        "uid": key.uid,
        "scope": key.scope,
        "seq": seq,
        "adapter_id": adapter_id,
        "status": TaskState.PENDING.value,
        "attempts": 0,
        "spec": task.model_dump(mode="json"),
        "result": {"attempts": []},
        "updated_at": now,
    }


def fresh_record(key: TaskKey, seq: int, task: TaskSpec, adapter_id: str) -> TaskRecord:
    """The record of a task whose row is not written yet: what the insert will hold."""
    return TaskRecord(
        key=key,
        seq=seq,
        adapter_id=adapter_id,
        current_adapter_id=None,
        status=TaskState.PENDING,
        attempts=0,
        failure_class=None,
        failure_message=None,
        wait_reason=None,
        spec=task,
        attempt_results=(),
        pid=None,
        workspace=None,
        started_at=None,
        finished_at=None,
        duration_seconds=None,
    )


def _same_spec(stored: dict[str, Any], task: TaskSpec) -> bool:
    """Whether a stored spec is ``task``; fields added later with defaults do not count."""
    try:
        return TaskSpec.model_validate(stored) == task
    except ValueError:
        return False


def _event_key(key: TaskKey, attempt: int | None, event: EventName) -> str:
    return f"{key.qualified}/{attempt}/{event.value}"


@dataclass(frozen=True)
class Recorded:
    """What recording a finished attempt did: the events it added, and whether it was new."""

    events: list[Event]
    new: bool
    #: The task's row as the recording transaction left it (saves the caller a read).
    record: TaskRecord | None = None


class Store:
    def __init__(self, engine: Engine, now: Callable[[], datetime] = _utcnow) -> None:
        self.engine = engine
        self._now = now

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _insert_ignore(self, session: Session, table: Table, values: dict[str, Any]) -> bool:
        return insert_ignore(session, table, values)

    # ------------------------------------------------------------------ inputs

    def sync_adapters(self, scope: str, adapters: Sequence[AdapterSpec]) -> None:
        """Make sure every adapter of ``scope`` has its row with its current spec.

        Race-free: two processes seeing a new adapter at once both insert-or-ignore.
        """
        now = self._now()
        with self._session() as s:
            for spec in adapters:
                data = spec.model_dump(mode="json")
                values = {
                    "scope": scope,
                    "id": spec.id,
                    "kind": spec.kind.value,
                    "spec": data,
                    "breaker_state": "CLOSED",
                    "breaker_failures": 0,
                    "breaker_half_open_in_flight": 0,
                    "breaker_version": 0,
                    "breaker_window": "",
                    "updated_at": now,
                }
                if self._insert_ignore(s, Adapter.__table__, values):  # type: ignore[arg-type]
                    continue
                row = s.get(Adapter, (scope, spec.id))
                if row is not None and row.spec != data:
                    row.spec, row.kind, row.updated_at = data, spec.kind.value, now

    def sync_tasks(self, tasks: Sequence[TaskRow]) -> None:
        """Make sure every routed task (key, seq, spec, adapter id) has its row.

        Existing rows keep their state: a restart resumes, it does not reset. A task whose
        spec changed after it started is refused (its history would describe another task).
        """
        now = self._now()
        with self.engine.begin() as conn:
            for key, seq, task, adapter_id in tasks:
                self._ensure_task(conn, key, seq, task, adapter_id, now)

    def synced_task(self, key: TaskKey, seq: int, task: TaskSpec, adapter_id: str) -> TaskRecord:
        """:meth:`sync_tasks` of one task and its record, in one transaction (the operator's
        first look at a task)."""
        with self.engine.begin() as conn:
            row = self._ensure_task(conn, key, seq, task, adapter_id, self._now())
        if row is None:
            raise KeyError(key.qualified)  # deleted in between (a purge)
        return _record(row)

    def _ensure_task(
        self,
        conn: Connection,
        key: TaskKey,
        seq: int,
        task: TaskSpec,
        adapter_id: str,
        now: datetime,
    ) -> Row[Any] | None:
        """The task's row, inserted unless it exists; refused if it started with another spec."""
        values = _new_task_values(key, seq, task, adapter_id, now)
        inserted = insert_ignore(conn, _TASKS, values)
        row = conn.execute(_TASK, _key_params(key)).first()
        started = row is not None and not inserted and row.attempts > 0
        if started and row is not None and not _same_spec(row.spec, task):
            where = "task_queue.json" if not key.uid else "its TaskExecution"
            raise UnrecoverableError(
                f"task {key.display!r} of run {key.run_id!r} changed in {where} after "
                "it started; a started task's spec is fixed.\n  fix: restore the "
                "original spec or queue the change as a new task"
            )
        return row

    def sync_inputs(
        self,
        run_id: str,
        adapters: Sequence[AdapterSpec],
        tasks: Sequence[tuple[int, TaskSpec, str]],
    ) -> None:
        """The embedded backend's inputs: adapters and (seq, spec, adapter id) of a run."""
        self.sync_adapters(EMBEDDED_SCOPE, adapters)
        self.sync_tasks([(TaskKey(run_id, t.task_id), seq, t, a) for seq, t, a in tasks])

    # ------------------------------------------------------------------ reads

    def task(self, key: TaskKey) -> TaskRecord:
        with self.engine.connect() as conn:
            row = conn.execute(_TASK, _key_params(key)).first()
        if row is None:
            raise KeyError(key.qualified)
        return _record(row)

    def find_task(self, key: TaskKey) -> TaskRecord | None:
        try:
            return self.task(key)
        except KeyError:
            return None

    def tasks(self, run_id: str, scope: str | None = None) -> list[TaskRecord]:
        """A run's tasks in queue order; ``scope``: only those of one namespace."""
        with self._session() as s:
            query = select(Task).where(Task.run_id == run_id)
            if scope is not None:
                query = query.where(Task.scope == scope)
            rows = s.scalars(query.order_by(Task.seq, Task.scope, Task.task_id, Task.uid))
            return [_record(r) for r in rows]

    def unfinished(self, scope: str | None = None) -> list[TaskRecord]:
        """Every task not in a terminal state (optionally of one scope), any run."""
        terminal = [s.value for s in TaskState if s.terminal]
        with self._session() as s:
            query = select(Task).where(Task.status.not_in(terminal))
            if scope is not None:
                query = query.where(Task.scope == scope)
            return [_record(r) for r in s.scalars(query.order_by(Task.run_id, Task.seq))]

    def runs(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(Task.run_id).distinct().order_by(Task.run_id)))

    def adapters(self, scope: str | None = None) -> list[Adapter]:
        with self._session() as s:
            query = select(Adapter).order_by(Adapter.scope, Adapter.id)
            if scope is not None:
                query = query.where(Adapter.scope == scope)
            return list(s.scalars(query))

    def events(self, run_id: str | None = None) -> list[Event]:
        return list(self.iter_events(run_id))

    def iter_events(self, run_id: str | None = None) -> Iterator[Event]:
        """``execution_log`` in insert order, fetched in batches (a repair of the operator's
        whole log holds a batch, not the table)."""
        with self._session() as s:
            query = select(ExecutionLog).order_by(ExecutionLog.id)
            if run_id is not None:
                query = query.where(ExecutionLog.run_id == run_id)
            for r in s.scalars(query.execution_options(yield_per=1000)):
                yield Event(
                    key=r.event_key,
                    run_id=r.run_id,
                    task_id=r.task_id,
                    attempt=r.attempt,
                    event=r.event,
                    state=r.state,
                    payload=r.payload,
                    created_at=_aware(r.created_at) or self._now(),
                    task_uid=r.task_uid,
                )

    def ledger_anchor(self) -> list[tuple[int, str]]:
        with self._session() as s:
            return [tuple(r) for r in s.execute(select(PatchHistory.seq, PatchHistory.entry_hash))]  # type: ignore[misc]

    def patch_refs(self) -> set[str]:
        """Every evidence key the ``patch_history`` mirror references."""
        with self._session() as s:
            query = select(PatchHistory.patch_ref).where(PatchHistory.patch_ref.is_not(None))
            return {r for r in s.scalars(query) if r}

    def patch_ref(self, key: TaskKey, attempt: int) -> str | None:
        """The evidence key of one recorded attempt's full diff."""
        with self._session() as s:
            return s.scalars(
                select(PatchHistory.patch_ref).where(
                    PatchHistory.run_id == key.run_id,
                    PatchHistory.task_id == key.task_id,
                    PatchHistory.task_uid == key.uid,
                    PatchHistory.attempt == attempt,
                )
            ).one_or_none()

    def mirrored_seqs(self) -> set[int]:
        with self._session() as s:
            return set(s.scalars(select(PatchHistory.seq)))

    # ------------------------------------------------------------------ writes

    def _event(
        self,
        s: Session,
        key: TaskKey | None,
        run_id: str,
        event: EventName,
        *,
        attempt: int | None = None,
        state: TaskState | None = None,
        payload: dict[str, Any] | None = None,
        event_key: str | None = None,
    ) -> Event | None:
        ev = Event(
            key=event_key or _event_key(key or TaskKey(run_id, ""), attempt, event),
            run_id=run_id,
            task_id=key.task_id if key else None,
            attempt=attempt,
            event=event.value,
            state=state.value if state else None,
            payload=payload or {},
            created_at=self._now(),
            task_uid=key.uid if key else "",
        )
        values = {
            "event_key": ev.key,
            "run_id": ev.run_id,
            "task_id": ev.task_id,
            "task_uid": ev.task_uid,
            "attempt": ev.attempt,
            "event": ev.event,
            "state": ev.state,
            "payload": ev.payload,
            "created_at": ev.created_at,
        }
        inserted = self._insert_ignore(s, ExecutionLog.__table__, values)  # type: ignore[arg-type]
        return ev if inserted else None

    def _locked(self, s: Session, key: TaskKey) -> Task:
        row = s.get(Task, (key.run_id, key.task_id, key.uid), with_for_update=True)
        if row is None:
            raise KeyError(key.qualified)
        return row

    def begin_attempt(
        self,
        key: TaskKey,
        attempt: int,
        adapter_id: str,
        *,
        timeout_seconds: float | None = None,
        started_at: datetime | None = None,
    ) -> list[Event]:
        with self._session() as s:
            now = started_at or self._now()
            params = {"b_attempt": attempt, "b_adapter": adapter_id, "b_begun": now}
            params |= {"b_timeout": timeout_seconds, "now": self._now()}
            moved = s.execute(_BEGIN, _key_params(key) | params)
            if getattr(moved, "rowcount", 0) != 1:
                # not PENDING when the guarded UPDATE looked: a replay, an illegal move, or
                # (another writer since) PENDING again: the full read-check-write decides
                row = self._locked(s, key)
                if row.status == TaskState.IN_PROGRESS.value and row.attempts == attempt:
                    return []  # replayed (e.g. an operator restarted after creating the Job)
                row.status = transition(TaskState(row.status), TaskState.IN_PROGRESS).value
                row.attempts, row.current_adapter_id, row.wait_reason = attempt, adapter_id, None
                row.started_at = row.started_at or now
                row.attempt_started_at, row.attempt_timeout_seconds = now, timeout_seconds
                row.pid = row.workspace = None
                row.updated_at = self._now()
            ev = self._event(
                s,
                key,
                key.run_id,
                EventName.TASK_STARTED,
                attempt=attempt,
                state=TaskState.IN_PROGRESS,
                payload={"adapter_id": adapter_id},
            )
            return [ev] if ev else []

    def set_process(self, key: TaskKey, pid: int | None, workspace: str | None) -> None:
        params = {"pid": pid, "workspace": workspace, "now": self._now()}
        with self.engine.begin() as conn:
            conn.execute(_SET_PROCESS, _key_params(key) | params)

    def set_validating(self, key: TaskKey) -> None:
        with self.engine.begin() as conn:
            moved = conn.execute(_SET_VALIDATING, _key_params(key) | {"now": self._now()})
        if moved.rowcount == 1:
            return
        # already VALIDATING (a replay), or not a legal move: the full check says which
        with self._session() as s:
            row = self._locked(s, key)
            if row.status == TaskState.VALIDATING.value:
                return
            row.status = transition(TaskState(row.status), TaskState.VALIDATING).value
            row.updated_at = self._now()

    def set_waiting(self, key: TaskKey, reason: str | None) -> None:
        """Leave a PENDING task waiting (backoff, breaker open, human patch, safe mode)."""
        with self._session() as s:
            row = self._locked(s, key)
            if TaskState(row.status) is not TaskState.PENDING:
                raise UnrecoverableError(f"task {key.display} is {row.status}, not PENDING")
            if row.wait_reason != reason:
                row.wait_reason, row.updated_at = reason, self._now()

    def finish_attempt(
        self,
        key: TaskKey,
        result: AttemptResult,
        *,
        final_state: TaskState | None,
        final_message: str = "",
        entry: LedgerEntry | None,
        breaker: BreakerUpdate | None = None,
    ) -> Recorded:
        """Record a finished attempt: the task ends in ``final_state``, or is PENDING again
        (``final_state=None``) for its next attempt; the adapter's breaker is fed by
        ``breaker`` in the same transaction.

        Idempotent: an attempt already recorded is not recorded (nor counted) twice.
        """
        with self._session() as s:
            found = s.execute(_TASK_LOCKED, _key_params(key)).mappings().first()
            if found is None:
                raise KeyError(key.qualified)
            row = SimpleNamespace(**found)
            if entry is not None:
                self._mirror(s, entry, key.scope)
            attempts = list((row.result or {}).get("attempts", []))
            if any(a["attempt"] == result.attempt for a in attempts):
                return Recorded([], new=False, record=_record(row))
            target = final_state or TaskState.PENDING
            row.status = transition(TaskState(row.status), target).value
            row.result = {"attempts": [*attempts, result.model_dump(mode="json")]}
            row.pid = row.workspace = None
            row.attempt_started_at = row.attempt_timeout_seconds = None
            now = self._now()
            row.updated_at = now
            row.failure_class = result.failure_class.value if result.failure_class else None
            message = final_message if final_state is not None else ""
            row.failure_message = (
                None if target is TaskState.COMPLETED else (message or result.failure_message)
            ) or None
            if final_state is not None:
                row.finished_at = result.finished_at
                started = _aware(row.started_at) or result.started_at
                row.duration_seconds = round((result.finished_at - started).total_seconds(), 3)
            final = final_state is not None
            columns = ["status", "result", "updated_at", "failure_class", "failure_message"]
            columns += ["finished_at", "duration_seconds"] if final else []
            written = {f"f_{c}": getattr(row, c) for c in columns}
            s.execute(_FINISH[final], _key_params(key) | written)
            if breaker is not None:
                self._feed_breaker(s, row.scope, result.adapter_id, breaker)
            name = (
                (
                    EventName.TASK_COMPLETED
                    if target is TaskState.COMPLETED
                    else EventName.TASK_FAILED
                )
                if final_state is not None
                else EventName.ATTEMPT_FAILED
            )
            payload: dict[str, Any] = {
                "adapter_id": result.adapter_id,
                "failure_class": row.failure_class,
                "message": row.failure_message or result.failure_message,
                "duration_seconds": result.duration_seconds,
            }
            if result.diff is not None:
                payload["diff_sha256"] = result.diff.sha256
                payload["files_changed"] = result.diff.files_changed
            if result.usage is not None:
                payload["usage"] = result.usage.model_dump()
            ev = self._event(
                s,
                key,
                key.run_id,
                name,
                attempt=result.attempt,
                state=target,
                payload=payload,
            )
            return Recorded([ev] if ev else [], new=True, record=_record(row))

    def _feed_breaker(
        self, s: Session, scope: str, adapter_id: str, breaker: BreakerUpdate
    ) -> None:
        feed(s, scope, adapter_id, breaker, self._now())

    def set_health(
        self, adapter_id: str, healthy: bool, message: str, at: datetime, scope: str = ""
    ) -> None:
        with self._session() as s:
            s.execute(
                update(Adapter)
                .where(Adapter.scope == scope, Adapter.id == adapter_id)
                .values(
                    health_status="healthy" if healthy else "unhealthy",
                    health_message=message,
                    health_checked_at=at,
                    updated_at=self._now(),
                )
            )

    def end_task(
        self,
        key: TaskKey,
        state: TaskState,
        failure_class: FailureClass | None,
        message: str,
    ) -> list[Event]:
        """End a task without another attempt, in the state the lifecycle decided (a budget
        spent while waiting, a cancellation, an unusable spec)."""
        with self._session() as s:
            row = self._locked(s, key)
            current = TaskState(row.status)
            if current.terminal:
                return []
            row.status = transition(current, state).value
            now = self._now()
            if failure_class is not None:
                row.failure_class = failure_class.value
            previous = row.failure_message or ""
            row.failure_message = (
                message if not previous or message in previous else f"{previous}\n{message}"
            )
            row.wait_reason, row.finished_at, row.updated_at = None, now, now
            row.pid = row.workspace = None
            row.attempt_started_at = row.attempt_timeout_seconds = None
            started = _aware(row.started_at)
            row.duration_seconds = round((now - started).total_seconds(), 3) if started else None
            ev = self._event(
                s,
                key,
                key.run_id,
                EventName.TASK_FAILED,
                attempt=row.attempts,
                state=state,
                payload={"failure_class": row.failure_class, "message": message},
            )
            return [ev] if ev else []

    def reopen_task(self, key: TaskKey, result: AttemptResult) -> list[Event]:
        """A COMPLETED task sent back by the integration worker: PENDING again, its completed
        attempt replaced by ``result`` (not final, carrying the verdict; decided by the
        lifecycle's ``reopen``), with a TASK_REOPENED event in the same transaction.

        Idempotent: a task already reopened for that attempt is left as it is.
        """
        with self._session() as s:
            row = self._locked(s, key)
            attempts = list((row.result or {}).get("attempts", []))
            if not attempts or attempts[-1]["attempt"] != result.attempt:
                return []
            if attempts[-1].get("integration") is not None:
                return []  # replayed
            verdict = result.integration
            assert verdict is not None
            row.status = reopen(TaskState(row.status)).value
            row.result = {"attempts": [*attempts[:-1], result.model_dump(mode="json")]}
            row.failure_class = INTEGRATION_FAILURE_CLASSES[verdict.outcome].value
            row.failure_message = verdict.message
            row.finished_at = row.duration_seconds = None
            row.updated_at = self._now()
            ev = self._event(
                s,
                key,
                key.run_id,
                EventName.TASK_REOPENED,
                attempt=result.attempt,
                state=TaskState.PENDING,
                payload={
                    "adapter_id": result.adapter_id,
                    "failure_class": row.failure_class,
                    "message": verdict.message,
                    "backoff_seconds": result.backoff_seconds,
                    "rebase_commit": verdict.rebase_commit,
                },
            )
            return [ev] if ev else []

    def mirror_ledger(self, entry: LedgerEntry, scope: str = "") -> bool:
        with self._session() as s:
            return self._mirror(s, entry, scope)

    def _mirror(self, s: Session, entry: LedgerEntry, scope: str) -> bool:
        """The ledger entry's row; the patch itself stays in the evidence store (by key)."""
        values = {
            "seq": entry.seq,
            "run_id": entry.run_id,
            "task_id": entry.task_id,
            "task_uid": entry.task_uid or "",
            "scope": entry.scope or scope,
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
            "patch_ref": entry.patch_ref,
            "prev_hash": entry.prev_hash,
            "entry_hash": entry.hash,
            "recorded_at": entry.recorded_at,
        }
        return self._insert_ignore(s, PatchHistory.__table__, values)  # type: ignore[arg-type]

    def run_event(
        self, run_id: str, event: EventName, payload: dict[str, Any], key: str
    ) -> list[Event]:
        with self._session() as s:
            ev = self._event(s, None, run_id, event, payload=payload, event_key=key)
            return [ev] if ev else []

"""Escalations: the seed's ``ai_escalation_triggers``, raised where the facts are decided.

A person should look when

* a circuit breaker opens (``breaker_open``), or stays open (not CLOSED) for longer than
  ``breaker_open_seconds`` (``breaker_open_too_long``);
* acceptance tests fail repeatedly: ``gate_failures`` attempts of one adapter in a row failed
  the test gate, in ledger order, across tasks (``gate_failed_repeatedly``);
* a task's time budget is exceeded (``task_timeout``);
* an adapter crashes: its process exited non-zero or died of a signal (``adapter_crash``);
* the executor is unavailable: it entered safe mode (``executor_unavailable``).

The recorder (``core.engine.recorder``) sees every recorded attempt and breaker transition
and hands them to :meth:`Escalations.attempt_recorded` / :meth:`~Escalations.task_ended`; the
executor reports safe mode and the breakers it looked at. Each escalation is keyed by the
fact that fired (the breaker's trip time, the task, the attempt, the first attempt of a
streak), and the ``escalations`` table's unique key decides whether it is new, so a replayed
recording or a restarted executor never escalates twice. A new escalation is then written to
``logs/escalations.jsonl`` (repaired from the database after a crash), counted in
``escalations_total{reason}``, handed to extra sinks (the operator's Warning Events) and to
the optional webhook (``core.engine.alert_webhook``).

Each record says where the evidence is: the task's log, the ledger entry, the results file,
the database rows, ``logs/resilience.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from core.db.escalations import EscalationRows
from core.engine.alert_webhook import WebhookConfig, WebhookSender
from core.engine.log_lock import APPEND_LOCK, AppendLock, torn
from core.engine.monitoring.metrics import Metrics
from core.engine.resilience.circuit_breaker import (
    BreakerSnapshot,
    BreakerState,
    BreakerTransition,
)
from core.identity import TaskKey
from core.models import AttemptResult, EventName, FailureClass, TaskState

ESCALATIONS_LOG = Path("logs") / "escalations.jsonl"


class EscalationReason(StrEnum):
    BREAKER_OPEN = "breaker_open"
    BREAKER_OPEN_TOO_LONG = "breaker_open_too_long"
    GATE_FAILED_REPEATEDLY = "gate_failed_repeatedly"
    TASK_TIMEOUT = "task_timeout"
    ADAPTER_CRASH = "adapter_crash"
    EXECUTOR_UNAVAILABLE = "executor_unavailable"


SEVERITY: dict[EscalationReason, str] = {
    EscalationReason.BREAKER_OPEN: "warning",
    EscalationReason.BREAKER_OPEN_TOO_LONG: "critical",
    EscalationReason.GATE_FAILED_REPEATEDLY: "warning",
    EscalationReason.TASK_TIMEOUT: "warning",
    EscalationReason.ADAPTER_CRASH: "warning",
    EscalationReason.EXECUTOR_UNAVAILABLE: "critical",
}


@dataclass(frozen=True)
class EscalationPolicy:
    """When to escalate, and where to besides the file, the database and the metric."""

    #: Attempts of one adapter in a row that failed the test gate.
    gate_failures: int = 2
    #: A breaker not CLOSED for this long escalates again (None: never).
    breaker_open_seconds: float | None = 900.0
    #: The reasons that escalate at all.
    reasons: frozenset[EscalationReason] = frozenset(EscalationReason)
    webhook: WebhookConfig | None = None

    def __post_init__(self) -> None:
        if self.gate_failures < 1:
            raise ValueError("gate_failures must be >= 1")
        if self.breaker_open_seconds is not None and self.breaker_open_seconds <= 0:
            raise ValueError("breaker_open_seconds must be > 0 (or None)")


@dataclass(frozen=True)
class Escalation:
    key: str
    reason: EscalationReason
    message: str
    created_at: datetime
    run_id: str = ""
    task_id: str | None = None
    task_uid: str = ""
    scope: str = ""
    attempt: int | None = None
    adapter_id: str | None = None
    evidence: Mapping[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        return SEVERITY[self.reason]

    def record(self) -> dict[str, Any]:
        """The line of ``logs/escalations.jsonl`` (and the generic webhook's body)."""
        return {
            "ts": self.created_at.isoformat(timespec="milliseconds"),
            "event": EventName.ESCALATION.value,
            "escalation_key": self.key,
            "reason": self.reason.value,
            "severity": self.severity,
            "message": self.message,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "task_uid": self.task_uid or None,
            "scope": self.scope or None,
            "attempt": self.attempt,
            "adapter_id": self.adapter_id,
            "evidence": dict(self.evidence),
        }

    def row(self) -> dict[str, Any]:
        return {
            "escalation_key": self.key,
            "reason": self.reason.value,
            "severity": self.severity,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "task_uid": self.task_uid,
            "scope": self.scope,
            "attempt": self.attempt,
            "adapter_id": self.adapter_id,
            "message": self.message,
            "evidence": dict(self.evidence),
            "created_at": self.created_at,
        }


Sink = Callable[[Escalation], None]


def is_crash(result: AttemptResult) -> bool:
    """The adapter's process died: non-zero exit or a signal (not an API's named error)."""
    if result.failure_class is not FailureClass.ADAPTER_ERROR:
        return False
    return result.signal is not None or (result.exit_code is not None and result.exit_code != 0)


class Escalations:
    """Raises escalations: keyed row first, then the file, metric, sinks and webhook."""

    def __init__(
        self,
        engine: Engine,
        workdir: Path,
        *,
        metrics: Metrics,
        clock: Callable[[], datetime],
        policy: EscalationPolicy | None = None,
        sinks: Iterable[Sink] = (),
    ) -> None:
        self.workdir = workdir
        self.lock = AppendLock(workdir / APPEND_LOCK)  # the recorder's: one hold per thread
        self.metrics = metrics
        self.clock = clock
        self.policy = policy or EscalationPolicy()
        self.sinks = list(sinks)
        self.rows = EscalationRows(engine, clock)
        self.path = workdir / ESCALATIONS_LOG
        self.webhook = (
            WebhookSender(self.policy.webhook, self.rows.notified)
            if self.policy.webhook is not None
            else None
        )

    # ------------------------------------------------------------------ facts

    def attempt_recorded(
        self,
        key: TaskKey,
        result: AttemptResult,
        *,
        final_state: TaskState | None,
        ledger_seq: int,
        transitions: Sequence[BreakerTransition] = (),
    ) -> list[Escalation]:
        """A newly recorded attempt (and the breaker transitions it caused)."""
        evidence = self._task_evidence(key, result.log_path, ledger_seq)
        where = f"task {key.display} (run {key.run_id}) attempt {result.attempt}"
        found: list[Escalation] = []
        for t in transitions:
            if t.to_state is BreakerState.OPEN and t.from_state is BreakerState.CLOSED:
                found.append(
                    self._make(
                        f"breaker_open/{key.scope}/{t.adapter_id}/{t.at.isoformat()}",
                        EscalationReason.BREAKER_OPEN,
                        f"circuit breaker of adapter {t.adapter_id} opened: {t.reason} "
                        f"(last failure: {where}: {result.failure_message})",
                        key,
                        result,
                        {**evidence, **self._breaker_evidence(key.scope, t.adapter_id)},
                    )
                )
        if is_crash(result):
            found.append(
                self._make(
                    f"adapter_crash/{key.qualified}/{result.attempt}",
                    EscalationReason.ADAPTER_CRASH,
                    f"adapter {result.adapter_id} crashed on {where}: {result.failure_message}",
                    key,
                    result,
                    evidence,
                )
            )
        if result.failure_class is FailureClass.GATE_FAILED:
            streak = self.rows.streak(key.scope, result.adapter_id, FailureClass.GATE_FAILED.value)
            if streak.count >= self.policy.gate_failures:
                found.append(
                    self._make(
                        f"gate_failed_repeatedly/{key.scope}/{result.adapter_id}/{streak.first_seq}",
                        EscalationReason.GATE_FAILED_REPEATEDLY,
                        f"acceptance tests failed {streak.count} times in a row on adapter "
                        f"{result.adapter_id} (threshold {self.policy.gate_failures}); latest: "
                        f"{where}: {result.failure_message}",
                        key,
                        result,
                        {**evidence, "ledger_streak_from_seq": str(streak.first_seq)},
                    )
                )
        if final_state is TaskState.TIMEOUT:
            found.append(self._timeout(key, result.adapter_id, result.failure_message, evidence))
        return [e for e in found if self.raise_(e)]

    def task_ended(
        self, key: TaskKey, state: TaskState, adapter_id: str, message: str
    ) -> list[Escalation]:
        """A task ended without another attempt (its budget ran out while it waited)."""
        if state is not TaskState.TIMEOUT:
            return []
        escalation = self._timeout(key, adapter_id, message, self._task_evidence(key, None, None))
        return [escalation] if self.raise_(escalation) else []

    def breakers_seen(
        self,
        snapshots: Sequence[BreakerSnapshot],
        now: datetime,
        *,
        scope: str = "",
        run_id: str = "",
    ) -> list[Escalation]:
        """Breakers as the executor just looked at them: escalate those open too long."""
        limit = self.policy.breaker_open_seconds
        raised = []
        for snap in snapshots:
            since = snap.tripped_at or snap.opened_at
            if limit is None or snap.state is BreakerState.CLOSED or since is None:
                continue
            open_for = (now - since).total_seconds()
            if open_for < limit:
                continue
            escalation = Escalation(
                key=f"breaker_open_too_long/{scope}/{snap.adapter_id}/{since.isoformat()}",
                reason=EscalationReason.BREAKER_OPEN_TOO_LONG,
                message=f"circuit breaker of adapter {snap.adapter_id} has not closed for "
                f"{open_for:.0f}s (threshold {limit:g}s; now {snap.state.value}, "
                f"{snap.consecutive_failures} failure(s))",
                created_at=self.clock(),
                run_id=run_id,
                scope=scope,
                adapter_id=snap.adapter_id,
                evidence=self._breaker_evidence(scope, snap.adapter_id),
            )
            if self.raise_(escalation):
                raised.append(escalation)
        return raised

    def safe_mode_entered(self, run_id: str, reasons: Sequence[str], at: str) -> bool:
        escalation = Escalation(
            key=f"executor_unavailable/{run_id}/{at}",
            reason=EscalationReason.EXECUTOR_UNAVAILABLE,
            message="executor entered safe mode and takes no new task: " + "; ".join(reasons),
            created_at=self.clock(),
            run_id=run_id,
            evidence={
                "resilience_log": "logs/resilience.jsonl (safe_mode_entered)",
                "events": f"logs/executor.jsonl and execution_log ({EventName.SAFE_MODE_ENTERED})",
                "adapters": "`orchestrator adapters` (breakers, health probes)",
                "workdir": str(self.workdir),
            },
        )
        return self.raise_(escalation)

    # ------------------------------------------------------------------ raising

    def raise_(self, escalation: Escalation) -> bool:
        """Record ``escalation`` unless its key is known; True when it was new."""
        if escalation.reason not in self.policy.reasons:
            return False
        with self.lock.shared():
            if not self.rows.insert(escalation.row()):
                return False
            record = escalation.record()
            self._append([record])
        self.metrics.escalation(escalation.reason.value)
        for sink in self.sinks:
            sink(escalation)
        if self.webhook is not None:
            self.webhook.send(record)
        return True

    def repair(self) -> int:
        """After a crash: append the database's escalations the file lacks, and queue those
        the webhook never took. Returns how many lines were appended. Hold the append lock
        exclusive around it (:mod:`core.engine.log_lock`)."""
        rows = self.rows.rows()
        known = self._file_keys()
        missing = [_record_of(r) for r in rows if r["escalation_key"] not in known]
        self._append(missing)
        if self.webhook is not None:
            for row in self.rows.undelivered():
                self.webhook.send(_record_of(row))
        return len(missing)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait for the webhook's queue (call before the process ends)."""
        return self.webhook.flush(timeout) if self.webhook is not None else True

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then release the webhook's thread and connections (until the next one)."""
        return self.webhook.close(timeout) if self.webhook is not None else True

    # ------------------------------------------------------------------ helpers

    def _make(
        self,
        key: str,
        reason: EscalationReason,
        message: str,
        task: TaskKey,
        result: AttemptResult,
        evidence: Mapping[str, str],
    ) -> Escalation:
        return Escalation(
            key=key,
            reason=reason,
            message=message,
            created_at=self.clock(),
            run_id=task.run_id,
            task_id=task.task_id,
            task_uid=task.uid,
            scope=task.scope,
            attempt=result.attempt,
            adapter_id=result.adapter_id,
            evidence=evidence,
        )

    def _timeout(
        self, key: TaskKey, adapter_id: str, message: str, evidence: Mapping[str, str]
    ) -> Escalation:
        return Escalation(
            key=f"task_timeout/{key.qualified}",
            reason=EscalationReason.TASK_TIMEOUT,
            message=f"task {key.display} (run {key.run_id}) exceeded its time budget: {message}",
            created_at=self.clock(),
            run_id=key.run_id,
            task_id=key.task_id,
            task_uid=key.uid,
            scope=key.scope,
            adapter_id=adapter_id,
            evidence=evidence,
        )

    def _task_evidence(
        self, key: TaskKey, log_path: str | None, ledger_seq: int | None
    ) -> dict[str, str]:
        evidence = {
            "task_log": log_path or f"logs/execution/{key.log_name}.jsonl",
            "results": ".state/execution_results.json",
            "database": f"tasks and execution_log of {key.qualified}",
            "workdir": str(self.workdir),
        }
        if ledger_seq is not None:
            evidence["ledger"] = f".state/patch_ledger.jsonl seq {ledger_seq}"
        return evidence

    def _breaker_evidence(self, scope: str, adapter_id: str) -> dict[str, str]:
        name = f"{scope}/{adapter_id}" if scope else adapter_id
        return {
            "resilience_log": "logs/resilience.jsonl (circuit_breaker)",
            "breaker": f"adapters row {name} (`orchestrator adapters`)",
            "workdir": str(self.workdir),
        }

    def _file_keys(self) -> set[str]:
        keys: set[str] = set()
        if self.path.exists():
            with open(self.path, "rb") as fh:
                for raw in fh:
                    try:
                        keys.add(json.loads(raw)["escalation_key"])
                    except (ValueError, KeyError, TypeError):  # a cut line, even mid-UTF-8
                        continue
        return keys

    def _append(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = torn(self.path)
        with open(self.path, "a", encoding="utf-8") as fh:
            if cut:
                fh.write("\n")  # a crash cut the last line: start a clean one
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def escalation_of(row: Mapping[str, Any]) -> Escalation:
    """An ``escalations`` row (:class:`core.db.escalations.EscalationRows`) as an Escalation."""
    created: datetime = row["created_at"]
    return Escalation(
        key=row["escalation_key"],
        reason=EscalationReason(row["reason"]),
        message=row["message"],
        created_at=created,
        run_id=row["run_id"],
        task_id=row["task_id"],
        task_uid=row["task_uid"],
        scope=row["scope"],
        attempt=row["attempt"],
        adapter_id=row["adapter_id"],
        evidence=row["evidence"],
    )


def _record_of(row: Mapping[str, Any]) -> dict[str, Any]:
    return escalation_of(row).record()

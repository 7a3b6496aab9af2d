"""The operator's guarantees as checks over everything it wrote (chaos runs, e2e tests).

Why a module of its own: a guarantee such as "every task ends exactly once" is only worth
something when it is checked where the operator's records live, all of them and against each
other: the cluster (TaskExecutions, Jobs, pods, ConfigMaps, Events), the database (``tasks``,
``execution_log``, ``patch_history``), the patch ledger and its evidence, and the event log
(``logs/executor.jsonl``). :func:`check` is pure: it compares a :class:`Snapshot` (collected by
:mod:`core.testing.observation`, or built by hand in unit tests) and names every object that
breaks a rule, so the same rules judge a 200-task chaos run and a unit test's hand-made case.

The rules, per TaskExecution (``<namespace>/<name> (uid ...)`` in every violation):

* terminal: the status is terminal; the ``tasks`` row exists, is terminal, in the same state,
  with as many attempts as the status;
* exactly once: one TASK_COMPLETED or TASK_FAILED in ``execution_log`` and one in the
  Kubernetes Events (the one matching the state); one TASK_STARTED per attempt in both, one
  ATTEMPT_FAILED per attempt that was retried; nothing twice in ``logs/executor.jsonl``, and
  nothing the database holds missing there;
* at most one Job per (TaskExecution uid, attempt, role), ever, and only for attempts the
  status lists, under the names it lists;
* ledger entries == recorded attempts == ``patch_history`` rows, attempt by attempt;
* evidence: the task log holds the adapter's (and the gate's) records of every attempt whose
  runner reported, and a non-empty diff is in the evidence store under its reference;
* the ledger verifies (hash chain, patches, the database anchor).

Per adapter (its ``adapters`` row): the circuit breaker counted every failure once. While it
never tripped, an adapter that never succeeded has exactly as many consecutive failures as it
has recorded attempts of a counted class (``adapter_error``, ``adapter_timeout``), and any
other adapter no more than that; with every task terminal, no trial slot is held.

And for the whole snapshot: no orphans (a Job or ConfigMap whose TaskExecution is gone, a
runner pod whose Job is gone) once garbage collection had its time, no ``tasks`` row of a
TaskExecution that never existed.

Counting: ``lost`` is the number of tasks with a missing record (no row, no terminal event, an
attempt missing from the ledger...), ``duplicated`` the number with a record written twice
(plus duplicates not tied to one task), ``stuck`` the number not terminal.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.engine.resilience.classification import COUNTED_CLASSES
from core.identity import TaskKey
from core.models import LedgerEntry, TaskState

Body = dict[str, Any]
Row = Mapping[str, Any]

TERMINAL = frozenset(s.value for s in TaskState if s.terminal)
END_EVENTS = ("TASK_COMPLETED", "TASK_FAILED")
MANAGED_BY = ("app.kubernetes.io/managed-by", "orchestrator")
LABEL_ATTEMPT = "orchestrator.dev/attempt"
LABEL_ROLE = "orchestrator.dev/role"


@dataclass(frozen=True)
class Snapshot:
    """What the operator left behind, from every place it writes.

    ``jobs_seen`` and ``events_seen`` are every Job and Event observed *during* the run (by
    uid): a Job deleted by hand or an Event expired by the API server's TTL still counts.
    ``jobs``, ``pods`` and ``configmaps`` are the objects present at the end (for orphans).
    """

    task_executions: Sequence[Body]
    jobs_seen: Sequence[Body] = ()
    events_seen: Sequence[Body] = ()
    jobs: Sequence[Body] = ()
    pods: Sequence[Body] = ()
    configmaps: Sequence[Body] = ()
    db_tasks: Sequence[Row] = ()
    db_events: Sequence[Row] = ()
    patch_history: Sequence[Row] = ()
    ledger: Sequence[LedgerEntry] = ()
    ledger_problems: Sequence[str] = ()
    jsonl_events: Sequence[Row] = ()
    #: task log records by ``TaskKey.log_name`` (``logs/execution/<log_name>.jsonl``)
    task_logs: Mapping[str, Sequence[Row]] = field(default_factory=dict)
    #: ``adapters`` rows of the run's scopes (their breaker columns)
    db_adapters: Sequence[Row] = ()
    #: evidence-store problem per patch reference (None: present and intact)
    evidence: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    tasks: int
    lost: int
    duplicated: int
    stuck: int
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck or self.violations)

    def as_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "stuck": self.stuck,
            "violations": list(self.violations),
        }


def task_key(te: Body) -> TaskKey:
    """The task identity the operator records a TaskExecution under."""
    meta, spec = te["metadata"], te.get("spec") or {}
    return TaskKey(
        str(spec.get("runId") or "k8s"),
        str(spec.get("taskId") or meta["name"]),
        str(meta["uid"]),
        str(meta["namespace"]),
    )


def _owner_uids(obj: Body, kind: str) -> list[str]:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return [str(r.get("uid")) for r in refs if r.get("kind") == kind]


def _labels(obj: Body) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def _event_count(event: Body) -> int:
    return int(event.get("count") or 1)


class _Task:
    """The checks of one TaskExecution; collects its violations and what kind they are."""

    def __init__(self, te: Body) -> None:
        self.te = te
        self.key = task_key(te)
        meta = te["metadata"]
        self.label = f"{meta['namespace']}/{meta['name']} (uid {self.key.uid})"
        self.status: Body = te.get("status") or {}
        self.state = str(self.status.get("state") or TaskState.PENDING.value)
        self.violations: list[str] = []
        self.lost = self.duplicated = self.stuck = False

    def fail(self, kind: str, rule: str) -> None:
        setattr(self, kind, True)
        self.violations.append(f"{self.label}: {rule}")

    @property
    def attempts(self) -> list[Body]:
        return list(self.status.get("attempts") or [])


def check(snapshot: Snapshot, *, expected_uids: Iterable[str] = ()) -> Report:
    """Judge ``snapshot``; ``expected_uids``: every TaskExecution the run created (one that is
    missing from the snapshot is lost)."""
    db_tasks = {str(r["uid"]): r for r in snapshot.db_tasks}
    db_events: dict[str, list[Row]] = defaultdict(list)
    for row in snapshot.db_events:
        db_events[str(row.get("task_uid") or "")].append(row)
    k8s_events: dict[str, list[Body]] = defaultdict(list)
    for ev in snapshot.events_seen:
        uid = str((ev.get("involvedObject") or {}).get("uid") or "")
        if (ev.get("involvedObject") or {}).get("kind") == "TaskExecution":
            k8s_events[uid].append(ev)
    jobs_seen: dict[str, list[Body]] = defaultdict(list)
    for job in snapshot.jobs_seen:
        for uid in _owner_uids(job, "TaskExecution"):
            jobs_seen[uid].append(job)
    ledger: dict[str, list[LedgerEntry]] = defaultdict(list)
    for entry in snapshot.ledger:
        if entry.kind == "attempt":
            ledger[entry.task_uid or ""].append(entry)
    history: dict[str, list[Row]] = defaultdict(list)
    for row in snapshot.patch_history:
        history[str(row.get("task_uid") or "")].append(row)

    tasks = [_Task(te) for te in snapshot.task_executions]
    for task in tasks:
        uid = task.key.uid
        _terminal(task, db_tasks.get(uid))
        _exactly_once(task, db_events.get(uid, []), k8s_events.get(uid, []))
        _jobs(task, jobs_seen.get(uid, []))
        _ledger(task, ledger.get(uid, []), history.get(uid, []), db_tasks.get(uid))
        _evidence(task, ledger.get(uid, []), snapshot)

    violations = [v for t in tasks for v in t.violations]
    lost = sum(t.lost for t in tasks)
    duplicated = sum(t.duplicated for t in tasks)
    stuck = sum(t.stuck for t in tasks)

    present = {t.key.uid for t in tasks}
    for uid in sorted(set(expected_uids) - present):
        violations.append(f"TaskExecution uid {uid}: created by the run, gone from the cluster")
        lost += 1
    for uid, row in sorted(db_tasks.items()):
        if uid and uid not in present and uid not in set(expected_uids):
            violations.append(
                f"tasks row {row.get('scope')}/{row.get('task_id')} (uid {uid}): "
                "no TaskExecution has this uid"
            )
    global_dups = _global_duplicates(snapshot, violations)
    breaker_dups, breaker_lost = _breakers(snapshot, all_terminal=stuck == 0, out=violations)
    global_dups += breaker_dups
    lost += breaker_lost
    violations += _jsonl(snapshot)
    violations += orphans(snapshot)
    violations += [f"ledger verify: {p}" for p in snapshot.ledger_problems]
    return Report(
        tasks=len(tasks),
        lost=lost,
        duplicated=duplicated + global_dups,
        stuck=stuck,
        violations=violations,
    )


# --------------------------------------------------------------------------- per task


def _terminal(task: _Task, row: Row | None) -> None:
    if task.state not in TERMINAL:
        why = f"{task.status.get('reason', '')}: {task.status.get('message', '')}".strip(": ")
        task.fail("stuck", f"not terminal: status.state {task.state} ({why[:200]})")
    if row is None:
        task.fail("lost", "no row in the tasks table")
        return
    status = str(row["status"])
    if status not in TERMINAL:
        task.fail("stuck", f"tasks row is {status}, not terminal")
    if status != task.state:
        task.fail("lost", f"tasks row says {status}, status.state says {task.state}")
    attempts = int(task.status.get("attempt") or 0)
    if int(row.get("attempts") or 0) != attempts:
        task.fail("lost", f"tasks row has {row.get('attempts')} attempts, status {attempts}")


def _exactly_once(task: _Task, db_events: list[Row], k8s: list[Body]) -> None:
    want = "TASK_COMPLETED" if task.state == TaskState.COMPLETED.value else "TASK_FAILED"
    ends = [e for e in db_events if e["event"] in END_EVENTS]
    if task.state in TERMINAL:
        if not ends:
            task.fail("lost", "no TASK_COMPLETED/TASK_FAILED row in execution_log")
        elif [e["event"] for e in ends] != [want] or ends[0].get("state") != task.state:
            if len(ends) > 1:
                task.fail("duplicated", f"{len(ends)} end events in execution_log")
            else:
                task.fail(
                    "lost",
                    f"execution_log ends with {ends[0]['event']}/"
                    f"{ends[0].get('state')}, status is {task.state}",
                )
    by_reason: Counter[str] = Counter()
    for ev in k8s:
        by_reason[str(ev.get("reason"))] += _event_count(ev)
    k8s_ends = {r: n for r, n in by_reason.items() if r in END_EVENTS}
    if task.state in TERMINAL:
        total = sum(k8s_ends.values())
        if total == 0:
            task.fail("lost", "no TASK_COMPLETED/TASK_FAILED Kubernetes Event")
        elif total > 1:
            task.fail("duplicated", f"end Events posted {total} times: {dict(k8s_ends)}")
        elif want not in k8s_ends:
            task.fail("lost", f"Event {next(iter(k8s_ends))} for a task that is {task.state}")
    started = len(task.attempts)
    per_attempt: Counter[tuple[int, str]] = Counter(
        (int(e.get("attempt") or 0), str(e["event"])) for e in db_events
    )
    for (attempt, name), n in sorted(per_attempt.items()):
        if n > 1:
            task.fail("duplicated", f"execution_log has {name} of attempt {attempt} {n} times")
    for n in range(1, started + 1):
        if per_attempt[(n, "TASK_STARTED")] == 0:
            task.fail("lost", f"no TASK_STARTED row in execution_log for attempt {n}")
        if n < started and per_attempt[(n, "ATTEMPT_FAILED")] == 0:  # it was tried again
            task.fail("lost", f"no ATTEMPT_FAILED row in execution_log for attempt {n}")
    k8s_started = by_reason["TASK_STARTED"]
    if k8s_started > started:
        task.fail("duplicated", f"{k8s_started} TASK_STARTED Events for {started} attempt(s)")
    elif k8s_started < started:
        task.fail("lost", f"{k8s_started} TASK_STARTED Events for {started} attempt(s)")


def _jobs(task: _Task, jobs: list[Body]) -> None:
    by_slot: dict[tuple[str, str], set[str]] = defaultdict(set)
    names: dict[tuple[str, str], set[str]] = defaultdict(set)
    for job in jobs:
        labels = _labels(job)
        slot = (labels.get(LABEL_ATTEMPT, "?"), labels.get(LABEL_ROLE, "?"))
        by_slot[slot].add(str(job["metadata"].get("uid")))
        names[slot].add(str(job["metadata"]["name"]))
    listed: dict[tuple[str, str], str] = {}
    for att in task.attempts:
        n = str(att.get("attempt"))
        if att.get("jobName"):
            listed[(n, "adapter")] = str(att["jobName"])
        if att.get("gateJobName"):
            listed[(n, "gate")] = str(att["gateJobName"])
    for slot, uids in sorted(by_slot.items()):
        attempt, role = slot
        if len(uids) > 1:
            task.fail(
                "duplicated",
                f"{len(uids)} {role} Jobs for attempt {attempt}: {sorted(names[slot])}",
            )
        if slot not in listed:
            task.fail(
                "duplicated",
                f"{role} Job {sorted(names[slot])} of attempt {attempt} is not in status.attempts",
            )
        elif names[slot] != {listed[slot]}:
            task.fail(
                "duplicated",
                f"{role} Job of attempt {attempt} is {sorted(names[slot])}, "
                f"status names {listed[slot]}",
            )
    for slot, name in sorted(listed.items()):
        if slot not in by_slot:
            task.fail("lost", f"{slot[1]} Job {name} of attempt {slot[0]} was never seen")


def _ledger(task: _Task, entries: list[LedgerEntry], history: list[Row], row: Row | None) -> None:
    result = (row.get("result") if row is not None else None) or {}
    want = [int(a["attempt"]) for a in result.get("attempts", [])]
    have = Counter(e.attempt for e in entries)
    mirrored = Counter(int(r["attempt"]) for r in history)
    for attempt, n in sorted(have.items()):
        if n > 1:
            task.fail("duplicated", f"{n} ledger entries for attempt {attempt}")
    for attempt, n in sorted(mirrored.items()):
        if n > 1:
            task.fail("duplicated", f"{n} patch_history rows for attempt {attempt}")
    if sorted(have) != sorted(want):
        task.fail(
            "lost" if len(have) < len(want) else "duplicated",
            f"ledger attempts {sorted(have)}, tasks row attempts {want}",
        )
    if sorted(mirrored) != sorted(have):
        task.fail(
            "lost" if len(mirrored) < len(have) else "duplicated",
            f"patch_history attempts {sorted(mirrored)}, ledger attempts {sorted(have)}",
        )
    finished = [int(a["attempt"]) for a in task.attempts if str(a.get("state")) in TERMINAL]
    if task.state in TERMINAL and sorted(finished) != sorted(have):
        task.fail("lost", f"status finished attempts {sorted(finished)}, ledger {sorted(have)}")
    hashes = {e.attempt: e.hash for e in entries}
    for r in history:
        if hashes.get(int(r["attempt"])) not in (None, r.get("entry_hash")):
            task.fail(
                "lost",
                f"patch_history row of attempt {r['attempt']} differs from the ledger's entry",
            )


def _evidence(task: _Task, entries: list[LedgerEntry], snapshot: Snapshot) -> None:
    logs = snapshot.task_logs.get(task.key.log_name, ())
    saved = {(str(r.get("event")), r.get("attempt")) for r in logs}
    for entry in entries:
        result = entry.result
        if result.exit_code is not None and ("adapter_log_saved", entry.attempt) not in saved:
            task.fail(
                "lost",
                f"attempt {entry.attempt}: the adapter reported, its log is not in "
                f"logs/execution/{task.key.log_name}.jsonl",
            )
        gate = result.gate
        if gate is not None and gate.checks and ("gate_log_saved", entry.attempt) not in saved:
            task.fail(
                "lost",
                f"attempt {entry.attempt}: the gate ran, its log is not in "
                f"logs/execution/{task.key.log_name}.jsonl",
            )
        if entry.diff_sha256:
            if not entry.patch_ref:
                task.fail("lost", f"attempt {entry.attempt}: non-empty diff without patch_ref")
            else:
                problem = snapshot.evidence.get(entry.patch_ref, "not checked")
                if problem is not None:
                    task.fail("lost", f"attempt {entry.attempt}: patch {entry.patch_ref} {problem}")


# --------------------------------------------------------------------------- global


def _global_duplicates(snapshot: Snapshot, violations: list[str]) -> int:
    dups = 0
    keys = Counter(str(r.get("event_key")) for r in snapshot.db_events)
    for key, n in sorted(keys.items()):
        if n > 1:
            violations.append(f"execution_log: event key {key} {n} times")
            dups += 1
    seqs = Counter(e.seq for e in snapshot.ledger)
    for seq, n in sorted(seqs.items()):
        if n > 1:
            violations.append(f"ledger: seq {seq} {n} times")
            dups += 1
    return dups


def _breakers(snapshot: Snapshot, *, all_terminal: bool, out: list[str]) -> tuple[int, int]:
    """Breaker counts against the recorded attempts; (adapters over-counted, under-counted)."""
    counted: Counter[tuple[str, str]] = Counter()
    succeeded: set[tuple[str, str]] = set()
    for entry in snapshot.ledger:
        if entry.kind != "attempt":
            continue
        key = (entry.scope or "", entry.adapter_id)
        if entry.failure_class is None:
            succeeded.add(key)
        elif entry.failure_class in COUNTED_CLASSES:
            counted[key] += 1
    over = under = 0
    for row in snapshot.db_adapters:
        key = (str(row.get("scope") or ""), str(row["id"]))
        where = f"adapter {key[0]}/{key[1]} breaker"
        failures = int(row.get("breaker_failures") or 0)
        in_flight = int(row.get("breaker_half_open_in_flight") or 0)
        if all_terminal and in_flight:
            out.append(f"{where}: {in_flight} trial slot(s) held with every task terminal")
            under += 1
        if row.get("breaker_tripped_at") is not None or row.get("breaker_state") != "CLOSED":
            continue  # outcomes are ignored while it is open: the count proves nothing
        if failures > counted[key]:
            out.append(f"{where}: {failures} failures, {counted[key]} counted attempts recorded")
            over += 1
        elif key not in succeeded and failures < counted[key]:
            out.append(f"{where}: {failures} failures, {counted[key]} counted attempts recorded")
            under += 1
    return over, under


def _jsonl(snapshot: Snapshot) -> list[str]:
    out: list[str] = []
    lines = Counter(str(r.get("event_key")) for r in snapshot.jsonl_events)
    for key, n in sorted(lines.items()):
        if n > 1:
            out.append(f"logs/executor.jsonl: event {key} {n} times")
    for row in snapshot.db_events:
        if str(row.get("event_key")) not in lines:
            out.append(f"logs/executor.jsonl: lacks {row.get('event_key')} (in execution_log)")
    return out


def orphans(snapshot: Snapshot) -> list[str]:
    """Jobs and ConfigMaps of the operator whose TaskExecution is gone, runner pods whose Job
    is gone (judge after garbage collection had its time)."""
    live = {str(te["metadata"]["uid"]) for te in snapshot.task_executions}
    out: list[str] = []
    for kind, objects in (("Job", snapshot.jobs), ("ConfigMap", snapshot.configmaps)):
        for obj in objects:
            if _labels(obj).get(MANAGED_BY[0]) != MANAGED_BY[1]:
                continue
            owners = _owner_uids(obj, "TaskExecution")
            meta = obj["metadata"]
            where = f"{kind} {meta.get('namespace')}/{meta['name']}"
            if not owners:
                out.append(f"{where}: no TaskExecution owner")
            elif not set(owners) & live:
                out.append(f"{where}: orphan, its TaskExecution {owners[0]} is gone")
    jobs = {str(j["metadata"].get("uid")) for j in snapshot.jobs}
    for pod in snapshot.pods:
        owners = _owner_uids(pod, "Job")
        if _labels(pod).get(MANAGED_BY[0]) != MANAGED_BY[1] or not owners:
            continue
        if not set(owners) & jobs:
            meta = pod["metadata"]
            out.append(f"Pod {meta.get('namespace')}/{meta['name']}: orphan, its Job is gone")
    return out

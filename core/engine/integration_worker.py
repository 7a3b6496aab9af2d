"""The integration worker: a run's completed changes merged in queue order onto one branch,
re-gated on the merged tree, speculatively and in batches.

Each task is gated alone on its base commit while it executes; two accepted changes that
conflict, or that pass alone and break together, show up only here. ``orchestrator integrate
--run <id>`` (or ``execute --integrate``) takes the run's COMPLETED tasks in queue order and
builds ``orchestrator/integration/<run>`` from the run's base commit: each task's full patch
(the ledger's) applied three-way onto the changes before it, the gate re-run on the merged
tree by the merge queue (:mod:`core.engine.merge_queue`: batches of K, bisected on failure).
Every completed attempt's change gets one verdict: ``merged`` (one commit per task),
``conflict``, ``gate_failed`` (on the merged tree) or ``skipped`` (with the reason).

The rules:

* **Repository**: the branch is for the repository of the run's first completed task; it
  lives in a bare clone under the work dir (``integration/<run>.git``), so a read-only input
  (a bundle) is never written to. With ``--push`` (URL sources only) it is pushed there,
  fast-forward only. A task in another repository is skipped.
* **Base**: ``--base``, else the tasks' common base commit; when their bases differ, the
  newest one that all the others are ancestors of; when they diverge, the first task's.
* **Other bases**: a change is applied three-way with its own base commit as the merge base,
  so a change made on an older base (an ancestor of the branch head) is rebased; one made on a
  commit that is not an ancestor of the head (newer or diverged) is skipped.
* **Feedback**: a ``conflict`` or ``gate_failed`` change whose task's retry policy lists
  ``merge_conflict`` / ``merge_gate_failed`` in ``retry_on`` sends the task back
  (:func:`core.engine.lifecycle.reopen`: same attempts and budget): it is PENDING again, and its
  next attempt gets the conflict or gate summary in its prompt and starts from the branch's
  head; the next ``execute`` runs it and the next ``integrate`` merges it.

Order of writes per verdict, each idempotent (as for attempts): the ledger entry of kind
``integration`` (fsynced, the leader), the task's reopen (task row + TASK_REOPENED), the
``integration_tasks`` row with its event and the new head (one transaction), the branch ref,
``logs/executor.jsonl``. A restart replays ledger verdicts the database lacks and resets the
branch to the recorded head; commits are deterministic (fixed identity and dates), so a change
rebuilt on the same head is the same commit.

The gate runs behind :class:`~core.engine.integration_gate.TreeGate`. On Kubernetes the
operator drives this worker per ``Integration`` resource (``core.kube.integration_controller``):
the tasks are one namespace's (``scope``) TaskExecutions, their plans come from those
resources (:class:`PlanSource`), the gate runs are Jobs (``core.kube.integration_gates``),
the branch is pushed (a sent-back task's next attempt starts from it), and a task sent back
is reopened here as on the embedded backend; the operator then makes its TaskExecution PENDING
again (``core.kube.integration_sendback``). The results go to the resource's status instead
of the state file.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from core.db.database import check_schema, default_url, make_engine, redact
from core.db.integration_rows import IntegrationRows, IntegrationState
from core.db.store import Store, TaskRecord
from core.engine.inputs import RunInputs, load_inputs, resolve_repo
from core.engine.integration_gate import LocalTreeGate, TreeGate, TreeGateRequest, merged_gate
from core.engine.integration_repo import IntegrationRepo, MergeConflict
from core.engine.integration_results import build_results, write_results
from core.engine.integration_texts import (
    change_message,
    commit_message,
    conflict_feedback,
    conflict_reason,
    gate_failure_feedback,
    gate_reason,
)
from core.engine.lifecycle import TaskPlan, reopen
from core.engine.merge_queue import BatchPolicy, QueueReport, Verdict, run_queue
from core.engine.monitoring.metrics import Metrics
from core.engine.recorder import Recorder
from core.errors import OrchestratorError
from core.identity import EMBEDDED_SCOPE, TaskKey
from core.models import (
    INTEGRATION_FAILURE_CLASSES,
    EventName,
    GateCheck,
    GateResult,
    IntegrationFailure,
    IntegrationOutcome,
    IntegrationRecord,
    IntegrationResults,
    LedgerEntry,
    TaskSpec,
    TaskState,
)

INTEGRATION_DIR = "integration"


def default_branch(run_id: str) -> str:
    return f"orchestrator/integration/{run_id}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def is_url(source: str) -> bool:
    return "://" in source or source.startswith("git@")


#: Why a verdict does not send its task back when the driver cannot reopen tasks.
NO_REOPEN = "tasks are not sent back by this driver (reopen=False)"


@dataclass(frozen=True)
class IntegrationConfig:
    run_id: str
    workdir: Path
    branch: str | None = None
    base_commit: str | None = None
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    push: bool = False
    keep_worktrees: bool = False
    #: Whose tasks: the embedded backend's (""), or one Kubernetes namespace's.
    scope: str = EMBEDDED_SCOPE
    #: Send a conflict / gate failure back to its adapter when the retry policy says so.
    reopen: bool = True
    #: Write ``.state/integration_results.json`` (the embedded backend's projection).
    results_file: bool = True

    @property
    def branch_name(self) -> str:
        return self.branch or default_branch(self.run_id)


class PlanSource(Protocol):
    """Where a task's plan (adapters, retry policy, gate) comes from."""

    def plan(self, record: TaskRecord) -> TaskPlan:
        """The task's plan; KeyError when there is none any more (routing or resource gone)."""
        ...


class InputsPlans:
    """The embedded backend's plans: the run's state files."""

    def __init__(self, inputs: RunInputs) -> None:
        self.inputs = inputs

    def plan(self, record: TaskRecord) -> TaskPlan:
        task = self.inputs.task(record.task_id)
        return TaskPlan.of(task.spec, task.adapter_chain, self.inputs.adapters)


@dataclass(frozen=True)
class Candidate:
    """A completed attempt's change, ready for the merge queue."""

    key: TaskKey
    record: TaskRecord
    entry: LedgerEntry
    plan: TaskPlan
    #: The change as a commit on its own base.
    change: str


@dataclass(frozen=True)
class IntegrationRun:
    results: IntegrationResults
    report: QueueReport
    #: Tasks sent back to their adapters by this run (execute them, then integrate again).
    reopened: list[str]


class IntegrationWorker:
    def __init__(
        self,
        config: IntegrationConfig,
        plans: PlanSource,
        store: Store,
        *,
        gate: TreeGate | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = _utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.run_id = config.run_id
        self.plans = plans
        self.scope = config.scope
        self.store = store
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.rng = rng or random.Random()
        self.rows = IntegrationRows(store.engine, clock)
        self.recorder = Recorder(store, config.workdir, metrics=self.metrics, clock=clock)
        self.ledger = self.recorder.ledger
        self.gate = gate or LocalTreeGate(config.workdir, keep_worktrees=config.keep_worktrees)
        self._reopened: list[str] = []
        #: What the merged tree's gate must satisfy: (spec, checks) of every merged task.
        self._merged: list[tuple[TaskSpec, tuple[GateCheck, ...]]] = []

    # ------------------------------------------------------------------ the run

    def run(self) -> IntegrationRun:
        self.recorder.repair(self.run_id)
        records = self.store.tasks(self.run_id, self.scope)
        if not records:
            raise OrchestratorError(f"run {self.run_id!r} has no tasks; run execute first")
        state, repo = self._open(records)
        self._replay()
        state = self._state()
        if not repo.has_commit(state.head_commit):
            raise OrchestratorError(
                f"{repo.path}: the branch head {state.head_commit[:12]} the database records "
                "is not in the integration repository (was it deleted?); restore it, or "
                "integrate the run in a fresh work dir"
            )
        repo.set_branch(state.branch, state.head_commit)
        self._merged = [
            self._gate_of(self.store.task(v.key), v.adapter_id)
            for v in self.rows.verdicts(self.run_id, self.scope)
            if v.outcome is IntegrationOutcome.MERGED
        ]
        candidates = self._candidates(records, state, repo)
        queue = _Ops(self, repo)
        report = run_queue(
            candidates,
            state.head_commit,
            queue,
            queue.decided,
            policy=self.config.batch,
            on_depth=lambda depth: self.metrics.integration_progress(
                depth, queue.gate_runs, queue.merged
            ),
        )
        self.rows.count(
            self.run_id, gate_runs=report.gate_runs, batches=report.batches, scope=self.scope
        )
        state = self._state()
        if self.config.push and state.pushed_commit != state.head_commit:
            repo.push(state.source, state.branch, state.head_commit)
            self.rows.pushed(self.run_id, state.source, state.head_commit, scope=self.scope)
        results = self.write_results()
        where = f"{self.scope}/" if self.scope else ""
        self.recorder.commit_events(
            lambda: self.store.run_event(
                self.run_id,
                EventName.INTEGRATION_FINISHED,
                {
                    "branch": results.branch,
                    "head_commit": results.head_commit,
                    **results.stats.model_dump(mode="json"),
                },
                key=f"{self.run_id}/{where}/{EventName.INTEGRATION_FINISHED.value}/"
                f"{results.head_commit}",
            )
        )
        return IntegrationRun(results, report, list(self._reopened))

    def _state(self) -> IntegrationState:
        state = self.rows.state(self.run_id, self.scope)
        assert state is not None
        return state

    def _gate_of(
        self, record: TaskRecord, adapter_id: str
    ) -> tuple[TaskSpec, tuple[GateCheck, ...]]:
        """A task's gate as its change was judged (the checks of the adapter that made it);
        without a plan any more (its resource is gone), the task's own checks."""
        try:
            return record.spec, self.plans.plan(record).gate_checks(adapter_id)
        except KeyError:
            return record.spec, tuple(record.spec.gate or ())

    # ------------------------------------------------------------------ the branch

    def _open(self, records: Sequence[TaskRecord]) -> tuple[IntegrationState, IntegrationRepo]:
        existing = self.rows.state(self.run_id, self.scope)
        if existing is not None:
            self._check_consistent(existing)
            return existing, IntegrationRepo.open(Path(existing.repository), existing.source)
        completed = [r for r in records if r.status is TaskState.COMPLETED]
        first = (completed or list(records))[0]
        source = resolve_repo(self.config.workdir, first.spec.repo)
        if self.config.push and not is_url(source):
            raise OrchestratorError(
                f"--push needs a repository URL; {first.spec.repo} is local, so the branch "
                f"stays in {self._repo_path()}"
            )
        repo = IntegrationRepo.open(self._repo_path(), source)
        bases = list(
            dict.fromkeys(
                self._attempt_base(r)
                for r in completed
                if resolve_repo(self.config.workdir, r.spec.repo) == source
            )
        ) or [first.spec.base_commit]
        base = self.config.base_commit or self._common_base(repo, source, bases)
        if not repo.has_commit(base):
            repo.fetch(source)
            if not repo.has_commit(base):
                raise OrchestratorError(f"integration base {base} is not in {source}")
        state = self.rows.start(
            IntegrationState(
                run_id=self.run_id,
                source=source,
                repository=str(repo.path),
                branch=self.config.branch_name,
                base_commit=base,
                head_commit=base,
                scope=self.scope,
            )
        )
        return state, repo

    def _repo_path(self) -> Path:
        root = self.config.workdir / INTEGRATION_DIR
        if self.scope:  # one directory per namespace: the same run id may be in two
            root = root / self.scope
        return (root / f"{self.run_id}.git").resolve()

    def _check_consistent(self, state: IntegrationState) -> None:
        for what, asked, have in (
            ("branch", self.config.branch, state.branch),
            ("base", self.config.base_commit, state.base_commit),
        ):
            if asked is not None and asked != have:
                raise OrchestratorError(
                    f"run {self.run_id} is already integrated on {state.branch} from "
                    f"{state.base_commit[:12]}; --{what} {asked} differs (its {what} is {have})"
                )
        if self.config.push and not is_url(state.source):
            raise OrchestratorError(f"--push needs a repository URL, not {state.source}")

    def _attempt_base(self, record: TaskRecord) -> str:
        entry = self.ledger.find(record.key, record.attempts)
        return entry.base_commit if entry is not None else record.spec.base_commit

    @staticmethod
    def _common_base(repo: IntegrationRepo, source: str, bases: list[str]) -> str:
        if any(not repo.has_commit(b) for b in bases):
            repo.fetch(source)
        known = [b for b in bases if repo.has_commit(b)]
        if not known:
            return bases[0]
        tips = repo.independent(known)
        return tips[0] if len(tips) == 1 else known[0]

    # ------------------------------------------------------------------ candidates

    def _candidates(
        self, records: Sequence[TaskRecord], state: IntegrationState, repo: IntegrationRepo
    ) -> list[Candidate]:
        decided = {(v.key, v.attempt) for v in self.rows.verdicts(self.run_id, self.scope)}
        found: list[Candidate] = []
        for record in records:
            if record.status is not TaskState.COMPLETED or not record.attempt_results:
                continue
            attempt = record.attempt_results[-1].attempt
            entry = self.ledger.find(record.key, attempt)
            if (record.key, attempt) in decided or entry is None:
                continue
            reason = self._skip_reason(record, entry, state, repo)
            change: str | None = None
            if not reason:
                patch = self.ledger.read_patch(entry) or b""
                try:
                    change = repo.change_commit(
                        entry.base_commit,
                        patch,
                        change_message(record.spec, entry),
                        entry.result.finished_at,
                    )
                except OrchestratorError as exc:
                    reason = f"the patch does not apply to its own base commit: {exc}"
            plan: TaskPlan | None = None
            if change is not None:
                try:
                    plan = self.plans.plan(record)
                except KeyError as exc:
                    reason = f"its plan is gone ({exc}): the task's resource was deleted"
            if change is None or plan is None:
                self._skip(record, entry, state, reason)
                continue
            found.append(Candidate(record.key, record, entry, plan, change))
        return found

    def _skip_reason(
        self,
        record: TaskRecord,
        entry: LedgerEntry,
        state: IntegrationState,
        repo: IntegrationRepo,
    ) -> str:
        source = resolve_repo(self.config.workdir, record.spec.repo)
        if source != state.source:
            return f"in repository {record.spec.repo}; this run's branch is for {state.source}"
        if entry.diff_sha256 is None:
            return "the change is empty: nothing to merge"
        patch = self.ledger.read_patch(entry)
        if patch is None or hashlib.sha256(patch).hexdigest() != entry.diff_sha256:
            kept = 0 if patch is None else len(patch)
            return (
                f"the full patch is not available (the ledger keeps {kept} of "
                f"{entry.diff_bytes} bytes; raise --max-diff-bytes)"
            )
        base = entry.base_commit
        if not repo.has_commit(base):
            repo.fetch(state.source)
            if not repo.has_commit(base):
                return f"its base commit {base[:12]} is not in {state.source}"
        if not repo.is_ancestor(base, state.head_commit):
            return (
                f"made on {base[:12]}, which is not on the integration branch (based on "
                f"{state.base_commit[:12]}): changes are integrated onto their base or a "
                "newer one only"
            )
        return ""

    def _skip(
        self, record: TaskRecord, entry: LedgerEntry, state: IntegrationState, reason: str
    ) -> None:
        verdict = IntegrationRecord(
            outcome=IntegrationOutcome.SKIPPED,
            branch=state.branch,
            repository=state.repository,
            parent_commit=state.head_commit,
            reason=reason,
        )
        self._commit(record.key, entry, verdict, TaskState.COMPLETED)

    # ------------------------------------------------------------------ verdicts

    def decide(self, verdict: Verdict[Candidate], repo: IntegrationRepo) -> None:
        """Record one final verdict of the merge queue (and maybe send the task back)."""
        cand = verdict.candidate
        state = self._state()
        record = IntegrationRecord(
            outcome=verdict.outcome,
            branch=state.branch,
            repository=state.repository,
            parent_commit=verdict.parent,
            commit=verdict.commit,
            batch=verdict.batch,
            gate_runs=verdict.gate_runs,
        )
        task_state = TaskState.COMPLETED
        failure = self._failure(verdict, repo, state)
        if failure is not None:
            reopening = reopen(cand.plan, cand.record.attempt_results, failure, rng=self.rng)
            decision = reopening.decision.reason if self.config.reopen else NO_REOPEN
            reason = failure.message
            if not reopening.reopened or not self.config.reopen:
                reason += f"; not sent back: {decision}"
            updates: dict[str, object] = {
                "reason": reason,
                "retry_decision": decision,
                "conflict_files": list(verdict.conflict.files) if verdict.conflict else [],
                "gate": verdict.gate,
            }
            if reopening.result is not None and self.config.reopen:
                task_state = TaskState.PENDING
                updates |= {
                    "sent_back": failure,
                    "next_attempt": cand.entry.attempt + 1,
                    "backoff_seconds": reopening.result.backoff_seconds,
                }
                self._reopened.append(cand.key.task_id)
            record = record.model_copy(update=updates)
        elif verdict.outcome is IntegrationOutcome.MERGED:
            self._merged.append(self._gate_of(cand.record, cand.entry.adapter_id))
        self._commit(cand.key, cand.entry, record, task_state, cand.record)

    def _failure(
        self, verdict: Verdict[Candidate], repo: IntegrationRepo, state: IntegrationState
    ) -> IntegrationFailure | None:
        cand = verdict.candidate
        if verdict.outcome is IntegrationOutcome.CONFLICT and verdict.conflict is not None:
            conflict = verdict.conflict
            touching = repo.subjects(cand.entry.base_commit, verdict.head, conflict.files)
            message = conflict_reason(conflict)
            feedback = conflict_feedback(
                attempt=cand.entry.attempt,
                branch=state.branch,
                head=verdict.head,
                conflict=conflict,
                touching=touching,
            )
        elif verdict.outcome is IntegrationOutcome.GATE_FAILED and verdict.gate is not None:
            message = gate_reason(verdict.gate)
            feedback = gate_failure_feedback(
                attempt=cand.entry.attempt,
                branch=state.branch,
                head=verdict.head,
                gate=verdict.gate,
                merged=repo.subjects(state.base_commit, verdict.parent, ["."]),
            )
        else:
            return None
        return IntegrationFailure(
            outcome=verdict.outcome,
            message=message[:500],
            feedback=feedback,
            rebase_repository=state.repository,
            rebase_commit=verdict.head,
            decided_at=self.clock(),
        )

    def _commit(
        self,
        key: TaskKey,
        entry: LedgerEntry,
        verdict: IntegrationRecord,
        task_state: TaskState,
        record: TaskRecord | None = None,
    ) -> None:
        """Ledger first, then the database and the branch (see the module docstring)."""
        sent_back = verdict.sent_back
        written = self.ledger.append_integration(
            key=key,
            attempt_entry=entry,
            record=verdict,
            state=task_state,
            failure_class=INTEGRATION_FAILURE_CLASSES[sent_back.outcome] if sent_back else None,
        )
        if self._mirror(key, written) and written.integration is not None:
            outcome = written.integration.outcome
            latency = None
            if outcome is IntegrationOutcome.MERGED and record and record.finished_at:
                latency = (self.clock() - record.finished_at).total_seconds()
            self.metrics.integration_verdict(outcome.value, latency)

    def _mirror(self, key: TaskKey, entry: LedgerEntry) -> bool:
        """Write a ledger verdict to the database and the branch; True if it was new."""
        verdict = entry.integration
        assert verdict is not None
        if verdict.sent_back is not None:
            amended = entry.result.model_copy(
                update={
                    "final": False,
                    "task_final_state": None,
                    "backoff_seconds": verdict.backoff_seconds,
                    "integration": verdict.sent_back,
                }
            )
            self.recorder.reopen(key, amended, why=verdict.retry_decision)
        events = self.recorder.commit_events(lambda: self.rows.record(key, entry))
        if verdict.outcome is IntegrationOutcome.MERGED:
            state = self._state()
            IntegrationRepo(Path(state.repository)).set_branch(state.branch, state.head_commit)
        return bool(events)

    def _replay(self) -> None:
        """Mirror the ledger's verdicts of this run that the database lacks (a crash came
        between the ledger and the database)."""
        mirrored = self.rows.mirrored_seqs()
        for entry in self.ledger.entries():
            if entry.kind != "integration" or entry.run_id != self.run_id:
                continue
            if (entry.scope or EMBEDDED_SCOPE) != self.scope:
                continue
            if entry.seq not in mirrored:
                key = TaskKey(entry.run_id, entry.task_id, entry.task_uid or "", self.scope)
                self._mirror(key, entry)

    # ------------------------------------------------------------------ the gate

    def gate_request(
        self, number: int, base: str, head: str, cands: Sequence[Candidate], patch: bytes
    ) -> TreeGateRequest:
        """The merged tree must pass the gate of every task on it (:func:`merged_gate`)."""
        gates = [*self._merged, *(self._gate_of(c.record, c.entry.adapter_id) for c in cands)]
        checks, baseline, policy = merged_gate(gates)
        return TreeGateRequest(
            run_id=self.run_id,
            number=number,
            repository=self._state().repository,
            base_commit=base,
            head_commit=head,
            patch=patch,
            checks=checks,
            baseline=baseline,
            policy=policy,
            task_ids=tuple(c.key.task_id for c in cands),
        )

    # ------------------------------------------------------------------ outputs

    def write_results(self) -> IntegrationResults:
        records = self.store.tasks(self.run_id, self.scope)
        results = build_results(
            self._state(), self.rows.verdicts(self.run_id, self.scope), records, self.clock()
        )
        if self.config.results_file:
            write_results(self.config.workdir, results)
        return results


class _Ops:
    """The merge queue's view of the worker: apply onto a head, gate a tree, record."""

    def __init__(self, worker: IntegrationWorker, repo: IntegrationRepo) -> None:
        self.worker = worker
        self.repo = repo
        self.gate_runs = 0
        self.merged = 0

    def stack(self, head: str, candidate: Candidate) -> str | MergeConflict:
        spec = candidate.record.spec
        message = commit_message(spec, candidate.entry, self.worker.run_id)
        return self.repo.apply(head, candidate.change, message, candidate.entry.result.finished_at)

    def gate(
        self, base: str, head: str, candidates: Sequence[Candidate], number: int
    ) -> GateResult:
        request = self.worker.gate_request(
            number, base, head, candidates, self.repo.diff(base, head)
        )
        self.gate_runs += 1
        self.worker.metrics.integration_gate_run()
        return self.worker.gate.run(request)

    def decided(self, verdict: Verdict[Candidate]) -> None:
        self.merged += verdict.outcome is IntegrationOutcome.MERGED
        self.worker.decide(verdict, self.repo)


def build_integration_worker(
    config: IntegrationConfig,
    *,
    database_url: str | None = None,
    metrics: Metrics | None = None,
    gate: TreeGate | None = None,
    clock: Callable[[], datetime] = _utcnow,
    rng: random.Random | None = None,
) -> IntegrationWorker:
    """Check the entry contracts (inputs, database) and assemble an integration worker."""
    inputs = load_inputs(config.workdir, config.run_id)
    url = database_url or os.environ.get("ORCHESTRATOR_DATABASE_URL") or default_url(config.workdir)
    where = f"--database-url {redact(url)}" if database_url else f"--workdir {config.workdir}"
    engine = make_engine(url)
    check_schema(engine, url, f"run `orchestrator db upgrade {where}`")
    return IntegrationWorker(
        config,
        InputsPlans(inputs),
        Store(engine, clock),
        gate=gate,
        metrics=metrics,
        clock=clock,
        rng=rng,
    )

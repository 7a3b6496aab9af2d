"""A chaos run of the operator on a real cluster (issue 11): many TaskExecutions while the
operator is SIGKILLed at random moments, runner pods and Jobs are deleted by hand, the leader
of two replicas is killed, and (when asked) the kube-apiserver is restarted and PostgreSQL is
stopped; then the invariant checker (:mod:`core.testing.invariants`) judges what the cluster,
the database, the ledger and the event log hold.

Used by ``bench/chaos.py`` (the recorded run) and ``tests/e2e/test_chaos.py`` (the short form).
Every random choice comes from one seeded ``random.Random``: the same seed gives the same task
mix and the same kill schedule (the moments a kill lands in the operator's work still vary
with the machine's speed, which is the point).

Phases:

1. *kills*: one replica (a fixed identity, so a restarted process takes its own Lease back at
   once); tasks are submitted with at most ``max_in_flight`` unfinished, paced so that the
   kills spread over the submissions; the operator is SIGKILLed after a random uptime and
   restarted after a random delay; pod and Job deletions are spread over the phase.
2. *pair*: a second replica joins; the rest of the tasks are submitted; the Lease holder is
   SIGKILLed (the standby takes over) and restarted as the new standby; the kube-apiserver
   restarts and the database outages come one after the other, each while tasks are in flight.
3. *converge*: both replicas run until every TaskExecution is terminal (or the deadline:
   whatever is left is *stuck*), then a sample of finished TaskExecutions is deleted and
   garbage collection is given its time before the snapshot.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.testing.invariants import TERMINAL, Report, Snapshot, check, orphans
from core.testing.observation import ClusterReader, ClusterRecorder, collect
from tests.e2e.api_faults import ApiFaults
from tests.e2e.chaos_plan import CRASH, FLAKY, MIX, SLEEPER, Cluster, Counts, Plan
from tests.e2e.disruptions import Postgres, restart_apiserver
from tests.e2e.operator_harness import (
    ROOT,
    OperatorProcess,
    adapter,
    apply,
    demo_patch,
    free_port,
    get_json,
    git_server,
    task_execution,
)
from tests.e2e.operator_killer import Killer

__all__ = ["ChaosRun", "Cluster", "Plan"]

LEASE = "orchestrator-operator"


class ChaosRun:
    def __init__(
        self,
        cluster: Cluster,
        plan: Plan,
        *,
        namespace: str,
        workdir: Path,
        database_url: str,
        postgres: Postgres | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if plan.db_outages and postgres is None:
            raise ValueError("database outages need a PostgreSQL of the run's own")
        self.cluster = cluster
        self.plan = plan
        self.ns = namespace
        self.workdir = workdir
        self.db_url = database_url
        self.postgres = postgres
        self.say = log
        self.rng = random.Random(plan.seed)
        self.counts = Counts()
        self.reader = ClusterReader(cluster.kubeconfig)
        self.recorder = ClusterRecorder(self.reader, [namespace])
        self.kinds: dict[str, str] = {}  # TaskExecution name -> kind
        self.uids: dict[str, str] = {}
        self.disturbed: set[str] = set()  # names whose pods or Jobs were deleted by hand
        self.states: dict[str, str] = {}
        self.repo = ""
        self.operators: dict[str, OperatorProcess] = {}
        self.t0 = time.monotonic()
        self.next_task = 0
        self.api_faults = (
            ApiFaults(cluster.kubeconfig, random.Random(plan.seed + 1)) if plan.api_faults else None
        )
        #: called before each kube-apiserver restart (it waits for other e2e sessions to end);
        #: returns the seconds it waited
        self.before_disruption: Callable[[], float] | None = None
        self.waited_for_others = 0.0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        k = self.cluster.kubectl
        k("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        k(
            "wait",
            "--for=condition=Established",
            "crd/taskexecutions.orchestrator.dev",
            "crd/adapters.orchestrator.dev",
        )
        k("create", "namespace", self.ns)
        _until(
            lambda: k("get", "sa", "default", "-n", self.ns, check=False).returncode == 0,
            60,
            "the default ServiceAccount",
        )
        self.repo = git_server(k, self.ns, self.cluster.image, self.cluster.pull_policy)
        git_ip = get_json(k, "pod", "git-server", "-n", self.ns)["status"]["podIP"]
        common: dict[str, Any] = {
            "egress": [{"cidr": f"{git_ip}/32", "ports": [9418]}],
            "resources": {"cpu": self.plan.cpu, "memory": "256Mi"},
            "retry": {
                "maxAttempts": 3,
                "backoffInitialSeconds": 1,
                "jitterSeconds": 0.5,
                "infrastructureBackoffSeconds": 2,
            },
            "breaker": {"failureThreshold": 1000, "cooldownSeconds": 5},
        }
        for obj in (
            adapter("patch", "patch", **common),
            adapter("crashy", "process", command=["{python}", "-c", CRASH], **common),
            adapter("flaky", "process", command=["{python}", "-c", FLAKY, "{attempt}"], **common),
            adapter(
                "sleepy", "process", command=["{python}", "-c", SLEEPER, "{prompt_file}"], **common
            ),
        ):
            apply(k, self.ns, obj)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.api_faults is not None:
            self.api_faults.start()
        evidence_port = free_port()  # one address for both, as a Service would give
        for name in ("a", "b"):
            op = OperatorProcess(
                kubeconfig=(
                    self.api_faults.kubeconfig if self.api_faults else self.cluster.kubeconfig
                ),
                namespace=self.ns,
                image=self.cluster.image,
                pull_policy=self.cluster.pull_policy,
                workdir=self.workdir,
                env={
                    "ORCHESTRATOR_DATABASE_URL": self.db_url,
                    "ORCHESTRATOR_IDENTITY": f"chaos-{name}",
                    "ORCHESTRATOR_LEASE_DURATION_SECONDS": "6",
                    "ORCHESTRATOR_RENEW_DEADLINE_SECONDS": "4",
                    "ORCHESTRATOR_RETRY_PERIOD_SECONDS": "1",
                    # migrated once by the run (as a chart's migration Job would)
                    "ORCHESTRATOR_MIGRATE": "false",
                },
                evidence_port=evidence_port,
            )
            op.log = self.workdir / f"operator-{name}.log"
            self.operators[name] = op

    def close(self) -> None:
        self.recorder.stop()
        for op in self.operators.values():
            op.stop()
        if self.api_faults is not None:
            self.api_faults.stop()
        self.reader.close()

    # ------------------------------------------------------------------ tasks

    def _task(self, i: int) -> dict[str, Any]:
        kinds = list(MIX)
        kind = self.rng.choices(kinds, weights=[MIX[k][0] for k in kinds])[0]
        name = f"chaos-{i:03d}-{kind.replace('_', '-')}"
        repo = self.repo
        spec: dict[str, Any]
        if kind == "ok":
            patch = demo_patch(self.rng.choice(["add-multiply", "update-logo"]))
            spec = {"task": {"prompt": "apply the patch", "patch": patch}}
            obj = task_execution(name, repo, "patch", **spec)
        elif kind == "gate_fail":
            spec = {"task": {"prompt": "x", "patch": demo_patch("break-subtract")}}
            obj = task_execution(name, repo, "patch", **spec)
        elif kind == "fallback":
            spec = {
                "task": {"prompt": "x", "patch": demo_patch("add-multiply")},
                "fallbackAdapterRefs": [{"name": "patch"}],
            }
            obj = task_execution(name, repo, "crashy", **spec)
        elif kind == "retry":
            obj = task_execution(name, repo, "flaky")
        elif kind == "slow":
            seconds = self.rng.randint(2, 25)
            obj = task_execution(name, repo, "sleepy", task={"prompt": f"sleep {seconds}"})
        else:  # timeout: the budget runs out while the adapter sleeps
            obj = task_execution(
                name, repo, "sleepy", task={"prompt": "sleep 120"}, timeoutSeconds=8
            )
        obj["spec"]["runId"] = "chaos"
        self.kinds[name] = kind
        return obj

    def _submit(self, i: int) -> None:
        """Apply task ``i``; a refused connection (the API server restarting, maybe by
        someone else's run on this shared cluster) is tried again for up to 5 minutes."""
        obj = self._task(i)
        deadline = time.monotonic() + 300
        while True:
            try:
                apply(self.cluster.kubectl, self.ns, obj)
                break
            except RuntimeError as exc:  # apply is idempotent: the same object again
                if time.monotonic() > deadline:
                    raise
                self.say(f"  (applying task {i} failed, again in 5 s: {str(exc)[:120]})")
                time.sleep(5)
        self.counts.submitted += 1

    def _refresh(self) -> int:
        """TaskExecution states now; returns how many are unfinished."""
        try:
            items = self.reader.list("taskexecutions", self.ns)
        except Exception as exc:  # the API server may be restarting
            self.say(f"  (listing TaskExecutions failed: {type(exc).__name__})")
            return sum(1 for s in self.states.values() if s not in TERMINAL)
        for te in items:
            name = te["metadata"]["name"]
            self.uids[name] = te["metadata"]["uid"]
            self.states[name] = (te.get("status") or {}).get("state", "PENDING")
        return sum(1 for s in self.states.values() if s not in TERMINAL)

    # ------------------------------------------------------------------ faults

    def _kill(self, name: str) -> None:
        op = self.operators[name]
        if op.proc is not None:
            op.proc.send_signal(signal.SIGKILL)
            op.proc.wait(timeout=30)
            op.proc = None

    def _runner_pods(self) -> list[dict[str, Any]]:
        pods = self.reader.list("pods", self.ns, "app.kubernetes.io/managed-by=orchestrator")
        return [
            p
            for p in pods
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        ]

    def _delete_pod(self) -> bool:
        pods = self._runner_pods()
        if not pods:
            return False
        pod = self.rng.choice(pods)
        self.cluster.kubectl(
            "delete", "pod", pod["metadata"]["name"], "-n", self.ns, "--wait=false", check=False
        )
        self.disturbed.add(pod["metadata"]["labels"].get("orchestrator.dev/taskexecution", ""))
        self.counts.pods_deleted += 1
        self.say(f"  deleted pod {pod['metadata']['name']}")
        return True

    def _delete_job(self) -> bool:
        jobs = self.reader.list("jobs", self.ns, "app.kubernetes.io/managed-by=orchestrator")
        active = [
            j for j in jobs if not _finished(j) and not j["metadata"].get("deletionTimestamp")
        ]
        if not active:
            return False
        job = self.rng.choice(active)
        self.recorder.poll()  # it is on record before it goes
        self.cluster.kubectl(
            "delete", "job", job["metadata"]["name"], "-n", self.ns, "--wait=false", check=False
        )
        self.disturbed.add(job["metadata"]["labels"].get("orchestrator.dev/taskexecution", ""))
        self.counts.jobs_deleted += 1
        self.say(f"  deleted Job {job['metadata']['name']}")
        return True

    def _holder(self) -> str | None:
        try:
            leases = self.reader.list("leases", self.ns)
        except Exception:
            return None
        for lease in leases:
            if lease["metadata"]["name"] == LEASE:
                return (lease.get("spec") or {}).get("holderIdentity")
        return None

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        self.recorder.start()
        started = time.monotonic()
        self._kills_phase()
        self.counts.timings["kills_phase_seconds"] = round(time.monotonic() - started, 1)
        mark = time.monotonic()
        self._pair_phase()
        self.counts.timings["pair_phase_seconds"] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()
        converged = self._converge()
        self.counts.timings["converge_seconds"] = round(time.monotonic() - mark, 1)
        self.say(f"converged: {converged}; checking")
        mark = time.monotonic()
        report, gc_violations = self._judge()
        self.counts.timings["check_seconds"] = round(time.monotonic() - mark, 1)
        self.counts.timings["total_seconds"] = round(time.monotonic() - started, 1)
        return self._result(report, gc_violations)

    def _kills_phase(self) -> None:
        plan = self.plan
        pair = plan.leader_kills or plan.apiserver_restarts or plan.db_outages
        total = plan.tasks - round(plan.tasks * plan.pair_share) if pair else plan.tasks
        deletions = ["pod"] * plan.pods_deleted + ["job"] * plan.jobs_deleted
        self.rng.shuffle(deletions)
        # deletion i happens once this many kills are done (spread over the phase)
        at_kill = sorted(self.rng.randint(1, max(1, plan.operator_kills - 1)) for _ in deletions)
        # API fault j is injected once this many seconds of the phase went by (a separate
        # rng: the task mix and kill schedule stay those of the same seed without faults)
        fault_rng = random.Random(plan.seed + 2)
        span = max(30.0, plan.operator_kills * (sum(plan.uptime) / 2 + 2.0))
        fault_at = sorted(fault_rng.uniform(0, span) for _ in range(plan.api_faults))
        phase_start = time.monotonic()
        killer = Killer(self.operators["a"], plan, self.rng)
        killer.start()
        i = 0
        unfinished, refreshed = 0, 0.0
        self.say(
            f"phase kills: {total} tasks, {plan.operator_kills} kills, {len(deletions)} deletions"
        )
        while self.counts.operator_kills < plan.operator_kills or i < total:
            now = time.monotonic()
            if now - refreshed >= 2.0:
                unfinished, refreshed = self._refresh(), now
                allowed = (
                    total
                    if self.counts.operator_kills >= plan.operator_kills
                    else max(
                        plan.max_in_flight,
                        round(total * (self.counts.operator_kills + 1) / plan.operator_kills),
                    )
                )
                while i < min(total, allowed) and unfinished < plan.max_in_flight:
                    self._submit(i)
                    i += 1
                    unfinished += 1
            if self.counts.operator_kills < plan.operator_kills and killer.step(now):
                self.counts.operator_kills += 1
                if self.counts.operator_kills % 10 == 0:
                    self.say(
                        f"  {self.counts.operator_kills} kills ({killer.while_leading} "
                        f"while leading), {i} submitted, {unfinished} unfinished, "
                        f"t={now - self.t0:.0f}s"
                    )
            elif self.counts.operator_kills >= plan.operator_kills:
                killer.ensure_running()
            while fault_at and fault_at[0] <= now - phase_start:
                assert self.api_faults is not None
                self.api_faults.inject()
                self.counts.api_faults_injected += 1
                fault_at.pop(0)
            while deletions and at_kill[0] <= self.counts.operator_kills:
                if not (self._delete_pod() if deletions[0] == "pod" else self._delete_job()):
                    break  # nothing running right now: try again on the next round
                deletions.pop(0)
                at_kill.pop(0)
            time.sleep(0.2)
        killer.ensure_running()
        self.counts.kills_while_leading = killer.while_leading
        while fault_at:  # the kills ended sooner than planned: the rest now, in a burst
            assert self.api_faults is not None
            self.api_faults.inject()
            self.counts.api_faults_injected += 1
            fault_at.pop(0)
            time.sleep(0.5)
        # deletions that found nothing to delete during the kills
        deadline = time.monotonic() + 300
        while deletions and time.monotonic() < deadline:
            if self._delete_pod() if deletions[0] == "pod" else self._delete_job():
                deletions.pop(0)
                continue
            if i < plan.tasks and self._refresh() < plan.max_in_flight:
                self._submit(i)
                i += 1
            time.sleep(1)
        self.next_task = i

    def _pair_phase(self) -> None:
        plan = self.plan
        a, b = self.operators["a"], self.operators["b"]
        if a.proc is None:
            a.start()
        if not (plan.leader_kills or plan.apiserver_restarts or plan.db_outages):
            return
        b.start()
        faults = (
            ["leader"] * plan.leader_kills
            + ["apiserver"] * plan.apiserver_restarts
            + ["db"] * plan.db_outages
        )
        self.say(f"phase pair: faults {faults}")
        i = self.next_task
        for fault in faults:
            # some work in flight first
            end = time.monotonic() + self.rng.uniform(10, 25)
            while time.monotonic() < end:
                while i < plan.tasks and self._refresh() < plan.max_in_flight:
                    self._submit(i)
                    i += 1
                time.sleep(1)
            if fault == "leader":
                self._kill_leader()
            elif fault == "apiserver":
                if self.before_disruption is not None:
                    self.waited_for_others += self.before_disruption()
                self.say("  restarting the kube-apiserver")
                r = restart_apiserver(self.cluster.kubectl_bin, self.cluster.kubeconfig)
                self.counts.apiserver_restarts += 1
                self.counts.apiserver_down_seconds.append(r.down_seconds)
                self.say(f"  kube-apiserver back after {r.down_seconds}s (pid {r.new_pid})")
            else:
                assert self.postgres is not None
                self.say(f"  stopping PostgreSQL for {plan.db_outage_seconds:.0f}s")
                self.postgres.down()
                self.counts.db_outages += 1
                time.sleep(plan.db_outage_seconds)
                self.postgres.up()
                self.say("  PostgreSQL is back")
        while i < plan.tasks:
            if self._refresh() < plan.max_in_flight:
                self._submit(i)
                i += 1
            else:
                time.sleep(1)
        self.next_task = i

    def _kill_leader(self) -> None:
        holder = _until(self._holder, 60, "a Lease holder")
        name = holder.removeprefix("chaos-")
        other = "b" if name == "a" else "a"
        started = time.monotonic()
        self._kill(name)
        self.counts.leader_kills += 1
        self.say(f"  killed the leader {holder}")
        _until(lambda: self._holder() == f"chaos-{other}", 120, f"chaos-{other} to lead")
        took = round(time.monotonic() - started, 2)
        self.counts.leader_takeover_seconds.append(took)
        self.say(f"  chaos-{other} leads after {took}s")
        time.sleep(self.rng.uniform(*self.plan.restart_delay))
        self.operators[name].start()

    def _converge(self) -> bool:
        for op in self.operators.values():
            if op.proc is None:
                op.start()
        deadline = time.monotonic() + self.plan.converge_timeout
        while time.monotonic() < deadline:
            if self._refresh() == 0 and len(self.states) >= self.counts.submitted:
                return True
            time.sleep(2)
        return False

    def _judge(self) -> tuple[Report, list[str]]:
        self.recorder.stop()
        snapshot = collect(
            self.reader,
            [self.ns],
            database_url=self.db_url,
            workdir=self.workdir,
            recorder=self.recorder,
        )
        report = check(snapshot, expected_uids=self.uids.values())
        self._save(snapshot)
        # garbage collection: a sample of finished TaskExecutions goes, with all it owned
        done = sorted(n for n, s in self.states.items() if s in TERMINAL)
        sample = self.rng.sample(done, min(self.plan.gc_sample, len(done)))
        for name in sample:
            self.cluster.kubectl("delete", "taskexecution", name, "-n", self.ns, "--wait=false")
        deadline = time.monotonic() + self.plan.gc_timeout
        left: list[str] = []
        while time.monotonic() < deadline:
            left = self._orphans()
            if not left:
                break
            time.sleep(3)
        self.counts.timings["gc_seconds"] = round(
            self.plan.gc_timeout - max(0.0, deadline - time.monotonic()), 1
        )
        return report, left

    def _orphans(self) -> list[str]:
        tes = self.reader.list("taskexecutions", self.ns)
        return orphans(
            Snapshot(
                task_executions=tes,
                jobs=self.reader.list("jobs", self.ns),
                pods=self.reader.list("pods", self.ns),
                configmaps=self.reader.list("configmaps", self.ns),
            )
        )

    def _save(self, snapshot: Snapshot) -> None:
        """The evidence behind the verdict, next to the work dir (for a post-mortem)."""
        out = self.workdir / "chaos-snapshot.json"
        out.write_text(
            json.dumps(
                {
                    "task_executions": list(snapshot.task_executions),
                    "events_seen": list(snapshot.events_seen),
                    "jobs_seen": list(snapshot.jobs_seen),
                },
                default=str,
            )
        )

    def _result(self, report: Report, gc_violations: list[str]) -> dict[str, Any]:
        outcomes: Counter[str] = Counter()
        unexpected = []
        for name, kind in sorted(self.kinds.items()):
            state = self.states.get(name, "MISSING")
            outcomes[f"{kind}:{state}"] += 1
            if name not in self.disturbed and state != MIX[kind][1]:
                unexpected.append(f"{name}: {state}, expected {MIX[kind][1]}")
        c = self.counts
        return {
            "tasks": report.tasks,
            "operator_kills": c.operator_kills,
            "operator_kills_while_leading": c.kills_while_leading,
            "apiserver_restarts": c.apiserver_restarts,
            "db_outages": c.db_outages,
            "db_outage_seconds": self.plan.db_outage_seconds if c.db_outages else 0,
            "pods_deleted": c.pods_deleted,
            "jobs_deleted": c.jobs_deleted,
            "leader_kills": c.leader_kills,
            "api_faults_injected": c.api_faults_injected,
            # calls that met a fault (a rule fails 1-3 calls; one whose calls never came, none)
            "api_faults": self.api_faults.fired() if self.api_faults else 0,
            "api_faults_by_call": self.api_faults.by_call() if self.api_faults else {},
            "lost": report.lost,
            "duplicated": report.duplicated,
            "stuck": report.stuck,
            "violations": report.violations + gc_violations,
            "timings": {
                **c.timings,
                "apiserver_down_seconds": c.apiserver_down_seconds,
                "leader_takeover_seconds": c.leader_takeover_seconds,
            },
            "outcomes": dict(sorted(outcomes.items())),
            "unexpected_outcomes": unexpected,
            "disturbed_tasks": len(self.disturbed - {""}),
            "recorder": {
                "polls": self.recorder.polls,
                "failed_polls": self.recorder.failed_polls,
                "jobs_seen": len(self.recorder.jobs),
                "events_seen": len(self.recorder.events),
            },
            "plan": asdict(self.plan),
        }


def _finished(job: dict[str, Any]) -> bool:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return True
    return False


def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

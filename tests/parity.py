"""One scenario matrix, run through both backends: the parity suite of the one lifecycle.

Each :class:`Scenario` is a phase-4 work dir (a real git repository, adapters, routed
tasks). :func:`run_embedded` executes it with the embedded executor; :func:`run_kubernetes`
submits the same adapters and tasks as Adapter and TaskExecution resources (the conversion
``orchestrator execute --backend kubernetes`` uses) to an operator -- on the in-memory API
server with the fake kubelet (fast suite) or on a real cluster (e2e). Both return the same
:class:`Outcome` per task, read from what each backend recorded in its database and ledger:
final state, failure class, attempt count, the attempts' classes, the ledger's shape and the
events. The tests assert the two are equal, and equal to what the scenario expects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.db.tables import ExecutionLog, GateTestResult
from core.engine.evidence import LEDGER_DIR
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore, load_secret
from core.engine.executor import Clocks, ExecutorConfig, build_executor
from core.engine.inputs import load_inputs
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress
from core.kube.api import KubeApi
from core.kube.control_loop import ControlLoop
from core.kube.evidence_server import EvidenceServer
from core.kube.reconciler import Controller, ControllerSettings
from core.kube.submit import adapter_resource, resource_name, task_resource
from core.models import LedgerEntry, TaskState
from tests.workdirs import make_workdir

RUN = "parity"
NS = "parity"
GATE = [
    {"name": "compile", "command": ["{python}", "-m", "compileall", "-q", "calc", "tests"]},
    {
        "name": "unit",
        "command": ["{python}", "-m", "unittest", "discover", "-s", "tests", "-t", "."],
    },
]
FILES = {
    "calc/__init__.py": "",
    "calc/ops.py": "def add(a, b):\n    return a + b\n",
    "tests/__init__.py": "",
    "tests/test_ops.py": (
        "import unittest\nfrom calc.ops import add\n\n\nclass T(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"
    ),
}
#: the same repository with a test that already fails at the base commit
FILES_KNOWN_BROKEN = {
    **FILES,
    "tests/test_known.py": (
        "import unittest\n\n\nclass K(unittest.TestCase):\n"
        "    def test_broken(self):\n        self.assertEqual(1, 2)\n"
    ),
}
KNOWN_ADD = "tests.test_ops.T.test_add"
KNOWN_BROKEN = "tests.test_known.K.test_broken"
GOOD = (
    "diff --git a/calc/ops.py b/calc/ops.py\n--- a/calc/ops.py\n+++ b/calc/ops.py\n"
    "@@ -1,2 +1,6 @@\n def add(a, b):\n     return a + b\n+\n+\n+def mul(a, b):\n"
    "+    return a * b\n"
)
BAD = (
    "diff --git a/calc/ops.py b/calc/ops.py\n--- a/calc/ops.py\n+++ b/calc/ops.py\n"
    "@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a + b\n+    return a - b\n"
)
FAST = {"backoff_initial_seconds": 0.1, "jitter_seconds": 0, "infrastructure_backoff_seconds": 0}
WRITE_MUL = (
    "import pathlib\npathlib.Path('calc/ops.py').write_text("
    "'def add(a, b):\\n    return a + b\\n\\n\\ndef mul(a, b):\\n    return a * b\\n')\n"
)
#: Attempt 1: an AI provider's throttling (the built-in detector: infrastructure); then work.
THROTTLED_ONCE = (
    "import sys\nif sys.argv[1] == '1':\n    print('Error: rate limit exceeded, retry later')\n"
    "    sys.exit(1)\n" + WRITE_MUL
)


def _process(adapter_id: str, code: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": adapter_id,
        "kind": "process",
        "command": ["{python}", "-c", code, *args],
        "gate": GATE,
        **extra,
    }


ADAPTERS: list[dict[str, Any]] = [
    {"id": "patch", "kind": "patch", "gate": GATE, "retry": {"max_attempts": 1}},
    _process("broken", "import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n"),
    _process(
        "slow", "import time\nfor i in range(60):\n    print(i, flush=True)\n    time.sleep(1)\n"
    ),
    _process("noop", "print('nothing to do')\n"),
    _process("throttled", THROTTLED_ONCE, "{attempt}"),
    _process(
        "crashy",
        "import sys\nsys.exit(7)\n",
        breaker={"failure_threshold": 1, "cooldown_seconds": 3600},
    ),
]


@dataclass(frozen=True)
class Outcome:
    state: str
    failure_class: str | None
    attempts: int
    classes: tuple[str | None, ...] = ()
    ledger: tuple[tuple[int, str, str | None], ...] = ()
    events: tuple[str, ...] = ()
    #: the gate's per-test rows: (attempt, check, outcome, test id), sorted
    gate_tests: tuple[tuple[int, str, str, str], ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    tasks: list[dict[str, Any]]
    routes: dict[str, list[str]]
    #: task id -> (state, failure class, attempts)
    expect: dict[str, tuple[str, str | None, int]]
    #: run the tasks one after the other (each waits for the one before to settle)
    sequential: bool = False
    #: cancel this task once the others settled (it waits for a breaker)
    cancel: str | None = None
    #: the repository's files at the base commit (default :data:`FILES`)
    files: dict[str, str] | None = None
    #: task id -> the per-test rows its gate must leave: (check, outcome, test id), sorted
    expect_gate: dict[str, tuple[tuple[str, str, str], ...]] | None = None

    def gate_expectations(
        self, found: dict[str, Outcome]
    ) -> dict[str, tuple[tuple[str, str, str], ...]]:
        """What ``found`` holds of :attr:`expect_gate`'s tasks, in its shape."""
        return {
            t: tuple((c, o, i) for _, c, o, i in found[t].gate_tests)
            for t in self.expect_gate or {}
        }


SCENARIOS = [
    Scenario(
        "success",
        [{"task_id": "ok", "prompt": "Add mul.", "patch": GOOD}],
        {"ok": ["patch"]},
        {"ok": ("COMPLETED", None, 1)},
    ),
    Scenario(
        "gate-failure",
        [{"task_id": "breaks", "prompt": "Break add.", "patch": BAD}],
        {"breaks": ["patch"]},
        {"breaks": ("FAILED", "gate_failed", 1)},
    ),
    Scenario(
        "fallback",
        [
            {
                "task_id": "fb",
                "prompt": "Add mul.",
                "patch": GOOD,
                "retry": {"max_attempts": 3, **FAST},
            }
        ],
        {"fb": ["broken", "patch"]},
        {"fb": ("COMPLETED", None, 2)},
    ),
    Scenario(
        "timeout",
        [{"task_id": "late", "prompt": "x", "timeout_seconds": 3, "retry": {"max_attempts": 1}}],
        {"late": ["slow"]},
        {"late": ("TIMEOUT", "adapter_timeout", 1)},
    ),
    Scenario(
        "empty-diff",
        [{"task_id": "idle", "prompt": "x", "retry": {"max_attempts": 1}}],
        {"idle": ["noop"]},
        {"idle": ("FAILED", "empty_diff", 1)},
    ),
    Scenario(
        # the case that disagreed: the budget runs out after an adapter_error
        "budget",
        [
            {
                "task_id": "spent",
                "prompt": "x",
                "timeout_seconds": 4,
                "retry": {
                    "max_attempts": 10,
                    "backoff_initial_seconds": 2.5,
                    "backoff_multiplier": 1,
                    "jitter_seconds": 0,
                    "min_attempt_seconds": 2,
                },
            }
        ],
        {"spent": ["broken"]},
        {"spent": ("TIMEOUT", "adapter_error", 1)},
    ),
    Scenario(
        "breaker-open-then-wait",
        [
            {"task_id": "first", "prompt": "x", "retry": {"max_attempts": 1}},
            {"task_id": "second", "prompt": "x", "retry": {"max_attempts": 1}},
        ],
        {"first": ["crashy"], "second": ["crashy"]},
        {"first": ("FAILED", "adapter_error", 1), "second": ("PENDING", None, 0)},
        sequential=True,
    ),
    Scenario(
        "cancel",
        [
            {"task_id": "trip", "prompt": "x", "retry": {"max_attempts": 1}},
            {"task_id": "doomed", "prompt": "x", "retry": {"max_attempts": 1}},
        ],
        {"trip": ["crashy"], "doomed": ["crashy"]},
        {"trip": ("FAILED", "adapter_error", 1), "doomed": ("CANCELLED", "cancelled", 0)},
        sequential=True,
        cancel="doomed",
    ),
    Scenario(
        # issue 14 on both backends: a test failing at the base commit, a patch that breaks
        # another one; the gate blames exactly the new failure, Job or process alike
        "gate-per-test",
        [
            {"task_id": "regress", "prompt": "Break add.", "patch": BAD, "gate_baseline": True},
            {"task_id": "harmless", "prompt": "Add mul.", "patch": GOOD, "gate_baseline": True},
        ],
        {"regress": ["patch"], "harmless": ["patch"]},
        {"regress": ("FAILED", "gate_failed", 1), "harmless": ("COMPLETED", None, 1)},
        files=FILES_KNOWN_BROKEN,
        expect_gate={
            "regress": (
                ("unit", "new_failure", KNOWN_ADD),
                ("unit", "pre_existing", KNOWN_BROKEN),
            ),
            "harmless": (("unit", "pre_existing", KNOWN_BROKEN),),
        },
    ),
    Scenario(
        "infrastructure-retried",
        [{"task_id": "throttle", "prompt": "x", "retry": {"max_attempts": 3, **FAST}}],
        {"throttle": ["throttled"]},
        {"throttle": ("COMPLETED", None, 2)},
    ),
]


def workdir_for(root: Path, scenario: Scenario) -> Path:
    """The scenario's phase-4 work dir; the repository is given as a file:// URL, which both
    backends (and the fake kubelet's pods) can clone."""
    repo = (root / "repo").resolve()
    tasks = [{**t, "repo": repo.as_uri()} for t in scenario.tasks]
    return make_workdir(
        root,
        run_id=RUN,
        tasks=tasks,
        adapters=ADAPTERS,
        routes=scenario.routes,
        files=scenario.files or FILES,
    )


def outcomes(db_url: str, workdir: Path, task_ids: list[str]) -> dict[str, Outcome]:
    """What a backend recorded, per task (the newest identity of each task id)."""
    engine = make_engine(db_url)
    store = Store(engine)
    ledger_path = workdir / ".state/patch_ledger.jsonl"
    entries = (
        [LedgerEntry.model_validate_json(x) for x in ledger_path.read_text().splitlines()]
        if ledger_path.exists()
        else []
    )
    found: dict[str, Outcome] = {}
    with Session(engine) as s:
        for record in store.tasks(RUN):
            if record.task_id not in task_ids:
                continue
            uid = record.key.uid
            events = [
                e.event
                for e in s.scalars(
                    select(ExecutionLog)
                    .where(ExecutionLog.task_id == record.task_id)
                    .where(ExecutionLog.task_uid == uid)
                    .order_by(ExecutionLog.id)
                )
            ]
            ledger = [
                (e.attempt, e.state.value, e.failure_class.value if e.failure_class else None)
                for e in entries
                if e.task_id == record.task_id and (e.task_uid or "") == uid
            ]
            found[record.task_id] = Outcome(
                state=record.status.value,
                failure_class=record.failure_class.value if record.failure_class else None,
                attempts=record.attempts,
                classes=tuple(
                    a.failure_class.value if a.failure_class else None
                    for a in record.attempt_results
                ),
                ledger=tuple(ledger),
                events=tuple(events),
                gate_tests=tuple(
                    sorted(
                        (g.attempt, g.check_name, g.outcome, g.test_id)
                        for g in s.scalars(
                            select(GateTestResult)
                            .where(GateTestResult.task_id == record.task_id)
                            .where(GateTestResult.task_uid == uid)
                        )
                    )
                ),
            )
    engine.dispose()
    return found


def run_embedded(root: Path, scenario: Scenario) -> dict[str, Outcome]:
    workdir = workdir_for(root, scenario)
    url = default_url(workdir)
    upgrade(url)
    executor = build_executor(
        ExecutorConfig(run_id=RUN, workdir=workdir, wait_for_breakers=False),
        progress=SilentProgress(),
        metrics=Metrics(),
        clocks=Clocks(),
    )
    executor.run()
    if scenario.cancel is not None:
        from typer.testing import CliRunner

        from core.cli import app

        result = CliRunner().invoke(
            app, ["cancel", scenario.cancel, "--run", RUN, "--workdir", str(workdir)]
        )
        assert result.exit_code == 0, result.output
    return outcomes(url, workdir, [t["task_id"] for t in scenario.tasks])


Connect = Callable[[], Awaitable[KubeApi]]


@dataclass
class Cluster:
    """Where the Kubernetes half runs: the API, a namespace, and how the pods see python."""

    connect: Connect
    namespace: str
    runner_image: str = "unused"
    image_pull_policy: str = "IfNotPresent"
    timeout: float = 300.0
    #: Where the operator's evidence server listens, reachable by the runner pods (the fake
    #: kubelet's run on this machine; a real cluster's reach the node address).
    evidence_host: str = "127.0.0.1"


async def _state(api: KubeApi, ns: str, name: str) -> tuple[str, str]:
    obj = await api.get_object("taskexecutions", ns, name) or {}
    status = obj.get("status") or {}
    return str(status.get("state", "PENDING")), str(status.get("reason", ""))


def _settled(state: str, reason: str) -> bool:
    return TaskState(state).terminal or reason == "WaitingForBreaker"


async def drive_kubernetes(
    api: KubeApi,
    workdir: Path,
    scenario: Scenario,
    *,
    operator_workdir: Path,
    cluster: Cluster,
    adapter_patch: Callable[[dict[str, Any]], dict[str, Any]] = lambda a: a,
    repo_url: str | None = None,
) -> None:
    """Submit the scenario and run an operator (the control loop) until every task settled."""
    url = default_url(operator_workdir)
    upgrade(url)
    # the operator's local evidence store, served to the runner pods as core.kube.runtime does
    signer = GrantSigner(load_secret(operator_workdir / ".evidence-grant-key"))
    store = LocalGrantingStore(operator_workdir / LEDGER_DIR, base_url="", signer=signer)
    server = EvidenceServer(store, signer)
    port = await server.start(cluster.evidence_host, 0)
    store.base_url = f"http://{cluster.evidence_host}:{port}"
    reach = {"to": [{"ipBlock": {"cidr": f"{cluster.evidence_host}/32"}}],
             "ports": [{"protocol": "TCP", "port": port}]}  # fmt: skip
    controller = Controller(
        api,
        Store(make_engine(url)),
        ControllerSettings(
            workdir=operator_workdir,
            runner_image=cluster.runner_image,
            namespaces=(cluster.namespace,),
            image_pull_policy=cluster.image_pull_policy,
            resync_seconds=2,
            evidence_egress=(reach,),
        ),
        evidence=store,
    )
    loop = ControlLoop(controller, api, namespaces=(cluster.namespace,), resync_seconds=2)
    running = asyncio.create_task(loop.run())
    try:
        inputs = load_inputs(workdir, RUN)
        for spec in inputs.adapters.values():
            body = adapter_patch(adapter_resource(spec))
            await api.create_object("adapters", cluster.namespace, body)
        names = []
        for task in inputs.tasks:
            body = task_resource(RUN, task)
            if repo_url is not None:  # the same commits, where the cluster's pods clone them
                body["spec"]["source"]["repo"] = repo_url
            names.append(body["metadata"]["name"])
            await api.create_object("taskexecutions", cluster.namespace, body)
            if scenario.sequential:
                await _until(api, cluster, [names[-1]])
        await _until(api, cluster, names)
        if scenario.cancel is not None:
            doomed = resource_name(RUN, scenario.cancel)
            await api.delete_object("taskexecutions", cluster.namespace, doomed)
            await _until_cancelled(operator_workdir, scenario.cancel, cluster.timeout)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await server.close()


async def _until(api: KubeApi, cluster: Cluster, names: list[str]) -> None:
    deadline = time.monotonic() + cluster.timeout
    while time.monotonic() < deadline:
        states = [await _state(api, cluster.namespace, n) for n in names]
        if all(_settled(*s) for s in states):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"not settled after {cluster.timeout:.0f}s: {names} {states}")


async def _until_cancelled(operator_workdir: Path, task_id: str, timeout: float) -> None:
    engine = make_engine(default_url(operator_workdir))
    store = Store(engine)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            records = [r for r in store.tasks(RUN) if r.task_id == task_id]
            if records and records[-1].status is TaskState.CANCELLED:
                return
            await asyncio.sleep(0.3)
    finally:
        engine.dispose()
    raise AssertionError(f"{task_id} was not recorded CANCELLED")

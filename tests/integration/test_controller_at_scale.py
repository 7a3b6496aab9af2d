"""The controller with many objects, on the fake API server (issue 17): what it costs to wait.

The control loop runs as in the operator, on a fake clock, so resync periods pass without
sleeping; the assertions are on the API calls the fake API server saw and on the work queue.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.engine.evidence import LEDGER_DIR
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore
from core.kube.api import ApiCall
from core.kube.control_loop import ControlLoop
from core.kube.reconciler import Controller, ControllerSettings
from core.testing.clock import FakeClock
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import adapter, demo_patch, task_execution

NS = "scale"
TE = "taskexecutions"


def _controller(api: FakeKubeApi, workdir: Path) -> Controller:
    url = default_url(workdir)
    upgrade(url)
    # no pod runs here (no kubelet): the store is never called over HTTP
    signer = GrantSigner(b"k" * 32)
    evidence = LocalGrantingStore(
        workdir / LEDGER_DIR, base_url="http://127.0.0.1:9", signer=signer
    )
    return Controller(
        api,
        Store(make_engine(url)),
        ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,)),
        evidence=evidence,
    )


async def _settle(loop: ControlLoop, clock: FakeClock, rounds: int = 400) -> None:
    """Let the workers run until the queue is empty (the database work runs in threads)."""
    for _ in range(rounds):
        await clock.settle()
        if not len(loop.queue) and not loop.queue.in_progress():
            await asyncio.sleep(0.01)
            if not len(loop.queue) and not loop.queue.in_progress():
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the queue did not drain: {len(loop.queue)} ready")


def test_parked_tasks_cost_no_api_call_per_resync_and_start_once_their_adapter_exists(
    tmp_path: Path,
) -> None:
    n = 60
    calls: list[ApiCall] = []

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        clock = FakeClock()
        controller = _controller(api, tmp_path)
        task = {"prompt": "p", "patch": demo_patch("add-multiply")}
        for i in range(n):
            await api.create_object(
                TE, NS, task_execution(f"t-{i:03d}", "git://x/y.git", "absent", task=task)
            )
        loop = ControlLoop(
            controller, api, namespaces=(NS,), resync_seconds=30, workers=8, clock=clock
        )
        driver = asyncio.create_task(loop.run())
        await loop.synced()
        await _settle(loop, clock)
        parked = await api.list_objects(TE, NS)
        assert Counter((t.get("status") or {}).get("reason") for t in parked) == {
            "AdapterNotFound": n
        }

        api.add_observer(calls.append)  # from here on: what waiting costs
        syncs: list[str] = []
        controller.add_observer(lambda kind, name, _s: syncs.append(kind))
        for _ in range(5):  # five resync periods
            clock.advance(30)
            await _settle(loop, clock)
        assert calls == [], "waiting for a missing Adapter must cost no API call"
        assert "sync" not in syncs, "a parked task whose inputs did not change is not synced"

        # the Adapter appears: each waiting task starts (one Job each), without a resync
        await api.create_object("adapters", NS, adapter("absent", "patch"))
        await _settle(loop, clock)
        for _ in range(3):  # the deferred halves of the starts (LOW lane) follow
            clock.advance(1)
            await _settle(loop, clock)
        jobs = await api.list_jobs(NS)
        assert len(jobs) == n
        made = Counter(c.name for c in calls if c.verb == "create" and c.resource == "jobs")
        assert set(made.values()) == {1} and len(made) == n
        tes = await api.list_objects(TE, NS)
        assert Counter(t["status"]["state"] for t in tes) == {"IN_PROGRESS": n}
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)

    asyncio.run(main())
    started = [c for c in calls if c.verb == "create" and c.resource == "events"]
    assert len(started) == n  # one TASK_STARTED Event per task, after its Job

"""Escalations as Warning Events, on the fake API server with the fake kubelet.

The control loop runs as the operator runs it (informers, work queue, the escalation Events
part); a process adapter crashes (exit 7) with a breaker threshold of one, which raises
``breaker_open`` and ``adapter_crash``. What is asserted is what the API server and the
database saw: one Warning Event per escalation and object, with a deterministic name, the
rows stamped; a second operator on the same database and server (a restart) posts nothing;
a POST whose answer was lost (applied, then a timeout) is replayed as a 409 and not posted
twice; a row left unposted by a crash is posted by the next leader's first pass.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.escalations import EscalationRows
from core.db.store import Store
from core.db.tables import Escalation as EscalationRow
from core.engine.escalation import Escalation, EscalationReason
from core.errors import TransientApiError
from core.kube.control_loop import ControlLoop
from core.kube.escalation_events import EscalationEvents, event_name
from core.kube.reconciler import Controller, ControllerSettings
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.e2e.operator_harness import adapter, task_execution
from tests.local_evidence import serve_local_evidence
from tests.workdirs import demo_remote

NS = "esc"
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}
CRASH = "import sys\nprint('model service down', flush=True)\nsys.exit(7)\n"


class AnswerLost:
    """The API, except that the first named Event POST takes effect and its answer is lost
    (a timeout after the server applied it): the ambiguous outcome a replay must survive."""

    def __init__(self, api: FakeKubeApi) -> None:
        self.api = api
        self.lost: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    async def post_event(self, obj: Any, *args: Any, name: str | None = None) -> bool:
        created = await self.api.post_event(obj, *args, name=name)
        if name is not None and not self.lost:
            self.lost.append(name)
            raise TransientApiError("injected: no answer", status=None)
        return created


def _operator(
    api: FakeKubeApi, engine: Any, workdir: Path, evidence: Any, events_api: Any = None
) -> tuple[ControlLoop, EscalationEvents]:
    controller = Controller(
        api,
        Store(engine),
        ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,)),
        evidence=evidence,
    )
    events = EscalationEvents(
        events_api or api,
        controller.recorder.escalations,
        controller.cache,
        controller.breakers,
        namespaces=(NS,),
        retry_seconds=0.2,
    )
    loop = ControlLoop(controller, api, namespaces=(NS,), resync_seconds=5, parts=[events])
    return loop, events


async def _escalation_events(api: FakeKubeApi) -> list[dict[str, Any]]:
    listed = await api.list_resource("events", NS)
    return [e for e in listed.items if e["reason"] == "ESCALATION"]


async def _until(predicate: Any, what: str, timeout: float = 120.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def test_breaker_and_crash_escalations_become_warning_events_once(tmp_path: Path) -> None:
    bare, workdir = demo_remote(tmp_path)
    upgrade(default_url(workdir))
    engine = make_engine(default_url(workdir))
    rows = EscalationRows(engine)

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        evidence, server = await serve_local_evidence(workdir)
        crashy = adapter(
            "crashy",
            "process",
            command=["{python}", "-c", CRASH],
            retry={"maxAttempts": 1},
            breaker={"failureThreshold": 1, "cooldownSeconds": 3600},
        )
        crashy_obj = (await api.create_object("adapters", NS, crashy)).object
        te = (
            await api.create_object(
                "taskexecutions", NS, task_execution("crash-once", bare.as_uri(), "crashy")
            )
        ).object
        # the first POST of an escalation Event takes effect but its answer is lost: the
        # replay must find it (409) instead of posting it again
        lossy = AnswerLost(api)
        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            loop, poster = _operator(api, engine, workdir, evidence, lossy)
            driver = asyncio.create_task(loop.run())

            async def posted() -> bool:
                keys = {r["escalation_key"] for r in rows.rows()}
                pending = rows.events_pending((NS,))
                return len(keys) >= 2 and not pending

            await _until(posted, "both escalations posted")
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            assert kubelet.errors == []

        by_reason = {r["reason"]: r for r in rows.rows()}
        assert set(by_reason) == {"breaker_open", "adapter_crash"}
        events = await _escalation_events(api)
        seen = sorted(
            (e["involvedObject"]["kind"], e["action"], e["metadata"]["name"]) for e in events
        )
        breaker_key = by_reason["breaker_open"]["escalation_key"]
        crash_key = by_reason["adapter_crash"]["escalation_key"]
        assert seen == sorted(
            [
                ("Adapter", "breaker_open", event_name(crashy_obj, breaker_key)),
                ("TaskExecution", "breaker_open", event_name(te, breaker_key)),
                ("TaskExecution", "adapter_crash", event_name(te, crash_key)),
            ]
        )
        assert all(e["type"] == "Warning" for e in events)
        assert len(lossy.lost) == 1 and lossy.lost[0] in {n for _, _, n in seen}
        on_adapter = next(e for e in events if e["involvedObject"]["kind"] == "Adapter")
        assert on_adapter["involvedObject"]["uid"] == crashy_obj["metadata"]["uid"]
        assert "circuit breaker of adapter crashy opened" in on_adapter["message"]
        assert "evidence:" in on_adapter["message"] and "resilience_log" in on_adapter["message"]
        stamped = [r["event_posted_at"] for r in rows.rows()]
        assert all(stamp is not None for stamp in stamped)

        # the operator raises breaker_open_too_long itself (the breaker is still OPEN two
        # hours later, past the 900 s default), once per trip, as an Event on the Adapter
        poster.now = lambda: datetime.now(UTC) + timedelta(hours=2)
        assert await asyncio.to_thread(poster.check_breakers) == 1
        assert await asyncio.to_thread(poster.check_breakers) == 0
        assert await poster.post_pending() == 1
        too_long = [
            e for e in await _escalation_events(api) if e["action"] == "breaker_open_too_long"
        ]
        assert [e["involvedObject"]["kind"] for e in too_long] == ["Adapter"]

        # a restart: a new operator on the same database and API server posts nothing
        writes: list[str] = []
        api.add_observer(lambda c: writes.append(c.resource) if c.write else None)
        loop, _ = _operator(api, engine, workdir, evidence)
        driver = asyncio.create_task(loop.run())
        await _until(lambda: _synced(loop), "the restarted loop to lead")
        await asyncio.sleep(1.0)  # room for a first pass to post something (it must not)
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        assert "events" not in writes
        assert len(await _escalation_events(api)) == 4

        # a crash between a row and its Event: the next leader's first pass posts it, once
        with Session(engine) as s, s.begin():
            s.execute(
                update(EscalationRow)
                .where(EscalationRow.escalation_key == crash_key)
                .values(event_posted_at=None)
            )
        loop, _ = _operator(api, engine, workdir, evidence)
        driver = asyncio.create_task(loop.run())
        await _until(lambda: _none_pending(rows), "the unposted row to be stamped")
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        # the Event of that name still existed: 409, stamped, nothing added
        assert len(await _escalation_events(api)) == 4
        await server.close()

    asyncio.run(main())


async def _synced(loop: ControlLoop) -> bool:
    return loop.leading


async def _none_pending(rows: EscalationRows) -> bool:
    return not rows.events_pending((NS,))


def test_pending_rows_are_the_served_namespaces_and_never_the_embedded_ones(
    tmp_path: Path,
) -> None:
    upgrade(default_url(tmp_path))
    engine = make_engine(default_url(tmp_path))
    rows = EscalationRows(engine)
    now = datetime.now(UTC)
    for key, scope in (("a", ""), ("b", "team-a"), ("c", "team-b")):
        escalation = Escalation(
            key=key,
            reason=EscalationReason.TASK_TIMEOUT,
            message="m",
            created_at=now,
            run_id="r",
            task_id="t",
            task_uid=f"uid-{key}" if scope else "",
            scope=scope,
        )
        assert rows.insert(escalation.row())
    assert [r["escalation_key"] for r in rows.events_pending()] == ["b", "c"]
    assert [r["escalation_key"] for r in rows.events_pending(("team-b",))] == ["c"]
    rows.event_posted("c")
    assert [r["escalation_key"] for r in rows.events_pending()] == ["b"]
    with Session(engine) as s:
        stamped = s.scalars(select(EscalationRow.event_posted_at).order_by(EscalationRow.id))
        assert [v is not None for v in stamped] == [False, False, True]

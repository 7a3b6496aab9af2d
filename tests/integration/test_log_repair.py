"""The logs derived from the database are repaired after a crash, never doubled (real SQLite
and files; the control loop on the fake API).

A writer commits its rows, then appends their lines (``core.engine.recorder``); a crash
between the two leaves ``logs/executor.jsonl`` or ``logs/escalations.jsonl`` a line short.
The operator keeps no key set (its events come from keyed inserts), so its repair compares
with the file; a repair beside a live writer waits for the writer's line instead of writing
it too (``core.engine.log_lock``); and an operator that starts leading repairs what the
leader before it left out (the failure the chaos e2e found: a kill between the commit of an
ATTEMPT_FAILED and its line).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Event, Store
from core.engine.escalation import Escalation, EscalationReason, Escalations
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore
from core.engine.lifecycle import Start
from core.engine.monitoring.metrics import Metrics
from core.engine.recorder import Recorder
from core.identity import TaskKey
from core.kube.control_loop import ControlLoop
from core.kube.reconciler import Controller, ControllerSettings
from core.models import AdapterSpec, EventName, TaskSpec
from core.testing.fake_kube import FakeKubeApi

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NS = "repair"


def _store(workdir: Path, tasks: int) -> tuple[Store, list[TaskKey]]:
    url = default_url(workdir)
    upgrade(url)
    store = Store(make_engine(url), now=lambda: T0)
    adapter = AdapterSpec(id="a", kind="process", command=["true"])
    specs = [
        (i, TaskSpec(task_id=f"t{i}", prompt="p", repo="repo", base_commit="0" * 40), "a")
        for i in range(tasks)
    ]
    store.sync_inputs("r", [adapter], specs)
    return store, [TaskKey("r", f"t{i}") for i in range(tasks)]


def _keys(path: Path, field: str) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)[field] for line in path.read_text().splitlines())


def _escalation(key: str) -> Escalation:
    return Escalation(
        key=key,
        reason=EscalationReason.TASK_TIMEOUT,
        message="task t0 (run r) exceeded its time budget: Zeitüberschreitung",
        created_at=T0,
        run_id="r",
        task_id="t0",
        adapter_id="a",
    )


def _operator_recorder(workdir: Path, store: Store) -> Recorder:
    # as the operator builds it: no key set in memory, the database de-duplicates
    return Recorder(store, workdir, metrics=Metrics(), clock=lambda: T0, dedupe_events=False)


def test_a_crash_between_commit_and_line_is_repaired_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, keys = _store(tmp_path, 3)
    recorder = _operator_recorder(tmp_path, store)
    events = tmp_path / "logs" / "executor.jsonl"
    escalations = tmp_path / "logs" / "escalations.jsonl"
    for key in keys[:2]:
        store.begin_attempt(key, 1, "a", started_at=T0)  # committed; the line never written
    recorder.begin(keys[2], Start(1, "a", 60))  # committed and written
    escalation = _escalation("task_timeout/r/t0")

    def disk_full(records: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Escalations, "_append", staticmethod(disk_full))
        with pytest.raises(OSError):
            recorder.escalations.raise_(escalation)
    assert _keys(escalations, "escalation_key") == Counter()
    assert len(_keys(events, "event_key")) == 1

    assert recorder.repair_logs() == (2, 1)
    expected = {e.key for e in store.events()}
    assert len(expected) == 3
    assert _keys(events, "event_key") == Counter(expected)  # each once
    assert _keys(escalations, "escalation_key") == Counter([escalation.key])
    assert recorder.repair_logs() == (0, 0)  # nothing twice
    assert _keys(events, "event_key") == Counter(expected)


def test_a_repair_beside_a_live_writer_waits_for_its_line(tmp_path: Path) -> None:
    store, _ = _store(tmp_path, 1)
    writer = _operator_recorder(tmp_path, store)
    repairer = _operator_recorder(tmp_path, store)  # another replica on the same work dir
    committed, go_on = threading.Event(), threading.Event()

    def commit() -> list[Event]:
        events = store.run_event("r", EventName.EXECUTION_FINISHED, {}, key="r//FINISHED")
        committed.set()
        assert go_on.wait(10)  # the writer stalls between its commit and its line
        return events

    writing = threading.Thread(target=writer.commit_events, args=(commit,))
    writing.start()
    assert committed.wait(10)
    repaired: list[tuple[int, int]] = []
    repairing = threading.Thread(target=lambda: repaired.append(repairer.repair_logs()))
    repairing.start()
    repairing.join(0.5)  # without the lock it would append the writer's line by now
    go_on.set()
    writing.join(10)
    repairing.join(10)
    assert not writing.is_alive() and not repairing.is_alive()
    assert repaired == [(0, 0)]  # the writer's line was there when the repair looked
    path = tmp_path / "logs" / "executor.jsonl"
    assert _keys(path, "event_key") == Counter(["r//FINISHED"])


def test_a_new_leader_repairs_what_the_last_one_left_out(tmp_path: Path) -> None:
    workdir = tmp_path / "operator"
    workdir.mkdir()
    store, keys = _store(workdir, 2)
    for key in keys:  # the dead leader's commits, their lines lost with it
        store.begin_attempt(key, 1, "a", started_at=T0)
    evidence = LocalGrantingStore(
        workdir / ".ledger", base_url="http://127.0.0.1:1", signer=GrantSigner(b"k" * 32)
    )
    settings = ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,))

    async def main() -> int:
        api = FakeKubeApi(namespaces=(NS,))
        loop = ControlLoop(
            Controller(api, store, settings, evidence=evidence),
            api,
            namespaces=(NS,),
            resync_seconds=5,
        )
        driver = asyncio.create_task(loop.run())
        for _ in range(400):
            if loop.log_repair.passes:
                break
            await asyncio.sleep(0.025)
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        return loop.log_repair.passes

    assert asyncio.run(main()) == 1
    path = workdir / "logs" / "executor.jsonl"
    assert _keys(path, "event_key") == Counter(e.key for e in store.events())
    assert len(store.events()) == 2


def test_a_line_cut_inside_a_character_is_repaired_not_fatal(tmp_path: Path) -> None:
    """A crash mid-write can cut a line inside a UTF-8 character (the lines are not ASCII
    escaped): the repair skips the cut line, writes the event again on a line of its own."""
    store, keys = _store(tmp_path, 2)
    recorder = _operator_recorder(tmp_path, store)
    recorder.begin(keys[0], Start(1, "a", 60))
    events = tmp_path / "logs" / "executor.jsonl"
    escalations = tmp_path / "logs" / "escalations.jsonl"
    recorder.escalations.raise_(_escalation("task_timeout/r/t0"))
    cut_event = store.run_event("r", EventName.EXECUTION_FINISHED, {"note": "ü"}, key="r//F")
    line = json.dumps(cut_event[0].as_json(), ensure_ascii=False).encode()
    with open(events, "ab") as fh:
        fh.write(line[: line.index("ü".encode()) + 1])  # half of the ü, then the crash
    whole = escalations.read_bytes()
    escalations.write_bytes(whole[: whole.index("ü".encode()) + 1])  # its only line, cut

    assert recorder.repair_logs() == (1, 1)
    assert _keys_lenient(events, "event_key") == Counter(e.key for e in store.events())
    assert _keys_lenient(escalations, "escalation_key") == Counter(["task_timeout/r/t0"])
    assert recorder.repair_logs() == (0, 0)


def test_a_cached_key_set_does_not_hide_another_writers_line(tmp_path: Path) -> None:
    """The embedded executor's log keeps its keys in memory; a line another writer appended
    since is still seen by the repair, not written a second time."""
    store, keys = _store(tmp_path, 3)
    executor = Recorder(store, tmp_path, metrics=Metrics(), clock=lambda: T0)  # dedupe on
    executor.begin(keys[0], Start(1, "a", 60))  # its key set is read and kept
    _operator_recorder(tmp_path, store).begin(keys[1], Start(1, "a", 60))  # another writer
    store.begin_attempt(keys[2], 1, "a", started_at=T0)  # a crash before its line
    assert executor.repair_logs() == (1, 0)
    path = tmp_path / "logs" / "executor.jsonl"
    assert _keys(path, "event_key") == Counter(e.key for e in store.events())
    executor.begin(keys[2], Start(1, "a", 60))  # a replay: recorded, its line there already
    assert _keys(path, "event_key") == Counter(e.key for e in store.events())


def _keys_lenient(path: Path, field: str) -> Counter[str]:
    """The keys of the lines that parse (a line cut by a crash does not)."""
    keys: Counter[str] = Counter()
    for raw in path.read_bytes().splitlines():
        try:
            keys[json.loads(raw)[field]] += 1
        except ValueError:
            continue
    return keys

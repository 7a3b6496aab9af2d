"""The operator's log repair passes (core/kube/log_repair.py): passes asked for together are
done as one, a pass asked for while one runs gets one more after it, and a failed pass is
tried again with a backoff (the sleep is injected) without ever raising to the leader."""

from __future__ import annotations

import asyncio
import threading

from core.kube.log_repair import LogRepair


def test_passes_asked_together_are_one_and_one_asked_during_a_pass_follows() -> None:
    calls: list[int] = []
    running, release = threading.Event(), threading.Event()

    def repair() -> tuple[int, int]:
        calls.append(len(calls))
        running.set()
        assert release.wait(10)
        return 0, 0

    async def main() -> None:
        passes = LogRepair(repair)
        for _ in range(5):  # a dead replica's shards, gained at once
            passes.request()
        await asyncio.to_thread(running.wait, 10)
        running.clear()
        passes.request()  # a shard gained while the first pass runs
        passes.request()
        release.set()
        await passes.idle()
        assert passes.passes == 2 and len(calls) == 2
        passes.request()
        await passes.idle()
        assert passes.passes == 3
        await passes.close()

    asyncio.run(main())


def test_a_failed_pass_is_tried_again_with_a_growing_backoff() -> None:
    failures = [OSError("database away"), RuntimeError("still away"), None]
    slept: list[float] = []

    def repair() -> tuple[int, int]:
        failure = failures.pop(0)
        if failure is not None:
            raise failure
        return 1, 0

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> int:
        passes = LogRepair(repair, sleep=sleep, backoff=(2.0, 3.0))
        passes.request()
        await passes.idle()
        return passes.passes

    assert asyncio.run(main()) == 1
    assert slept == [2.0, 3.0] and failures == []


def test_close_stops_a_pass_that_keeps_failing() -> None:
    attempts: list[int] = []

    def repair() -> tuple[int, int]:
        attempts.append(1)
        raise OSError("database away")

    async def main() -> None:
        passes = LogRepair(repair, backoff=(0.01, 0.01))
        passes.request()
        while len(attempts) < 3:
            await asyncio.sleep(0.01)
        await passes.close()
        seen = len(attempts)
        await asyncio.sleep(0.1)
        assert len(attempts) <= seen + 1  # at most the pass already in its thread
        assert passes.passes == 0

    asyncio.run(main())

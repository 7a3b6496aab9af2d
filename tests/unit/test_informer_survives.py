"""An informer never dies, and a watch stream cut mid-way is a transient API error.

Found by the chaos run (bench/chaos.py) with kube-apiserver restarts: a watch whose
connection was lost mid-stream raised aiohttp's ``ServerDisconnectedError`` out of
``ClientKubeApi.watch``; the informer caught only API and OS errors, so its task ended
silently, the operator's cache froze, and the TaskExecutions created afterwards were never
seen (8 of them waited without a status until the run gave up on them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from core.errors import TransientApiError
from core.kube.api import WatchEvent
from core.kube.informer import Informer
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import task_execution
from tests.http_server import stub_kube_api

NS = "ns"


class CutStreams(FakeKubeApi):
    """The fake API server, whose watch streams break after one event with each error."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(namespaces=(NS,))
        self.errors = errors

    async def watch(self, *args: Any, **kwargs: Any) -> AsyncIterator[WatchEvent]:
        async for event in super().watch(*args, **kwargs):
            yield event
            if self.errors:
                raise self.errors.pop(0)


def test_an_informer_lists_again_after_any_error_and_keeps_delivering() -> None:
    errors: list[BaseException] = [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        RuntimeError("a bug nobody foresaw"),
    ]
    api = CutStreams(errors)
    seen: list[str] = []

    async def main() -> None:
        informer = Informer(
            api, "taskexecutions", NS, lambda _t, b: seen.append(b["metadata"]["name"])
        )
        informer.backoff_cap = 0.05
        task = asyncio.create_task(informer.run())
        await informer.synced.wait()
        for i in range(5):
            await api.create_object("taskexecutions", NS, task_execution(f"t{i}", "file:///r", "a"))
            async with asyncio.timeout(30):
                while f"t{i}" not in seen:
                    await asyncio.sleep(0.01)
        assert not task.done(), task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert errors == []  # every stream was cut once
    assert sorted(set(seen)) == [f"t{i}" for i in range(5)]


def test_a_watch_cut_mid_stream_is_a_transient_api_error() -> None:
    """The real client against a server that sends one event and drops the connection."""

    async def main() -> list[str]:
        async def watch(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            event = b'{"type": "ADDED", "object": {"metadata": {"name": "one", "resourceVersion": "5"}}}\n'
            await response.write(event)
            await asyncio.sleep(0.1)
            assert request.transport is not None
            request.transport.close()  # the API server goes away mid-stream
            return response

        names: list[str] = []
        path = "/apis/orchestrator.dev/v1alpha1/namespaces/ns/taskexecutions"
        async with stub_kube_api(path, watch) as api:
            with pytest.raises(TransientApiError):
                async for event in api.watch("taskexecutions", NS, timeout_seconds=5):
                    names.append(event.object["metadata"]["name"])
        return names

    assert asyncio.run(main()) == ["one"]

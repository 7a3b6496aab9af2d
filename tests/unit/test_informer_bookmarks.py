"""Watch bookmarks: a quiet namespace's watch resumes without listing everything again.

Found by the memory benchmark (issue 17, 10,000 parked TaskExecutions): idle, the operator's
Job informer listed every Job again after each watch timeout. Nothing changed in its
namespace, so the version it resumed from was older than the API server's compaction, the
watch met ``410 Gone``, and it relisted. With ``allowWatchBookmarks`` the API server sends a
BOOKMARK (a resourceVersion, no object) before the watch ends, and the resume starts there.

The fake API server sends no bookmarks (the API allows a server not to): ``Bookmarking`` adds
one at the end of each watch, as the real server's watch cache does near the timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from core.kube.api import ApiCall, WatchEvent
from core.kube.informer import Informer
from core.testing.fake_apiserver import FakeApiServer
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import task_execution
from tests.http_server import stub_kube_api

NS, BUSY = "quiet", "busy"


class Bookmarking(FakeKubeApi):
    async def watch(self, *args: Any, **kwargs: Any) -> AsyncIterator[WatchEvent]:
        async for event in super().watch(*args, **kwargs):
            yield event
        version = str(self.server.revision)
        yield WatchEvent("BOOKMARK", {"metadata": {"resourceVersion": version}})


@pytest.mark.parametrize("bookmarks", [True, False])
def test_a_quiet_namespace_resumes_its_watch_without_listing_again(bookmarks: bool) -> None:
    server = FakeApiServer(namespaces=(NS, BUSY), history_limit=5)
    api = (Bookmarking if bookmarks else FakeKubeApi)(server)
    calls: list[ApiCall] = []
    api.add_observer(calls.append)
    delivered: list[tuple[str, str]] = []

    async def main() -> None:
        await api.create_object("taskexecutions", NS, task_execution("mine", "file:///r", "a"))
        informer = Informer(
            api,
            "taskexecutions",
            NS,
            lambda t, b: delivered.append((t, b["metadata"].get("name", ""))),
            watch_seconds=1,
        )
        task = asyncio.create_task(informer.run())
        await informer.synced.wait()
        for round_ in range(3):  # other namespaces keep the API server busy: compaction
            for i in range(6):
                body = task_execution(f"b{round_}-{i}", "file:///r", "a")
                await api.create_object("taskexecutions", BUSY, body)
            await asyncio.sleep(1.3)  # the watch times out and resumes
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    lists = [c for c in calls if c.verb == "list"]
    if bookmarks:
        assert len(lists) == 1  # the first list only
        assert delivered == [("ADDED", "mine")]  # a bookmark is never delivered as an object
    else:  # what the operator did before: 410 Gone on each resume (an ERROR event of a
        # 200 watch, as the real server sends it), then a list
        assert len(lists) >= 3


def test_the_client_asks_for_bookmarks_and_passes_them_on() -> None:
    """The real client against a server that answers with one bookmark."""
    queries: list[dict[str, str]] = []

    async def main() -> list[tuple[str, str]]:
        async def watch(request: web.Request) -> web.StreamResponse:
            queries.append(dict(request.query))
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(
                b'{"type": "BOOKMARK", "object": {"kind": "Job", "apiVersion": "batch/v1", '
                b'"metadata": {"resourceVersion": "42"}}}\n'
            )
            await response.write_eof()
            return response

        async with stub_kube_api("/apis/batch/v1/namespaces/quiet/jobs", watch) as api:
            return [
                (e.type, e.resource_version)
                async for e in api.watch("jobs", NS, resource_version="7", timeout_seconds=5)
            ]

    assert asyncio.run(main()) == [("BOOKMARK", "42")]
    assert queries[0]["allowWatchBookmarks"] == "true"
    assert queries[0]["resourceVersion"] == "7"

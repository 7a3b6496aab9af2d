"""List, then watch from the list's version, for ever: client-go's reflector, on ``KubeApi``.

Why our own and not kopf's watches: kopf never retries an ``on.event`` handler (the event is
gone when a handler raises), sends no server-side label selector (the operator would receive
every Job and Pod of its namespaces) and does not say when its initial listing is complete,
which the deletion sweep needs. The informer only *delivers* events: what to do with them is
the control loop's (a de-duplicating work queue, see :mod:`core.kube.workqueue`), so no event
is ever lost to an exception.

* The first list delivers every object as ``ADDED`` and then sets :attr:`synced`.
* A watch ends after its timeout and is resumed from the last resourceVersion seen. Watches
  ask for bookmarks (``allowWatchBookmarks``): in a quiet namespace the last version seen
  would otherwise be older than etcd's compaction (5 minutes) when the watch ends, and every
  resume would meet ``410 Gone`` and list everything again; a bookmark moves it on.
* ``410 Gone`` (the version was compacted) or an error relists: objects that disappeared
  in between are delivered as ``DELETED``, the rest as ``MODIFIED``.
* Errors back off exponentially (capped), on the injected clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from core.errors import ExpiredError, KubeApiError
from core.kube.api import Body, KubeApi
from core.kube.workqueue import Clock, MonotonicClock

log = logging.getLogger("orchestrator.informer")

#: ``(event type, object)``: ADDED, MODIFIED or DELETED.
Handler = Callable[[str, Body], None]


def object_key(obj: Body) -> tuple[str, str]:
    meta = obj["metadata"]
    return str(meta.get("namespace") or ""), str(meta["name"])


class Informer:
    def __init__(
        self,
        api: KubeApi,
        resource: str,
        namespace: str | None,
        handler: Handler,
        *,
        label_selector: str | None = None,
        clock: Clock | None = None,
        watch_seconds: int = 300,
        backoff_cap: float = 30.0,
    ) -> None:
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self.handler = handler
        self.label_selector = label_selector
        self.clock = clock or MonotonicClock()
        self.watch_seconds = watch_seconds
        self.backoff_cap = backoff_cap
        self.synced = asyncio.Event()
        self._versions: dict[tuple[str, str], str] = {}  # what was delivered, by key
        self._version: str | None = None

    def _deliver(self, type_: str, obj: Body) -> None:
        key = object_key(obj)
        if type_ == "DELETED":
            self._versions.pop(key, None)
        else:
            self._versions[key] = str(obj["metadata"].get("resourceVersion") or "")
        try:
            self.handler(type_, obj)
        except Exception:  # a handler must not stop the stream; it only enqueues work
            log.exception("%s informer: handler failed for %s", self.resource, key)

    async def _relist(self) -> None:
        listing = await self.api.list_resource(
            self.resource, self.namespace, label_selector=self.label_selector
        )
        seen = set()
        for obj in listing.items:
            key = object_key(obj)
            seen.add(key)
            known = key in self._versions
            if not known or self._versions[key] != obj["metadata"].get("resourceVersion"):
                self._deliver("MODIFIED" if known else "ADDED", obj)
        for key in [k for k in self._versions if k not in seen]:
            namespace, name = key
            self._deliver("DELETED", {"metadata": {"namespace": namespace, "name": name}})
        self._version = listing.resource_version
        self.synced.set()

    async def run(self) -> None:
        """Keep the handler informed until cancelled."""
        failures = 0
        while True:
            try:
                if self._version is None:
                    await self._relist()
                failures = 0
                events = self.api.watch(
                    self.resource,
                    self.namespace,
                    resource_version=self._version,
                    label_selector=self.label_selector,
                    timeout_seconds=self.watch_seconds,
                )
                try:
                    async for event in events:
                        self._version = event.resource_version
                        if event.type != "BOOKMARK":
                            self._deliver(event.type, event.object)
                finally:  # close the stream at once, also when cancelled
                    aclose = getattr(events, "aclose", None)
                    if aclose is not None:
                        await aclose()
            except asyncio.CancelledError:
                raise
            except ExpiredError:
                self._version = None  # compacted: list again
            except Exception as exc:  # an informer never dies: it lists again
                # (API errors, a lost connection, a bad line; anything else is logged with its
                # traceback: a frozen cache would strand every task it holds, silently)
                failures += 1
                self._version = None
                delay = min(self.backoff_cap, 0.5 * 2 ** min(failures, 10))
                log.warning(
                    "%s informer (%s): %s; listing again in %.1fs",
                    self.resource,
                    self.namespace or "all namespaces",
                    exc,
                    delay,
                    exc_info=not isinstance(exc, (KubeApiError, OSError, ValueError)),
                )
                await self.clock.sleep(delay)

    def known(self) -> dict[tuple[str, str], Any]:
        """Keys delivered and not deleted, with their resourceVersions."""
        return dict(self._versions)

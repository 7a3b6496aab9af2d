"""Parts of the operator that share the control loop with the TaskExecution controller.

Why a seam: the Integration controller (:mod:`core.kube.integration_controller`) and the
escalation Events (:mod:`core.kube.escalation_events`) need what the TaskExecution controller
has -- informers, the de-duplicating work queue with per-key backoff, and above all the
Lease: only the leader may create gate Jobs or post Events. Rather than a second loop with a
second election, a :class:`LoopPart` plugs into :class:`core.kube.control_loop.ControlLoop`:
it sees every watch event the loop receives (plus informers for its own resources), owns
the work-queue keys whose first element is its own, and is told when this replica starts
and stops leading.
"""

from __future__ import annotations

from typing import Protocol

from core.kube.api import Body
from core.kube.watch_cache import Key


class LoopPart(Protocol):
    #: Resources it needs informers for besides TaskExecutions, Adapters and Jobs.
    extra_resources: tuple[str, ...]

    def observe(self, resource: str, type_: str, body: Body) -> list[Key]:
        """Every watch event of the loop's informers (``resource`` is the plural); returns
        the keys to (re)consider. Called on the event loop; must not block."""
        ...

    def owns(self, key: Key) -> bool:
        """Whether ``key`` is this part's (its :meth:`sync` handles it)."""
        ...

    async def sync(self, key: Key) -> float | None:
        """One step for one key; returns when to look again (None: when something changes).
        An exception requeues the key with a per-key backoff."""
        ...

    def resync_keys(self) -> list[Key]:
        """Keys to look at again on every resync (level-triggered safety net)."""
        ...

    async def lead(self) -> None:
        """This replica leads from now on (the caches are complete)."""
        ...

    async def follow(self) -> None:
        """This replica stopped leading (or is shutting down): stop all work."""
        ...


class PassivePart:
    """Defaults for a part that needs only some of the hooks."""

    extra_resources: tuple[str, ...] = ()

    def observe(self, resource: str, type_: str, body: Body) -> list[Key]:
        return []

    def owns(self, key: Key) -> bool:
        return False

    async def sync(self, key: Key) -> float | None:
        return None

    def resync_keys(self) -> list[Key]:
        return []

    async def lead(self) -> None:
        return None

    async def follow(self) -> None:
        return None

"""The circuit breakers of each namespace's Adapters, and their mirror in Adapter status.

A breaker is (namespace, Adapter name) -- see :mod:`core.identity`: TaskExecutions of one
namespace share the breaker of an Adapter there, nothing is shared across namespaces. The
breakers live in the database (shared by every replica); transitions are logged by the
recorder and copied into the Adapter's ``status`` once per change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from core.db.breaker_rows import SqlBreakerRows
from core.engine.recorder import Recorder
from core.engine.resilience.breaker_store import (
    PEEK_MAX_AGE_SECONDS,
    CircuitBreakers,
    RowBreakerStore,
)
from core.engine.resilience.circuit_breaker import BreakerSnapshot, BreakerTransition
from core.kube.api import KubeApi
from core.models import AdapterSpec
from core.resources import AdapterResourceStatus

ADAPTERS = "adapters"


class AdapterBreakers:
    def __init__(
        self,
        api: KubeApi,
        engine: Engine,
        recorder: Recorder,
        now: Callable[[], datetime],
    ) -> None:
        self.api = api
        self.engine = engine
        self.recorder = recorder
        self.now = now
        self._breakers: dict[str, CircuitBreakers] = {}
        self._policies: dict[tuple[str, str], AdapterSpec] = {}
        self._changes: dict[str, list[BreakerTransition]] = {}

    def know(self, namespace: str, adapter: AdapterSpec) -> None:
        """The current policy of an Adapter (its breaker thresholds)."""
        self._policies[(namespace, adapter.id)] = adapter

    def of(self, namespace: str) -> CircuitBreakers:
        found = self._breakers.get(namespace)
        if found is None:
            changes = self._changes.setdefault(namespace, [])

            def on_transition(transition: BreakerTransition) -> None:
                self.recorder.on_breaker_transition(transition)
                changes.append(transition)

            found = CircuitBreakers(
                RowBreakerStore(SqlBreakerRows(self.engine, namespace)),
                lambda adapter: self._policies[(namespace, adapter)].breaker,
                self.now,
                on_transition,
                # a start peeks at its chain's breakers, then acquires (which always reads)
                max_age_seconds=PEEK_MAX_AGE_SECONDS,
            )
            self._breakers[namespace] = found
        return found

    def states(self) -> dict[str, str]:
        """``namespace/adapter`` -> breaker state, of every Adapter seen (health probe)."""
        return {
            f"{ns}/{name}": self.of(ns).view(name).state.value
            for ns, name in sorted(self._policies)
        }

    def snapshots(self) -> dict[str, list[BreakerSnapshot]]:
        """Every known Adapter's breaker as of now, by namespace (reads the database)."""
        found: dict[str, list[BreakerSnapshot]] = {}
        for ns, name in sorted(self._policies):
            found.setdefault(ns, []).append(self.of(ns).view(name))
        return found

    async def mirror(self, namespace: str) -> None:
        """Copy breaker transitions into the Adapter resources' status (only on change)."""
        changes = self._changes.get(namespace)
        if not changes:
            return
        pending = list(changes)
        changes.clear()
        breakers = self.of(namespace)
        for adapter in {c.adapter_id for c in pending}:
            snap = await asyncio.to_thread(breakers.view, adapter)
            status = AdapterResourceStatus(
                breaker_state=snap.state.value,
                consecutive_failures=snap.consecutive_failures,
                opened_at=snap.opened_at,
                message=[c for c in pending if c.adapter_id == adapter][-1].reason,
            )
            await self.api.patch_status(
                ADAPTERS, namespace, adapter, status.model_dump(mode="json", by_alias=True)
            )

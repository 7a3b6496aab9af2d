"""Where breaker snapshots live, and the compare-and-set loop that updates them.

Why compare-and-set: several executor processes (and the operator) share one ``adapters``
table. Two of them recording a failure at the same moment must not both write
"failures = 2"; the second write must see the first. Every save is conditional on the version
the writer loaded (``UPDATE ... SET ..., breaker_version = v + 1 WHERE id = :id AND
breaker_version = :v``); a writer that loses reloads, recomputes and tries again. Transitions
are handed to ``on_transition`` only once their save succeeded, so each is logged once even
when several processes race to observe the same elapsed cool-down.

:class:`InMemoryBreakerStore` is the reference implementation, for tests and the embedded
backend's unit tests (as httpx ships mock transports). :class:`RowBreakerStore` puts snapshots
on any :class:`BreakerRows` (the ``adapters`` table's columns as dicts:
``core.db.breaker_rows.SqlBreakerRows``), so the database layer never imports this one.

Finishing an attempt feeds the breaker inside the attempt's own database transaction
(:meth:`CircuitBreakers.feed`), so a replayed attempt can never be counted twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from core.engine.resilience.circuit_breaker import (
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    BreakerTransition,
    BreakerUpdate,
    Outcome,
    acquire,
    outcome_of,
    record,
    refresh,
    would_admit,
)
from core.engine.resilience.classification import Classification
from core.errors import RetryableError
from core.models import BreakerPolicy

T = TypeVar("T")

#: How old a breaker snapshot may be when a peek (not an admission) is answered from it.
PEEK_MAX_AGE_SECONDS = 1.0


class BreakerStore(Protocol):
    """Persistence of breaker snapshots with optimistic concurrency."""

    def load(self, adapter_id: str) -> BreakerSnapshot:
        """The stored snapshot, or a fresh CLOSED one with ``version=0`` if none is stored."""
        ...

    def compare_and_set(self, snapshot: BreakerSnapshot) -> BreakerSnapshot | None:
        """Store ``snapshot`` iff the stored version still equals ``snapshot.version``.

        Returns the stored snapshot (its version incremented) or None when another writer
        got there first.
        """
        ...


class InMemoryBreakerStore:
    """A thread-safe :class:`BreakerStore` in a dict."""

    def __init__(self, snapshots: Iterable[BreakerSnapshot] = ()) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, BreakerSnapshot] = {s.adapter_id: s for s in snapshots}

    def load(self, adapter_id: str) -> BreakerSnapshot:
        with self._lock:
            return self._rows.get(adapter_id) or BreakerSnapshot(adapter_id)

    def compare_and_set(self, snapshot: BreakerSnapshot) -> BreakerSnapshot | None:
        with self._lock:
            current = self._rows.get(snapshot.adapter_id)
            current_version = current.version if current is not None else 0
            if current_version != snapshot.version:
                return None
            stored = replace(snapshot, version=snapshot.version + 1)
            self._rows[snapshot.adapter_id] = stored
            return stored

    def all(self) -> tuple[BreakerSnapshot, ...]:
        with self._lock:
            return tuple(self._rows[k] for k in sorted(self._rows))


class BreakerRows(Protocol):
    """The breaker columns of one scope's adapters (``breaker_*``), with compare-and-set."""

    def load(self, adapter_id: str) -> dict[str, Any] | None: ...

    def compare_and_set(self, adapter_id: str, version: int, columns: dict[str, Any]) -> bool: ...


class RowBreakerStore:
    """A :class:`BreakerStore` on :class:`BreakerRows` (the ``adapters`` table)."""

    def __init__(self, rows: BreakerRows) -> None:
        self.rows = rows

    def load(self, adapter_id: str) -> BreakerSnapshot:
        columns = self.rows.load(adapter_id)
        if columns is None:
            return BreakerSnapshot(adapter_id)
        return BreakerSnapshot.from_columns(adapter_id, columns)

    def compare_and_set(self, snapshot: BreakerSnapshot) -> BreakerSnapshot | None:
        if not self.rows.compare_and_set(
            snapshot.adapter_id, snapshot.version, snapshot.to_columns()
        ):
            return None
        return replace(snapshot, version=snapshot.version + 1)


class BreakerFeed:
    """One finished attempt's effect on its adapter's breaker, applied by the database layer
    inside the transaction that records the attempt (see :meth:`CircuitBreakers.feed`).

    Call it with the row's breaker columns: it returns the new columns, or None when nothing
    changes. Transitions are kept until :meth:`announce`, which the caller invokes after the
    transaction committed, so a rolled-back or replayed attempt announces nothing.
    """

    def __init__(
        self,
        breakers: CircuitBreakers,
        adapter_id: str,
        outcome: Outcome,
        *,
        trial: bool,
    ) -> None:
        self.breakers = breakers
        self.adapter_id = adapter_id
        self.outcome = outcome
        self.trial = trial
        self.transitions: tuple[BreakerTransition, ...] = ()
        #: The breaker as the recording transaction leaves it (None: not applied yet).
        self.stored: BreakerSnapshot | None = None

    def __call__(self, columns: dict[str, Any] | None) -> dict[str, Any] | None:
        loaded = (
            BreakerSnapshot.from_columns(self.adapter_id, columns)
            if columns is not None
            else BreakerSnapshot(self.adapter_id)
        )
        self.breakers.forget(self.adapter_id)  # until the transaction is known to commit
        policy = self.breakers.policy_for(self.adapter_id)
        update = record(
            loaded, policy, self.breakers.clock(), self.outcome, trial=self.trial
        )
        self.transitions = tuple(update.transitions)
        if not update.changed:
            self.stored = loaded
            return None
        # the database layer stores these columns with the version incremented
        self.stored = replace(update.snapshot, version=loaded.version + 1)
        return replace(update.snapshot, version=loaded.version).to_columns()

    def announce(self) -> None:
        """After the recording transaction committed: hand over the transitions."""
        if self.stored is not None:
            self.breakers.remember(self.stored)
        if self.breakers.on_transition is not None:
            for transition in self.transitions:
                self.breakers.on_transition(transition)


PolicySource = Callable[[str], BreakerPolicy | BreakerConfig]
WallClock = Callable[[], datetime]


class CircuitBreakers:
    """The breakers of all adapters, on top of a :class:`BreakerStore`.

    ``policy_for(adapter_id)`` gives each adapter's policy; ``clock`` is an aware wall clock
    (``lambda: datetime.now(UTC)`` in production); ``on_transition`` receives every persisted
    transition (write it to ``logs/resilience.jsonl``, set the gauge).

    ``max_age_seconds``: :meth:`view` and :meth:`admits` (peeks, taken several times per
    attempt) may answer from the last snapshot this object loaded or wrote if it is younger
    than this (``monotonic`` seconds); 0, the default, reads the store every time. Another
    process's change is then seen up to that much later; what this process writes is seen
    at once, and :meth:`acquire` and :meth:`record` always read the store (their
    compare-and-set would catch a stale read anyway).
    """

    def __init__(
        self,
        store: BreakerStore,
        policy_for: PolicySource,
        clock: WallClock,
        on_transition: Callable[[BreakerTransition], None] | None = None,
        *,
        max_conflicts: int = 50,
        max_age_seconds: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy_for = policy_for
        self.clock = clock
        self.on_transition = on_transition
        self.max_conflicts = max_conflicts
        self.max_age_seconds = max_age_seconds
        self.monotonic = monotonic
        self._seen: dict[str, tuple[float, BreakerSnapshot]] = {}

    def remember(self, snapshot: BreakerSnapshot) -> None:
        """``snapshot`` is what the store holds now (just loaded or written)."""
        if self.max_age_seconds > 0:
            self._seen[snapshot.adapter_id] = (self.monotonic(), snapshot)

    def forget(self, adapter_id: str) -> None:
        self._seen.pop(adapter_id, None)

    def _load(self, adapter_id: str, *, peek: bool = False) -> BreakerSnapshot:
        if peek:
            seen = self._seen.get(adapter_id)
            if seen is not None and self.monotonic() - seen[0] < self.max_age_seconds:
                return seen[1]
        loaded = self.store.load(adapter_id)
        self.remember(loaded)
        return loaded

    def _mutate(
        self,
        adapter_id: str,
        step: Callable[[BreakerSnapshot, BreakerPolicy | BreakerConfig, datetime], T],
        update_of: Callable[[T], BreakerUpdate],
    ) -> tuple[T, BreakerSnapshot]:
        policy = self.policy_for(adapter_id)
        for _ in range(self.max_conflicts):
            loaded = self._load(adapter_id)
            result = step(loaded, policy, self.clock())
            update = update_of(result)
            if not update.changed:
                return result, loaded
            saved = self.store.compare_and_set(replace(update.snapshot, version=loaded.version))
            if saved is None:
                self.forget(adapter_id)
                continue  # another process won; recompute from its state
            self.remember(saved)
            if self.on_transition is not None:
                for transition in update.transitions:
                    self.on_transition(transition)
            return result, saved
        raise RetryableError(
            f"circuit breaker of adapter {adapter_id}: {self.max_conflicts} conflicting "
            "concurrent updates in a row; try again"
        )

    def view(self, adapter_id: str) -> BreakerSnapshot:
        """The snapshot as of now (cool-down applied), without saving anything."""
        policy = self.policy_for(adapter_id)
        return refresh(self._load(adapter_id, peek=True), policy, self.clock()).snapshot

    def admits(self, adapter_id: str) -> bool:
        """A peek for :func:`~core.engine.resilience.retry.decide_retry`'s ``admits``."""
        snapshot = self._load(adapter_id, peek=True)
        return would_admit(snapshot, self.policy_for(adapter_id), self.clock())

    def admits_map(self, adapter_ids: Iterable[str]) -> dict[str, bool]:
        return {a: self.admits(a) for a in adapter_ids}

    def acquire(self, adapter_id: str) -> Admission:
        """Admit (or refuse) an attempt; persists a trial slot and the lazy cool-down end."""
        admission, _ = self._mutate(adapter_id, acquire, lambda a: a.update)
        return admission

    def feed(
        self, adapter_id: str, result: Classification | Outcome, *, trial: bool
    ) -> BreakerFeed:
        """The breaker update of a finished attempt, for the recording transaction."""
        outcome = result if isinstance(result, Outcome) else outcome_of(result)
        return BreakerFeed(self, adapter_id, outcome, trial=trial)

    def record(
        self, adapter_id: str, result: Classification | Outcome, *, trial: bool
    ) -> BreakerSnapshot:
        """Feed a finished attempt's result; returns the breaker's (saved) snapshot."""
        outcome = result if isinstance(result, Outcome) else outcome_of(result)

        def step(
            snap: BreakerSnapshot, policy: BreakerPolicy | BreakerConfig, now: datetime
        ) -> BreakerUpdate:
            return record(snap, policy, now, outcome, trial=trial)

        update, saved = self._mutate(adapter_id, step, lambda u: u)
        return saved if update.changed else update.snapshot

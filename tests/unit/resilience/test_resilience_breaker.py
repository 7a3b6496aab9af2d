"""Circuit breaker: pure transitions, persistence mapping, the CAS store and properties."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.engine.resilience.breaker_store import CircuitBreakers, InMemoryBreakerStore
from core.engine.resilience.circuit_breaker import (
    DEFAULT_TRIAL_LEASE_SECONDS,
    MAX_WINDOW_SIZE,
    STATE_GAUGE,
    BreakerConfig,
    BreakerSnapshot,
    BreakerState,
    BreakerTransition,
    Outcome,
    acquire,
    outcome_of,
    record,
    refresh,
    retry_after,
    status,
    would_admit,
)
from core.engine.resilience.classification import Classification
from core.errors import RetryableError
from core.models import BreakerPolicy, FailureClass

T0 = datetime(2025, 1, 1, tzinfo=UTC)
CFG = BreakerConfig(failure_threshold=3, cooldown_seconds=60, half_open_max_trials=2)
CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fail(snap: BreakerSnapshot, t: float = 0, *, trial: bool = False) -> BreakerSnapshot:
    return record(snap, CFG, at(t), Outcome.FAILURE, trial=trial).snapshot


def opened(t: float = 0) -> BreakerSnapshot:
    snap = BreakerSnapshot("aider")
    for _ in range(3):
        snap = fail(snap, t)
    assert snap.state is OPEN
    return snap


def half_open(t: float = 60) -> BreakerSnapshot:
    snap = refresh(opened(0), CFG, at(t)).snapshot
    assert snap.state is HALF
    return snap


# --------------------------------------------------------------------------- CLOSED


def test_new_breaker_is_closed_and_admits() -> None:
    admission = acquire(BreakerSnapshot("aider"), CFG, T0)
    assert admission.admitted and not admission.trial
    assert not admission.update.changed  # nothing to save for a closed breaker
    assert would_admit(BreakerSnapshot("aider"), CFG, T0)


def test_opens_after_threshold_consecutive_failures() -> None:
    snap = BreakerSnapshot("aider")
    snap = fail(snap, 1)
    snap = fail(snap, 2)
    assert (snap.state, snap.consecutive_failures) == (CLOSED, 2)
    update = record(snap, CFG, at(3), Outcome.FAILURE, trial=False)
    assert update.snapshot.state is OPEN
    assert update.snapshot.opened_at == at(3) == update.snapshot.tripped_at
    (transition,) = update.transitions
    assert (transition.from_state, transition.to_state) == (CLOSED, OPEN)
    assert "3 consecutive failure(s)" in transition.reason
    assert transition.gauge == 2 and transition.at == at(3)


def test_success_resets_the_count() -> None:
    snap = fail(fail(BreakerSnapshot("aider")))
    snap = record(snap, CFG, T0, Outcome.SUCCESS, trial=False).snapshot
    assert snap.consecutive_failures == 0
    snap = fail(fail(snap))
    assert snap.state is CLOSED


def test_neutral_outcomes_do_not_feed_the_breaker() -> None:
    snap = fail(fail(BreakerSnapshot("aider")))
    update = record(snap, CFG, T0, Outcome.NEUTRAL, trial=False)
    assert update.snapshot == snap and not update.changed


def test_success_on_healthy_breaker_needs_no_write() -> None:
    update = record(BreakerSnapshot("aider"), CFG, T0, Outcome.SUCCESS, trial=False)
    assert not update.changed


@pytest.mark.parametrize(
    ("classification", "expected"),
    [
        (Classification.success(), Outcome.SUCCESS),
        (Classification.failure(FailureClass.ADAPTER_ERROR, "x"), Outcome.FAILURE),
        (Classification.failure(FailureClass.ADAPTER_TIMEOUT, "x"), Outcome.FAILURE),
        (Classification.failure(FailureClass.INFRASTRUCTURE, "x"), Outcome.NEUTRAL),
        (Classification.failure(FailureClass.GATE_FAILED, "x"), Outcome.NEUTRAL),
        (Classification.failure(FailureClass.EMPTY_DIFF, "x"), Outcome.NEUTRAL),
        (Classification.failure(FailureClass.CANCELLED, "x"), Outcome.NEUTRAL),
    ],
)
def test_outcome_of_classification(classification: Classification, expected: Outcome) -> None:
    assert outcome_of(classification) is expected


def test_failure_rate_window_trips() -> None:
    cfg = BreakerConfig(failure_threshold=100, window_size=4, failure_rate_threshold=0.5)
    snap = BreakerSnapshot("aider")
    for i, outcome in enumerate([Outcome.FAILURE, Outcome.SUCCESS, Outcome.SUCCESS]):
        snap = record(snap, cfg, at(i), outcome, trial=False).snapshot
    assert snap.window == "FSS" and snap.state is CLOSED
    update = record(snap, cfg, at(9), Outcome.FAILURE, trial=False)
    assert update.snapshot.state is OPEN
    assert "failure rate 2/4" in update.transitions[0].reason
    assert update.snapshot.window == ""


def test_window_keeps_only_the_last_outcomes() -> None:
    cfg = BreakerConfig(failure_threshold=100, window_size=3, failure_rate_threshold=1.0)
    snap = BreakerSnapshot("aider")
    for outcome in [Outcome.FAILURE, Outcome.FAILURE, Outcome.SUCCESS, Outcome.SUCCESS]:
        snap = record(snap, cfg, T0, outcome, trial=False).snapshot
    assert snap.window == "FSS"


# --------------------------------------------------------------------------- OPEN


def test_open_refuses_with_remaining_cooldown() -> None:
    snap = opened(0)
    admission = acquire(snap, CFG, at(45))
    assert not admission.admitted
    assert admission.retry_after_seconds == 15
    assert "open" in admission.reason
    assert retry_after(snap, CFG, at(45)) == 15
    assert not would_admit(snap, CFG, at(59.9))


def test_outcomes_while_open_are_ignored() -> None:
    snap = opened(0)
    for outcome in Outcome:
        update = record(snap, CFG, at(10), outcome, trial=False)
        assert update.snapshot == snap and not update.changed


def test_open_becomes_half_open_lazily_after_cooldown() -> None:
    snap = opened(0)
    assert refresh(snap, CFG, at(59)).snapshot.state is OPEN
    update = refresh(snap, CFG, at(60))
    assert update.snapshot.state is HALF and update.changed
    (transition,) = update.transitions
    assert (transition.from_state, transition.to_state) == (OPEN, HALF)
    assert "cool-down" in transition.reason
    assert would_admit(snap, CFG, at(61))


# --------------------------------------------------------------------------- HALF_OPEN


def test_half_open_admits_bounded_trials() -> None:
    snap = opened(0)
    first = acquire(snap, CFG, at(61))
    assert first.admitted and first.trial
    assert [t.to_state for t in first.update.transitions] == [HALF]
    second = acquire(first.update.snapshot, CFG, at(62))
    assert second.admitted and second.trial
    assert second.update.snapshot.half_open_in_flight == 2
    third = acquire(second.update.snapshot, CFG, at(63))
    assert not third.admitted
    assert third.retry_after_seconds == 3599  # a running trial decides, or the lease ends
    no_lease = replace(CFG, trial_lease_seconds=None)
    assert acquire(second.update.snapshot, no_lease, at(63)).retry_after_seconds is None
    assert "2 trial(s) running" in third.reason


def test_trial_success_closes() -> None:
    snap = acquire(half_open(), CFG, at(61)).update.snapshot
    update = record(snap, CFG, at(70), Outcome.SUCCESS, trial=True)
    assert update.snapshot == replace(BreakerSnapshot("aider"), updated_at=at(70))
    assert update.transitions[-1].to_state is CLOSED
    assert update.transitions[-1].gauge == 0


def test_trial_failure_reopens_and_keeps_trip_time() -> None:
    snap = acquire(half_open(), CFG, at(61)).update.snapshot
    update = record(snap, CFG, at(70), Outcome.FAILURE, trial=True)
    new = update.snapshot
    assert new.state is OPEN and new.opened_at == at(70) and new.tripped_at == T0
    assert new.half_open_in_flight == 0 and new.consecutive_failures == 4
    assert update.transitions[-1].reason == "trial attempt failed"
    assert not would_admit(new, CFG, at(129))
    assert would_admit(new, CFG, at(130))


def test_neutral_trial_gives_slot_back() -> None:
    snap = acquire(half_open(), CFG, at(61)).update.snapshot
    update = record(snap, CFG, at(62), Outcome.NEUTRAL, trial=True)
    assert update.snapshot.state is HALF
    assert update.snapshot.half_open_in_flight == 0
    assert update.transitions == ()


def test_stale_non_trial_outcome_is_ignored_in_half_open() -> None:
    snap = acquire(half_open(), CFG, at(61)).update.snapshot
    for outcome in Outcome:
        assert record(snap, CFG, at(62), outcome, trial=False).snapshot == snap


def test_late_trial_result_after_close_counts_normally() -> None:
    snap = acquire(half_open(), CFG, at(61)).update.snapshot
    snap = acquire(snap, CFG, at(61)).update.snapshot
    closed = record(snap, CFG, at(62), Outcome.SUCCESS, trial=True).snapshot
    after = record(closed, CFG, at(63), Outcome.FAILURE, trial=True).snapshot
    assert (after.state, after.consecutive_failures) == (CLOSED, 1)


def test_stale_trial_slots_are_reclaimed_after_lease() -> None:
    cfg = replace(CFG, half_open_max_trials=1, trial_lease_seconds=600)
    snap = acquire(half_open(), cfg, at(61)).update.snapshot
    assert not acquire(snap, cfg, at(600)).admitted
    assert retry_after(snap, cfg, at(600)) == pytest.approx(61)
    admission = acquire(snap, cfg, at(661))
    assert admission.admitted and admission.trial
    assert any("reclaimed 1 trial slot" in t.reason for t in admission.update.transitions)


def test_no_lease_means_slots_are_never_reclaimed() -> None:
    cfg = replace(CFG, half_open_max_trials=1, trial_lease_seconds=None)
    snap = acquire(half_open(), cfg, at(61)).update.snapshot
    assert not acquire(snap, cfg, at(10**7)).admitted


# --------------------------------------------------------------------------- records


def test_columns_round_trip() -> None:
    snap = replace(acquire(half_open(), CFG, at(61)).update.snapshot, version=7)
    columns = snap.to_columns()
    assert columns["breaker_state"] == "HALF_OPEN"
    assert columns["breaker_half_open_in_flight"] == 1
    assert columns["breaker_version"] == 7
    assert BreakerSnapshot.from_columns("aider", columns) == snap


def test_from_columns_without_proposed_columns() -> None:
    row = {
        "breaker_state": "OPEN",
        "breaker_failures": 3,
        "breaker_opened_at": T0,
        "breaker_half_open_in_flight": 0,
        "breaker_version": 2,
    }
    snap = BreakerSnapshot.from_columns("aider", row)
    assert snap.tripped_at == T0 and snap.window == "" and snap.updated_at is None
    assert snap.violations(CFG) == []
    assert BreakerSnapshot.from_columns("x", {}) == BreakerSnapshot("x")


def test_violations_detect_illegal_snapshots() -> None:
    assert BreakerSnapshot("a", state=OPEN).violations(CFG)
    assert BreakerSnapshot("a", half_open_in_flight=1).violations(CFG)
    assert BreakerSnapshot(
        "a", state=HALF, opened_at=T0, tripped_at=T0, half_open_in_flight=3
    ).violations(CFG)
    assert BreakerSnapshot("a", window="X").violations(CFG)


def test_default_lease_unwedges_a_half_open_breaker_whose_trial_died() -> None:
    policy = BreakerPolicy(failure_threshold=1, cooldown_seconds=60, half_open_max_trials=1)
    snap = record(BreakerSnapshot("aider"), policy, T0, Outcome.FAILURE, trial=False).snapshot
    assert snap.state is OPEN
    snap = acquire(snap, policy, at(60)).update.snapshot  # the trial's executor then dies
    assert snap.half_open_in_flight == 1
    assert not acquire(snap, policy, at(60 + DEFAULT_TRIAL_LEASE_SECONDS - 1)).admitted
    assert acquire(snap, policy, at(60 + DEFAULT_TRIAL_LEASE_SECONDS)).admitted


def test_transition_record_splats_next_to_an_event_argument() -> None:
    t = BreakerTransition("aider", CLOSED, OPEN, "3 failures", T0, 3)
    lines: list[dict[str, object]] = []

    def log(event: str, **fields: object) -> None:  # the executor's _resilience_event shape
        lines.append({"event": event, **fields})

    log(t.event, **t.to_record())
    assert lines == [
        {
            "event": "circuit_breaker_transition",
            "adapter_id": "aider",
            "from": "CLOSED",
            "to": "OPEN",
            "reason": "3 failures",
            "at": T0.isoformat(),
            "consecutive_failures": 3,
            "circuit_breaker_state": 2,
        }
    ]


def test_transition_record_and_gauge() -> None:
    t = BreakerTransition("aider", OPEN, HALF, "cool-down", T0, 3)
    rec = t.to_record()
    assert rec["from"] == "OPEN" and rec["to"] == "HALF_OPEN"
    assert rec["circuit_breaker_state"] == 1 == STATE_GAUGE[HALF]
    assert rec["at"] == T0.isoformat()
    assert STATE_GAUGE == {CLOSED: 0, HALF: 1, OPEN: 2}


def test_status_record() -> None:
    rec = status(opened(0), CFG, at(30))
    assert rec["state"] == "OPEN" and rec["admits_work"] is False
    assert rec["retry_after_seconds"] == 30
    assert status(opened(0), CFG, at(90))["state"] == "HALF_OPEN"


def test_config_from_policy_and_validation() -> None:
    policy = BreakerPolicy(
        failure_threshold=5,
        cooldown_seconds=10,
        half_open_max_trials=2,
        window_size=4,
        failure_rate_threshold=0.5,
        trial_lease_seconds=99,
    )
    cfg = BreakerConfig.from_policy(policy)
    assert (cfg.failure_threshold, cfg.cooldown_seconds, cfg.half_open_max_trials) == (5, 10, 2)
    assert (cfg.window_size, cfg.failure_rate_threshold, cfg.trial_lease_seconds) == (4, 0.5, 99)
    default = BreakerConfig.from_policy(BreakerPolicy())
    assert default.trial_lease_seconds == DEFAULT_TRIAL_LEASE_SECONDS and default.window_size == 0
    with pytest.raises(ValueError):
        BreakerConfig(window_size=MAX_WINDOW_SIZE + 1)
    with pytest.raises(ValueError):
        BreakerConfig(trial_lease_seconds=0)
    # functions accept the pydantic policy directly
    assert acquire(BreakerSnapshot("a"), policy, T0).admitted
    with pytest.raises(ValueError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerConfig(failure_rate_threshold=0)


# --------------------------------------------------------------------------- store + service


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def service(
    store: InMemoryBreakerStore | None = None, clock: Clock | None = None
) -> tuple[CircuitBreakers, list[BreakerTransition], Clock]:
    seen: list[BreakerTransition] = []
    clock = clock or Clock()
    breakers = CircuitBreakers(store or InMemoryBreakerStore(), lambda _: CFG, clock, seen.append)
    return breakers, seen, clock


def test_store_compare_and_set() -> None:
    store = InMemoryBreakerStore()
    fresh = store.load("a")
    assert fresh == BreakerSnapshot("a")
    saved = store.compare_and_set(replace(fresh, consecutive_failures=1))
    assert saved is not None and saved.version == 1
    assert store.compare_and_set(replace(fresh, consecutive_failures=9)) is None  # stale
    assert store.load("a").consecutive_failures == 1
    assert store.all() == (saved,)


def test_service_full_cycle_logs_each_transition_once() -> None:
    breakers, seen, clock = service()
    err = Classification.failure(FailureClass.ADAPTER_ERROR, "boom")
    for _ in range(3):
        assert breakers.acquire("aider").admitted
        breakers.record("aider", err, trial=False)
    assert breakers.view("aider").state is OPEN
    assert not breakers.admits("aider")
    assert breakers.admits_map(["aider", "claude"]) == {"aider": False, "claude": True}
    clock.advance(60)
    assert breakers.view("aider").state is HALF  # a view saves nothing
    assert breakers.store.load("aider").state is OPEN
    trial = breakers.acquire("aider")
    assert trial.admitted and trial.trial
    snap = breakers.record("aider", Classification.success(), trial=True)
    assert snap.state is CLOSED
    assert [(t.from_state, t.to_state) for t in seen] == [
        (CLOSED, OPEN),
        (OPEN, HALF),
        (HALF, CLOSED),
    ]


def test_two_services_share_state_through_the_store() -> None:
    store = InMemoryBreakerStore()
    one, _, clock = service(store)
    two, _, _ = service(store, clock)
    err = Classification.failure(FailureClass.ADAPTER_TIMEOUT, "slow")
    one.record("aider", err, trial=False)
    two.record("aider", err, trial=False)
    one.record("aider", err, trial=False)
    assert not two.admits("aider")


@dataclass
class RacingStore:
    """Lets another writer sneak in a failure before our first compare-and-set."""

    inner: InMemoryBreakerStore
    races_left: int = 1
    cfg: BreakerConfig = CFG

    def load(self, adapter_id: str) -> BreakerSnapshot:
        return self.inner.load(adapter_id)

    def compare_and_set(self, snapshot: BreakerSnapshot) -> BreakerSnapshot | None:
        if self.races_left:
            self.races_left -= 1
            theirs = self.inner.load(snapshot.adapter_id)
            other = record(theirs, self.cfg, T0, Outcome.FAILURE, trial=False).snapshot
            assert self.inner.compare_and_set(other) is not None
        return self.inner.compare_and_set(snapshot)


def test_concurrent_update_is_not_lost() -> None:
    racing = RacingStore(InMemoryBreakerStore())
    breakers = CircuitBreakers(racing, lambda _: CFG, Clock())
    breakers.record("aider", Outcome.FAILURE, trial=False)
    snap = racing.inner.load("aider")
    assert snap.consecutive_failures == 2  # theirs + ours
    assert snap.version == 2


def test_endless_conflicts_raise_retryable() -> None:
    patient = BreakerConfig(failure_threshold=10**6)
    racing = RacingStore(InMemoryBreakerStore(), races_left=10**6, cfg=patient)
    breakers = CircuitBreakers(racing, lambda _: patient, Clock(), max_conflicts=5)
    with pytest.raises(RetryableError, match="5 conflicting"):
        breakers.record("aider", Outcome.FAILURE, trial=False)


def test_threads_recording_concurrently_lose_nothing() -> None:
    store = InMemoryBreakerStore()
    cfg = BreakerConfig(failure_threshold=10_000)
    breakers = CircuitBreakers(store, lambda _: cfg, Clock())
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(50):
            breakers.record("aider", Outcome.FAILURE, trial=False)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load("aider").consecutive_failures == 400


def test_half_open_trials_are_bounded_across_services() -> None:
    store = InMemoryBreakerStore([replace(opened(0), version=1)])
    clock = Clock()
    clock.advance(60)
    services = [service(store, clock)[0] for _ in range(4)]
    admitted = [s.acquire("aider") for s in services]
    assert sum(a.admitted for a in admitted) == CFG.half_open_max_trials
    assert all(a.trial for a in admitted if a.admitted)


# --------------------------------------------------------------------------- properties

LEGAL = {(CLOSED, OPEN), (OPEN, HALF), (HALF, CLOSED), (HALF, OPEN), (HALF, HALF)}

step = st.one_of(
    st.tuples(st.just("acquire"), st.just(Outcome.SUCCESS)),
    st.tuples(st.just("finish"), st.sampled_from(list(Outcome))),
    st.tuples(st.just("stale"), st.sampled_from(list(Outcome))),
    st.tuples(st.just("advance"), st.floats(0, 200)),
)


@settings(max_examples=300)
@given(
    steps=st.lists(step, max_size=80),
    threshold=st.integers(1, 5),
    cooldown=st.floats(0, 120),
    trials=st.integers(1, 3),
    window=st.integers(0, 6),
    rate=st.floats(0.1, 1.0),
    lease=st.none() | st.floats(1, 300),
)
def test_property_no_sequence_reaches_an_illegal_state(
    steps: list[tuple[str, object]],
    threshold: int,
    cooldown: float,
    trials: int,
    window: int,
    rate: float,
    lease: float | None,
) -> None:
    cfg = BreakerConfig(threshold, cooldown, trials, window, rate, lease)
    snap = BreakerSnapshot("aider")
    now = T0
    held = 0  # trial slots our model believes are taken
    for kind, arg in steps:
        before = snap
        if kind == "advance":
            assert isinstance(arg, float)
            now += timedelta(seconds=arg)
            update = refresh(snap, cfg, now)
        elif kind == "acquire":
            admission = acquire(snap, cfg, now)
            update = admission.update
            if admission.trial:
                held += 1
            assert admission.admitted == would_admit(before, cfg, now)  # peek agrees
            if not admission.admitted:
                assert update.snapshot.state is not CLOSED
        else:
            assert isinstance(arg, Outcome)
            trial = kind == "finish" and held > 0
            if trial:
                held -= 1
            update = record(snap, cfg, now, arg, trial=trial)
        snap = update.snapshot
        for t in update.transitions:
            assert (t.from_state, t.to_state) in LEGAL
            assert t.at == now
        if snap != before:
            assert update.changed
        assert snap.violations(cfg) == [], (kind, arg, snap)
        if snap.state is not HALF:
            held = 0
        assert snap.half_open_in_flight <= trials
        if snap.state is OPEN:
            assert snap.opened_at is not None and snap.opened_at <= now
            assert not acquire(snap, cfg, now).admitted or (
                (now - snap.opened_at).total_seconds() >= cooldown
            )


@dataclass
class CountingStore:
    """Counts the loads that reach the store."""

    inner: InMemoryBreakerStore
    loads: int = 0

    def load(self, adapter_id: str) -> BreakerSnapshot:
        self.loads += 1
        return self.inner.load(adapter_id)

    def compare_and_set(self, snapshot: BreakerSnapshot) -> BreakerSnapshot | None:
        return self.inner.compare_and_set(snapshot)


def test_peeks_are_answered_from_a_young_snapshot_admissions_never() -> None:
    store = CountingStore(InMemoryBreakerStore())
    ticks = [0.0]
    clock = Clock()
    breakers = CircuitBreakers(
        store, lambda _: CFG, clock, max_age_seconds=1.0, monotonic=lambda: ticks[0]
    )
    assert breakers.view("aider").state is CLOSED and store.loads == 1
    assert breakers.admits("aider") and breakers.view("aider").state is CLOSED
    assert store.loads == 1  # both peeks from the snapshot just loaded
    assert breakers.acquire("aider").admitted and store.loads == 2  # always read

    # another process opens the breaker: a peek sees it once the snapshot is a second old
    other = CircuitBreakers(store.inner, lambda _: CFG, clock)
    for _ in range(3):
        other.record("aider", Outcome.FAILURE, trial=False)
    assert breakers.admits("aider")  # (at most a second late)
    ticks[0] = 1.0
    assert not breakers.admits("aider") and store.loads == 3
    # the cool-down is judged by the wall clock at peek time, not when the snapshot was read
    clock.advance(60)
    assert breakers.view("aider").state is HALF and store.loads == 3


def test_own_writes_are_seen_at_once() -> None:
    store = CountingStore(InMemoryBreakerStore())
    breakers = CircuitBreakers(
        store, lambda _: CFG, Clock(), max_age_seconds=60.0, monotonic=lambda: 0.0
    )
    assert breakers.admits("aider")
    err = Classification.failure(FailureClass.ADAPTER_ERROR, "boom")
    for _ in range(3):
        breakers.record("aider", err, trial=False)  # compare-and-set: remembered when saved
    loads = store.loads
    assert not breakers.admits("aider") and store.loads == loads

    # a finished attempt's feed (applied by the recording transaction): seen once announced
    fresh = CircuitBreakers(
        store, lambda _: CFG, Clock(), max_age_seconds=60.0, monotonic=lambda: 0.0
    )
    assert fresh.view("claude").consecutive_failures == 0
    feed = fresh.feed("claude", Outcome.FAILURE, trial=False)
    columns = feed(store.inner.load("claude").to_columns())
    assert columns is not None
    # what the database layer does with them: store them at the next version
    stored = BreakerSnapshot.from_columns("claude", {**columns, "breaker_version": 1})
    assert feed.stored == stored
    loads = store.loads
    feed.announce()
    assert fresh.view("claude").consecutive_failures == 1 and store.loads == loads


def test_without_max_age_every_peek_reads() -> None:
    store = CountingStore(InMemoryBreakerStore())
    breakers = CircuitBreakers(store, lambda _: CFG, Clock())
    breakers.view("aider")
    breakers.admits("aider")
    breakers.admits("aider")
    assert store.loads == 3

"""Resilience for the execution engine: failure classes, retries, breakers, safe mode.

Everything here is pure logic over injected clocks, randomness and stores, shared by the
embedded and the Kubernetes backend; the drivers do the I/O (see each module's docstring).
"""

from __future__ import annotations

from core.engine.resilience.breaker_store import (
    BreakerStore,
    CircuitBreakers,
    InMemoryBreakerStore,
)
from core.engine.resilience.budget import TaskBudget
from core.engine.resilience.circuit_breaker import (
    STATE_GAUGE,
    Admission,
    BreakerConfig,
    BreakerSnapshot,
    BreakerState,
    BreakerTransition,
    BreakerUpdate,
    Outcome,
    acquire,
    outcome_of,
    record,
    refresh,
    retry_after,
    would_admit,
)
from core.engine.resilience.classification import (
    COUNTED_CLASSES,
    Classification,
    ErrorDetector,
    FailureEvidence,
    NamedDetector,
    classify_evidence,
    refine,
)
from core.engine.resilience.detectors import (
    ENTRY_POINT_GROUP,
    classify,
    default_detectors,
    load_detectors,
)
from core.engine.resilience.health import HealthResult, probe_due, probe_result
from core.engine.resilience.retry import (
    AdapterChain,
    AdapterSelection,
    AttemptOutcome,
    BackoffSchedule,
    RetryDecision,
    decide_retry,
    first_adapter,
    gate_feedback,
    select_adapter,
)
from core.engine.resilience.safe_mode import (
    AdapterCondition,
    SafeMode,
    SafeModeChange,
    SafeModeConfig,
    evaluate_safe_mode,
    safe_mode_change,
)

__all__ = [
    "COUNTED_CLASSES",
    "ENTRY_POINT_GROUP",
    "STATE_GAUGE",
    "AdapterChain",
    "AdapterCondition",
    "AdapterSelection",
    "Admission",
    "AttemptOutcome",
    "BackoffSchedule",
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerStore",
    "BreakerTransition",
    "BreakerUpdate",
    "CircuitBreakers",
    "Classification",
    "ErrorDetector",
    "FailureEvidence",
    "HealthResult",
    "InMemoryBreakerStore",
    "NamedDetector",
    "Outcome",
    "RetryDecision",
    "SafeMode",
    "SafeModeChange",
    "SafeModeConfig",
    "TaskBudget",
    "acquire",
    "classify",
    "classify_evidence",
    "decide_retry",
    "default_detectors",
    "evaluate_safe_mode",
    "first_adapter",
    "gate_feedback",
    "load_detectors",
    "outcome_of",
    "probe_due",
    "probe_result",
    "record",
    "refine",
    "refresh",
    "retry_after",
    "safe_mode_change",
    "select_adapter",
    "would_admit",
]

"""The operator's evidence mapping (core/kube/attempts.py) carries what an api adapter's runner
reports -- the server's Retry-After and the token usage -- into the one lifecycle, also across
the gate Job (the adapter's evidence waits in the TaskExecution status meanwhile)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from core.engine.lifecycle import TaskPlan, conclude
from core.kube.attempts import adapter_evidence, attempt_started, gate_evidence, gate_started
from core.models import (
    AdapterKind,
    AdapterSpec,
    ApiSpec,
    DiffSummary,
    FailureClass,
    GateResult,
    RetryPolicy,
    TaskSpec,
    TaskState,
    TokenUsage,
)
from core.resources import TaskExecutionStatus
from core.runner.protocol import RunnerResult

T0 = datetime(2026, 1, 1, tzinfo=UTC)
USAGE = TokenUsage(prompt_tokens=120, completion_tokens=40, total_tokens=160)
DIFF = DiffSummary(
    sha256="a" * 64, bytes=10, files_changed=1, insertions=1, deletions=0, empty=False
)


def _plan() -> TaskPlan:
    task = TaskSpec(task_id="t", prompt="p", repo="git://x/r.git", base_commit="b" * 40)
    llm = AdapterSpec(
        id="llm",
        kind=AdapterKind.API,
        api=ApiSpec(protocol="openai-chat", url="http://10.0.0.5:8000/v1", model="m"),
        retry=RetryPolicy(max_attempts=2, backoff_initial_seconds=0.1, jitter_seconds=0),
    )
    return TaskPlan.of(task, ["llm"], {"llm": llm})


def _running() -> TaskExecutionStatus:
    status = attempt_started(
        TaskExecutionStatus(), attempt=1, adapter="llm", job_name="t-1a", trial=False, now=T0
    )
    attempts = [status.attempts[0].model_copy(update={"pod_started_at": T0})]
    return status.model_copy(update={"attempts": attempts})


def _job(done: datetime) -> dict:
    stamp = done.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {"name": "t-1a"},
        "status": {
            "completionTime": stamp,
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": stamp}],
        },
    }


def test_a_throttled_call_is_infrastructure_retried_after_the_servers_delay() -> None:
    result = RunnerResult(
        kind="adapter",
        duration_seconds=1.0,
        infrastructure_reason="the API throttled the request (HTTP 429, Retry-After 3s)",
        retry_after_seconds=3.0,
        diff=DiffSummary(
            sha256="", bytes=0, files_changed=0, insertions=0, deletions=0, empty=True
        ),
        patch_b64="",
    )
    current = _running().attempts[-1]
    done = T0 + timedelta(seconds=2)
    evidence = adapter_evidence(current, _job(done), result, now=done, log_path="logs/x.jsonl")
    assert evidence.retry_after_seconds == 3.0
    verdict = conclude(_plan(), [], evidence, rng=random.Random(0))
    assert verdict.result.failure_class is FailureClass.INFRASTRUCTURE
    assert verdict.finish is None and verdict.decision.retry
    # the policy alone would wait 0.1 s (infrastructure floor 10 s): the server's 3 s wins
    assert verdict.result.backoff_seconds == 3.0


def test_token_usage_survives_the_gate_job_into_the_recorded_result() -> None:
    result = RunnerResult(
        kind="adapter",
        exit_code=0,
        duration_seconds=1.0,
        diff=DIFF,
        patch_b64="ZGlmZg==",
        usage=USAGE,
    )
    status = _running()
    done = T0 + timedelta(seconds=2)
    evidence = adapter_evidence(
        status.attempts[-1], _job(done), result, now=done, log_path="logs/x.jsonl"
    )
    assert evidence.usage == USAGE
    validating = gate_started(status, evidence, "t-1g")
    assert validating.state is TaskState.VALIDATING
    # what the status keeps (camelCase in the resource) is what the gate step reads back
    kept = validating.attempts[-1].usage
    assert kept is not None and kept.model_dump(by_alias=True) == {
        "promptTokens": 120,
        "completionTokens": 40,
        "totalTokens": 160,
    }
    gate_result = RunnerResult(kind="gate", gate=GateResult(passed=True, applied=True, checks=[]))
    after = gate_evidence(
        validating.attempts[-1],
        _job(done + timedelta(seconds=5)),
        gate_result,
        now=done + timedelta(seconds=5),
        log_path="logs/x.jsonl",
    )
    assert after.usage == USAGE
    verdict = conclude(_plan(), [], after, rng=random.Random(0))
    assert verdict.result.state is TaskState.COMPLETED and verdict.result.usage == USAGE


def _failed_job(done: datetime) -> dict:
    stamp = done.strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {
        "type": "Failed",
        "status": "True",
        "reason": "BackoffLimitExceeded",
        "message": "Job has reached the specified backoff limit",
        "lastTransitionTime": stamp,
    }
    return {"metadata": {"name": "t-1a"}, "status": {"conditions": [condition]}}


EVICTED = 'Usage of EmptyDir volume "work" exceeds the limit "2Gi". '


def test_an_adapter_that_fills_its_disk_is_an_adapter_error_not_infrastructure() -> None:
    """The kubelet evicted the pod for its own disk limits: the adapter's doing. It feeds the
    breaker and moves to a fallback adapter instead of being retried as the platform's."""
    current = _running().attempts[-1]
    done = T0 + timedelta(seconds=2)
    evidence = adapter_evidence(
        current, _failed_job(done), None, now=done, log_path="logs/x.jsonl", evicted=EVICTED
    )
    assert evidence.infrastructure_reason is None
    verdict = conclude(_plan(), [], evidence, rng=random.Random(0))
    result = verdict.result
    assert result.failure_class is FailureClass.ADAPTER_ERROR
    assert result.failure_message is not None
    assert "exceeded its local disk limit" in result.failure_message
    assert 'EmptyDir volume "work"' in result.failure_message
    # killed mid-way, the runner may have said "cancelled": the eviction still decides
    stopped = RunnerResult(kind="adapter", cancelled=True, duration_seconds=1.0)
    again = adapter_evidence(
        current, _failed_job(done), stopped, now=done, log_path="x", evicted=EVICTED
    )
    again_verdict = conclude(_plan(), [], again, rng=random.Random(0))
    assert again_verdict.result.failure_class is FailureClass.ADAPTER_ERROR


def test_a_failed_job_without_a_disk_eviction_stays_infrastructure() -> None:
    current = _running().attempts[-1]
    done = T0 + timedelta(seconds=2)
    evidence = adapter_evidence(current, _failed_job(done), None, now=done, log_path="x")
    verdict = conclude(_plan(), [], evidence, rng=random.Random(0))
    assert verdict.result.failure_class is FailureClass.INFRASTRUCTURE


def test_a_gate_that_fills_its_disk_fails_the_gate() -> None:
    result = RunnerResult(
        kind="adapter", exit_code=0, duration_seconds=1.0, diff=DIFF, patch_b64="ZGlmZg=="
    )
    status = _running()
    done = T0 + timedelta(seconds=2)
    evidence = adapter_evidence(status.attempts[-1], _job(done), result, now=done, log_path="x")
    validating = gate_started(status, evidence, "t-1g")
    after = gate_evidence(
        validating.attempts[-1],
        _failed_job(done + timedelta(seconds=5)),
        None,
        now=done + timedelta(seconds=5),
        log_path="x",
        evicted=EVICTED,
    )
    assert after.infrastructure_reason is None
    assert after.gate is not None and after.gate.failed_checks == ["local-disk"]
    verdict = conclude(_plan(), [], after, rng=random.Random(0))
    assert verdict.result.failure_class is FailureClass.GATE_FAILED


def _queued_job(admitted: datetime, done: datetime) -> dict:
    """An adapter Job of queue ``team-a``, created at T0, admitted by Kueue at ``admitted``."""
    job = _job(done)
    job["metadata"] |= {
        "creationTimestamp": T0.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": {"kueue.x-k8s.io/queue-name": "team-a"},
    }
    job["status"]["startTime"] = admitted.strftime("%Y-%m-%dT%H:%M:%SZ")
    return job


def test_a_queued_adapter_job_that_ended_unseen_is_not_charged_its_queue_wait() -> None:
    """The operator never saw the pod running (no ``podStartedAt``): the attempt is charged
    from the Job's admission by Kueue (its ``status.startTime``), not from its creation."""
    status = attempt_started(
        TaskExecutionStatus(), attempt=1, adapter="llm", job_name="t-1a", trial=False, now=T0
    )
    current = status.attempts[-1]
    assert current.pod_started_at is None
    admitted, done = T0 + timedelta(hours=2), T0 + timedelta(hours=2, seconds=30)
    job = _queued_job(admitted, done)
    evidence = adapter_evidence(current, job, None, now=done, log_path="logs/x.jsonl")
    assert evidence.started_at == admitted
    unqueued = _job(done)
    assert adapter_evidence(current, unqueued, None, now=done, log_path="l").started_at == T0


def test_the_uncharged_queue_wait_carries_over_to_the_gate() -> None:
    """The attempt's charge, recorded after its gate, starts where the adapter's did: at
    Kueue's admission when the adapter's pod ended unseen (a loaded operator)."""
    status = attempt_started(
        TaskExecutionStatus(), attempt=1, adapter="llm", job_name="t-1a", trial=False, now=T0
    )
    admitted, done = T0 + timedelta(hours=2), T0 + timedelta(hours=2, seconds=30)
    job = _queued_job(admitted, done)
    evidence = adapter_evidence(status.attempts[-1], job, None, now=done, log_path="l")
    validating = gate_started(status, evidence, "t-1g")
    assert validating.attempts[-1].pod_started_at == admitted
    # not queued: nothing is invented
    plain = adapter_evidence(status.attempts[-1], _job(done), None, now=done, log_path="l")
    assert gate_started(status, plain, "t-1g").attempts[-1].pod_started_at is None

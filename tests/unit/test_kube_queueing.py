"""spec.queueName: the Jobs' shape for Kueue, the field's validation, and the queued wait.

Pure logic; the controller on the fake API is tests/integration/test_queued_jobs_on_fake_api.py
and a real Kueue is tests/e2e/test_kueue.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from core.crd import task_execution_crd
from core.kube.attempts import gate_evidence
from core.kube.conditions import set_conditions
from core.kube.jobs import job_manifest, job_name
from core.kube.queueing import (
    QUEUE_LABEL,
    QUEUED_REASON,
    pending_since,
    queue_name,
    queue_wait,
    queue_wait_seconds,
    queued,
)
from core.models import TaskState
from core.resources import (
    AdapterResourceSpec,
    AttemptStatus,
    TaskExecutionSpec,
    TaskExecutionStatus,
)
from core.rules import CEL_KEY

TE = {
    "apiVersion": "orchestrator.dev/v1alpha1",
    "kind": "TaskExecution",
    "metadata": {"name": "fix-bug", "namespace": "team-a", "uid": "1234-abcd"},
}
ADAPTER = AdapterResourceSpec.model_validate(
    {"kind": "patch", "resources": {"cpu": "250m", "memory": "300Mi"}}
)
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def manifest(role: str = "adapter", **overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "te": TE,
        "name": job_name("fix-bug", "1234-abcd", 1, role),  # type: ignore[arg-type]
        "role": role,
        "run_id": "r1",
        "task_id": "fix-bug",
        "attempt": 1,
        "image": "localhost/orchestrator/orchestrator:src-1",
        "fetch_grant": '{"downloads": "only"}',
        "runner_grant": '{"uploads": "only"}',
        "deadline_seconds": 600,
        "adapter": ADAPTER,
        "adapter_name": "patcher",
    }
    return job_manifest(**{**args, **overrides})


def spec(**fields: Any) -> dict[str, Any]:
    return {
        "source": {"repo": "https://git.example/calc.git", "baseCommit": "a" * 40},
        "task": {"prompt": "demo"},
        "adapterRef": {"name": "patcher"},
        **fields,
    }


# --------------------------------------------------------------------------- the Job's shape


@pytest.mark.parametrize("role", ["adapter", "gate"])
def test_a_queued_job_is_created_suspended_with_kueues_queue_label(role: str) -> None:
    job = manifest(role, queue_name="team-a-queue")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a-queue"
    # only the Job carries it: Kueue reads the Job's label, the pods keep theirs as before
    assert QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    plain = manifest(role)
    assert {k: v for k, v in job["metadata"]["labels"].items() if k != QUEUE_LABEL} == plain[
        "metadata"
    ]["labels"]
    assert {k: v for k, v in job["spec"].items() if k != "suspend"} == plain["spec"]
    assert queue_name(job) == "team-a-queue" and queued(job)


@pytest.mark.parametrize("role", ["adapter", "gate"])
def test_without_a_queue_the_job_is_what_it_was(role: str) -> None:
    job = manifest(role)
    assert "suspend" not in job["spec"]
    assert QUEUE_LABEL not in job["metadata"]["labels"]
    assert queue_name(job) is None and not queued(job)


def test_an_admitted_queued_job_is_no_longer_queued() -> None:
    job = manifest(queue_name="q")
    job["spec"]["suspend"] = False
    assert queue_name(job) == "q" and not queued(job)
    # a plain Job the API server stored (suspend defaulted to false) is never queued
    plain = manifest()
    plain["spec"]["suspend"] = False
    assert not queued(plain)


# --------------------------------------------------------------------------- the field


@pytest.mark.parametrize("name", ["team-a", "q", "a" * 63, "0queue"])
def test_a_dns_label_is_a_queue_name(name: str) -> None:
    parsed = TaskExecutionSpec.model_validate(spec(queueName=name))
    assert parsed.queue_name == name
    assert parsed.queue_timeout_seconds is None
    assert parsed.queue_wait_limit_seconds == 86400


def test_the_queue_is_optional_and_absent_by_default() -> None:
    parsed = TaskExecutionSpec.model_validate(spec())
    assert parsed.queue_name is None
    # no schema default: an object without a queue is stored as it was before the fields
    dumped = parsed.model_dump(by_alias=True, exclude_none=True)
    assert "queueName" not in dumped and "queueTimeoutSeconds" not in dumped


@pytest.mark.parametrize("name", ["Team-A", "team_a", "-team", "team-", "a" * 64, "", "a.b"])
def test_a_queue_name_that_is_not_a_dns_label_is_refused_naming_the_field(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        TaskExecutionSpec.model_validate(spec(queueName=name))
    errors = exc.value.errors()
    assert {e["loc"][0] for e in errors} == {"queueName"}
    if len(name) <= 63:
        assert "spec.queueName must be the name of a Kueue LocalQueue" in str(exc.value)


@pytest.mark.parametrize("seconds", [0, -1, 604801])
def test_the_queue_timeout_is_bounded(seconds: float) -> None:
    with pytest.raises(ValidationError) as exc:
        TaskExecutionSpec.model_validate(spec(queueName="q", queueTimeoutSeconds=seconds))
    assert exc.value.errors()[0]["loc"] == ("queueTimeoutSeconds",)


def test_the_crd_checks_the_queue_name_with_the_same_message() -> None:
    props = task_execution_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field = props["properties"]["spec"]["properties"]["queueName"]
    assert field["maxLength"] == 63
    [rule] = field[CEL_KEY]
    assert rule["message"].startswith("spec.queueName must be the name of a Kueue LocalQueue")
    assert "matches" in rule["rule"]
    timeout = props["properties"]["spec"]["properties"]["queueTimeoutSeconds"]
    assert "default" not in timeout and "default" not in field
    assert timeout["maximum"] == 604800


# --------------------------------------------------------------------------- the queued wait


def test_a_queued_job_waits_past_the_pending_timeout_until_its_queue_timeout() -> None:
    job = manifest(queue_name="q")
    wait = queue_wait(
        job, role="adapter", created_at=T0, now=T0 + timedelta(hours=2), timeout_seconds=86400
    )
    assert wait.problem is None
    assert "Kueue LocalQueue 'q'" in wait.message and "not charged" in wait.message
    assert wait.recheck_seconds == 86400 - 7200


def test_a_job_the_queue_never_admits_ends_after_the_queue_timeout() -> None:
    job = manifest(queue_name="q")
    at_limit = queue_wait(
        job, role="gate", created_at=T0, now=T0 + timedelta(seconds=600), timeout_seconds=600
    )
    assert at_limit.problem is None and at_limit.recheck_seconds == 0
    late = queue_wait(
        job, role="gate", created_at=T0, now=T0 + timedelta(seconds=601), timeout_seconds=600
    )
    assert late.problem == (
        "the gate Job was not admitted by Kueue LocalQueue 'q' within 600s (queueTimeoutSeconds)"
    )


def test_the_pending_clock_of_an_admitted_job_starts_at_its_admission() -> None:
    job = manifest(queue_name="q")
    job["spec"]["suspend"] = False
    now = T0 + timedelta(hours=3)
    # resumed, the Job controller has not set startTime yet: nothing of the wait is charged
    assert pending_since(job, created_at=T0, now=now) == now
    job["status"] = {"startTime": "2026-11-29T14:00:00Z"}
    assert pending_since(job, created_at=T0, now=now) == T0 + timedelta(hours=2)


def test_the_pending_clock_of_a_plain_job_starts_at_its_creation_as_before() -> None:
    job = manifest()
    job["status"] = {"startTime": "2026-11-29T14:00:00Z"}
    assert pending_since(job, created_at=T0, now=T0 + timedelta(hours=3)) == T0


def test_a_queued_attempt_is_not_running_and_says_it_is_queued() -> None:
    status = TaskExecutionStatus(
        state=TaskState.IN_PROGRESS, attempt=1, reason=QUEUED_REASON, message="waits"
    )
    conditions = {c.type: c for c in set_conditions(status, T0, 1).conditions}
    assert (conditions["Running"].status, conditions["Running"].reason) == ("False", "Queued")
    assert conditions["Succeeded"].status == "Unknown"
    running = status.model_copy(update={"reason": "AdapterRunning"})
    conditions = {c.type: c for c in set_conditions(running, T0, 1).conditions}
    assert conditions["Running"].status == "True"


def test_the_wait_of_an_admitted_queued_job_is_measured_from_its_creation() -> None:
    job = manifest(queue_name="q")
    job["metadata"]["creationTimestamp"] = "2026-11-29T12:00:00Z"
    assert queue_wait_seconds(job) == 0.0  # not started yet
    job["status"] = {"startTime": "2026-11-29T14:00:30Z"}
    assert queue_wait_seconds(job) == 7230.0
    plain = manifest()
    plain["metadata"]["creationTimestamp"] = "2026-11-29T12:00:00Z"
    plain["status"] = {"startTime": "2026-11-29T14:00:30Z"}
    assert queue_wait_seconds(plain) == 0.0


def test_a_gate_jobs_wait_in_the_queue_is_not_charged_to_the_attempt() -> None:
    current = AttemptStatus(
        attempt=1,
        adapter="patcher",
        job_name="a",
        gate_job_name="g",
        state=TaskState.VALIDATING,
        started_at=T0,
        pod_started_at=T0 + timedelta(minutes=1),
        exit_code=0,
    )
    gate = manifest("gate", queue_name="q")
    gate["metadata"]["creationTimestamp"] = "2026-11-29T12:05:00Z"  # adapter ran 4 minutes
    gate["status"] = {
        "startTime": "2026-11-29T14:05:00Z",  # two hours in the queue
        "completionTime": "2026-11-29T14:07:00Z",  # the checks took two minutes
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    now = T0 + timedelta(hours=3)
    evidence = gate_evidence(current, gate, None, now=now, log_path="x")
    assert evidence.duration_seconds == 6 * 60
    gate["metadata"]["labels"].pop(QUEUE_LABEL)  # the same Job without a queue: all charged
    evidence = gate_evidence(current, gate, None, now=now, log_path="x")
    assert evidence.duration_seconds == (2 * 3600 + 6 * 60)

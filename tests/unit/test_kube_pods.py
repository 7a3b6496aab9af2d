"""Pending triage: pods that never start end their attempt as infrastructure, early."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.kube.pods import container_started, job_counts_pods, storage_eviction, triage

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pod(
    *, waiting: tuple[str, str] | None = None, started: str | None = None, **status: Any
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "runner", "state": {}}
    if waiting:
        container["state"]["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    if started:
        container["state"]["running"] = {"startedAt": started}
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:01Z"},
        "status": {"phase": "Pending", "containerStatuses": [container], **status},
    }


def judge(pods: list[dict[str, Any]], seconds: float, timeout: float = 120) -> Any:
    return triage(
        pods, created_at=T0, now=T0 + timedelta(seconds=seconds), pending_timeout_seconds=timeout
    )


@pytest.mark.parametrize(
    "reason",
    ["ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"],
)
def test_waiting_reasons_that_do_not_clear_end_the_attempt_at_once(reason: str) -> None:
    verdict = judge([pod(waiting=(reason, 'secret "api-key" not found'))], 5)
    assert verdict.problem is not None and reason in verdict.problem
    assert 'secret "api-key" not found' in verdict.problem


def test_a_pull_error_may_clear_until_the_pending_time_is_up() -> None:
    stuck = [pod(waiting=("ErrImagePull", "connection reset"))]
    early = judge(stuck, 30)
    assert early.problem is None and early.waiting == "ErrImagePull: connection reset"
    assert judge(stuck, 121).problem is not None


def test_unschedulable_ends_only_after_the_pending_timeout() -> None:
    cond = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient cpu.",
    }
    p = pod(conditions=[cond])
    p["status"]["containerStatuses"] = []
    assert judge([p], 60).waiting == "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu."
    late = judge([p], 121)
    assert late.problem is not None and "Insufficient cpu" in late.problem


def test_a_started_container_gives_the_start_time_and_no_problem() -> None:
    verdict = judge([pod(started="2026-01-01T00:00:09Z")], 500)
    assert verdict.problem is None and verdict.started_at == T0 + timedelta(seconds=9)


def test_the_newest_pod_is_judged_and_no_pod_at_all_times_out() -> None:
    old = pod(waiting=("ImagePullBackOff", "old"))
    new = pod(started="2026-01-01T00:00:30Z")
    new["metadata"]["creationTimestamp"] = "2026-01-01T00:00:20Z"
    assert judge([old, new], 40).started_at is not None
    assert judge([], 10).waiting is not None and judge([], 10).problem is None
    assert "no pod was created" in (judge([], 121).problem or "")


def test_a_terminated_container_counts_as_started() -> None:
    p = pod()
    p["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"startedAt": "2026-01-01T00:00:05Z", "exitCode": 0}
    }
    assert container_started(p) == T0 + timedelta(seconds=5)


def evicted(message: str, reason: str = "Evicted") -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "status": {"phase": "Failed", "reason": reason, "message": message},
    }


@pytest.mark.parametrize(
    "message",
    [
        'Usage of EmptyDir volume "work" exceeds the limit "2Gi". ',
        "Pod ephemeral local storage usage exceeds the total limit of containers 3879731200. ",
        'Container adapter exceeded its local ephemeral storage limit "3879731200". ',
    ],
)
def test_an_eviction_for_the_pods_own_disk_limits_is_recognised(message: str) -> None:
    assert storage_eviction([pod(), evicted(message)]) == message.strip()


@pytest.mark.parametrize(
    "body",
    [
        # the node ran out of disk: someone else's doing, stays infrastructure
        evicted("The node was low on resource: ephemeral-storage. Threshold quantity: 1Gi. "),
        evicted("Pod was terminated in response to imminent node shutdown.", "Terminated"),
        evicted('Usage of EmptyDir volume "work" exceeds the limit "2Gi". ', reason="Failed"),
        {"metadata": {"name": "p"}, "status": {"phase": "Failed"}},
    ],
)
def test_other_pod_failures_are_not_disk_limit_evictions(body: dict[str, Any]) -> None:
    assert storage_eviction([body]) is None


def test_an_init_container_that_cannot_start_ends_the_attempt_at_once() -> None:
    # the runner's fetch of its inputs runs first, from the adapter's image: the main
    # container then only says PodInitializing
    fetch = {"name": "fetch", "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "x"}}}
    stuck = pod(waiting=("PodInitializing", ""), initContainerStatuses=[fetch])
    verdict = judge([stuck], 5)
    assert verdict.problem == "the adapter's container could not start: ErrImageNeverPull: x"


@pytest.mark.parametrize(
    ("status", "counts"),
    [
        (None, False),
        ({}, False),
        ({"active": 0, "ready": 0, "terminating": 0}, False),  # as a new Job's status reads
        ({"uncountedTerminatedPods": {}}, False),
        ({"active": 1}, True),
        ({"ready": 1}, True),
        ({"terminating": 1}, True),
        ({"failed": 1}, True),
        ({"succeeded": 1}, True),
        ({"uncountedTerminatedPods": {"failed": ["uid-1"]}}, True),
    ],
)
def test_a_job_counts_its_pods_by_its_status(status: dict[str, Any] | None, counts: bool) -> None:
    job: dict[str, Any] = {"metadata": {"name": "j"}}
    if status is not None:
        job["status"] = status
    assert job_counts_pods(job) is counts

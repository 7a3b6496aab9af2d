"""The operator's watch cache (core/kube/watch_cache.py): what it keeps and what it forgets."""

from __future__ import annotations

import json
from typing import Any

from core.kube.watch_cache import Bodies, WatchCache, slim_job, trim


def te(name: str, rv: str, *, state: str | None = None, adapters: tuple[str, ...] = ("a",)):
    body: dict[str, Any] = {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x" * 2000},
            "labels": {"team": "x"},
        },
        "spec": {
            "adapterRef": {"name": adapters[0]},
            "fallbackAdapterRefs": [{"name": a} for a in adapters[1:]],
            "task": {"prompt": "p", "patch": "diff"},
        },
    }
    if state:
        body["status"] = {"state": state}
    return body


def test_bodies_keep_compact_json_without_unread_metadata_and_hand_out_copies() -> None:
    bodies = Bodies()
    bodies[("ns", "t")] = te("t", "5")
    entry = bodies.entry(("ns", "t"))
    assert entry is not None and entry.uid == "uid-t" and entry.resource_version == "5"
    assert entry.refs == ("a",)
    assert b"managedFields" not in entry.body and b"last-applied" not in entry.body
    copy = bodies[("ns", "t")]
    assert copy["metadata"]["labels"] == {"team": "x"} and copy["spec"]["task"]["patch"] == "diff"
    copy["status"] = {"state": "IN_PROGRESS"}  # a copy: the cache is unchanged until stored
    assert "status" not in bodies[("ns", "t")]
    assert len(entry.body) < len(json.dumps(te("t", "5")).encode()) / 2


def test_an_echo_of_a_known_version_asks_for_nothing_and_a_newer_one_asks_once() -> None:
    cache = WatchCache()
    assert cache.observe_task("ADDED", te("t", "5")) == [("task", "ns", "t")]
    assert cache.observe_task("MODIFIED", te("t", "5")) == []
    assert cache.observe_task("MODIFIED", te("t", "4")) == []
    assert cache.observe_task("MODIFIED", te("t", "6")) == [("task", "ns", "t")]


def test_a_finished_or_deleted_task_leaves_nothing_behind() -> None:
    cache = WatchCache()
    cache.observe_adapter("ADDED", {"metadata": {"name": "a", "namespace": "ns"}, "spec": {}})
    cache.observe_task("ADDED", te("t1", "1", adapters=("a", "b")))
    cache.observe_task("ADDED", te("t2", "2"))
    assert cache.observe_adapter("MODIFIED", {"metadata": {"name": "a", "namespace": "ns"}}) == [
        ("task", "ns", "t1"),
        ("task", "ns", "t2"),
    ]
    assert cache.observe_task("MODIFIED", te("t1", "3", state="COMPLETED")) == []
    gone = cache.observe_task("DELETED", te("t2", "4"))
    assert gone == [("gone", "ns", "t2", "k8s", "t2", "uid-t2")]
    assert len(cache.tasks) == 0 and cache._users == {}
    assert cache.observe_adapter("MODIFIED", {"metadata": {"name": "a", "namespace": "ns"}}) == []


def test_our_own_write_is_kept_and_a_terminal_one_drops_the_task() -> None:
    cache = WatchCache()
    cache.observe_task("ADDED", te("t", "1"))
    written = te("t", "2", state="IN_PROGRESS")
    cache.written(written)
    assert cache.tasks[("ns", "t")]["status"] == {"state": "IN_PROGRESS"}
    assert cache.observe_task("MODIFIED", te("t", "2", state="IN_PROGRESS")) == []
    cache.written(te("t", "3", state="FAILED"))
    assert ("ns", "t") not in cache.tasks and cache.live_uids() == set()


def test_slim_job_and_trim_keep_what_the_reconciler_reads() -> None:
    job = {
        "metadata": {
            "name": "j",
            "namespace": "ns",
            "uid": "u",
            "labels": {"l": "v"},
            "ownerReferences": [{"uid": "o"}],
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{}],
            "annotations": {"a": "b"},
        },
        "spec": {"suspend": True, "template": {"spec": {"containers": [{"env": "x" * 4000}]}}},
        "status": {"startTime": "2026-01-01T00:00:01Z"},
    }
    slim = slim_job(job)
    assert slim["metadata"]["ownerReferences"] == [{"uid": "o"}]
    assert slim["status"] == {"startTime": "2026-01-01T00:00:01Z"}
    assert slim["spec"] == {"suspend": True}  # waiting for a queue's admission
    assert "template" not in json.dumps(slim)
    assert set(trim(job)["metadata"]) == {
        "name",
        "namespace",
        "uid",
        "labels",
        "ownerReferences",
        "creationTimestamp",
    }

"""The KubeApi contract: the in-memory fake and a real API server answer the same.

Every test runs one scenario twice, against ``core.testing.fake_kube.FakeKubeApi`` and against
``core.kube.client_api.ClientKubeApi`` on the cluster (marker ``cluster``, a fresh namespace):
the same calls, the same assertions. A behaviour the operator relies on belongs here first;
a difference between the two is a bug in the fake (or a wrong belief about Kubernetes).

The real half needs the CRDs (applied like tests/e2e/test_operator.py does). Nothing here
starts a pod: Jobs are created suspended, and the fake runs without its kubelet.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from core.errors import ConflictError, ForeignObjectError, RejectedError
from core.kube.api import ApiCall, Body, KubeApi, WatchEvent
from core.kube.client_api import ClientKubeApi
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import ROOT, adapter, task_execution

TE, ADAPTERS = "taskexecutions", "adapters"
FAKE_NAMESPACE = "contract"


@dataclass
class Side:
    name: str
    namespace: str
    connect: Callable[[], Awaitable[KubeApi]]


@pytest.fixture(scope="module")
def crds(kubectl: Any) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/taskexecutions.orchestrator.dev",
        "crd/adapters.orchestrator.dev",
    )


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.cluster)])
def side(request: pytest.FixtureRequest) -> Side:
    if request.param == "fake":

        async def fake() -> KubeApi:
            return FakeKubeApi(namespaces=(FAKE_NAMESPACE,))

        return Side("fake", FAKE_NAMESPACE, fake)
    request.getfixturevalue("crds")
    kubeconfig = request.getfixturevalue("kubeconfig")
    namespace = request.getfixturevalue("kube_namespace")

    async def real() -> KubeApi:
        return await ClientKubeApi.connect(kubeconfig)

    return Side("real", namespace, real)


def run(side: Side, scenario: Callable[[KubeApi, str], Awaitable[None]]) -> None:
    async def main() -> None:
        api = await side.connect()
        try:
            await scenario(api, side.namespace)
        finally:
            await api.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- bodies


def configmap(name: str, labels: dict[str, str] | None = None, owner: Body | None = None) -> Body:
    meta: Body = {"name": name, "labels": labels or {}}
    if owner is not None:
        meta["ownerReferences"] = [_ref(owner)]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


def te(name: str, labels: dict[str, str] | None = None) -> Body:
    body = task_execution(name, "file:///nowhere/repo.git", "contract-adapter")
    body["metadata"]["labels"] = labels or {}
    return body


def suspended_job(name: str, labels: dict[str, str]) -> Body:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "suspend": True,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"role": "contract"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "c", "image": "contract.invalid/none", "command": ["true"]}
                    ],
                },
            },
        },
    }


def lease(name: str, holder: str) -> Body:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
    }


def _ref(owner: Body) -> Body:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
    }


def rv(obj: Body) -> int:
    return int(obj["metadata"]["resourceVersion"])


async def first_event(
    api: KubeApi,
    resource: str,
    namespace: str,
    since: str | None,
    wanted: Callable[[WatchEvent], bool],
    selector: str | None = None,
) -> WatchEvent:
    async for event in api.watch(
        resource, namespace, resource_version=since, label_selector=selector, timeout_seconds=30
    ):
        if wanted(event):
            return event
    raise AssertionError(f"no matching {resource} watch event after {since}")


async def eventually_gone(get: Callable[[], Awaitable[Body | None]]) -> None:
    """The garbage collector's work: immediate in the fake, moments later on a cluster."""
    for _ in range(600):
        if await get() is None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("still there after 60 s")


# --------------------------------------------------------------------------- the contract


def test_create_409_returns_the_existing_object(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        first = await api.create_configmap(ns, configmap("twice"))
        again = await api.create_configmap(ns, configmap("twice"))
        assert first.created and not again.created
        assert again.object["metadata"]["uid"] == first.object["metadata"]["uid"]
        assert again.object["kind"] == "ConfigMap" and again.object["data"] == {"k": "v"}

        owner = await api.create_object(TE, ns, te("owner"))
        job = suspended_job("owned-job", {"app": "contract"})
        job["metadata"]["ownerReferences"] = [_ref(owner.object)]
        made = await api.create_job(ns, job)
        repeat = await api.create_job(ns, job)
        assert made.created and not repeat.created
        assert (
            repeat.object["metadata"]["ownerReferences"][0]["uid"]
            == owner.object["metadata"]["uid"]
        )
        # what the API server adds to every Job
        labels = made.object["spec"]["template"]["metadata"]["labels"]
        assert labels["job-name"] == "owned-job" and labels["role"] == "contract"
        assert labels["batch.kubernetes.io/controller-uid"] == made.object["metadata"]["uid"]

        te_again = await api.create_object(TE, ns, te("owner"))
        assert not te_again.created
        assert te_again.object["metadata"]["uid"] == owner.object["metadata"]["uid"]

    run(side, scenario)


def test_not_found_is_none_everywhere(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        calls: list[ApiCall] = []
        api.add_observer(calls.append)
        assert await api.get_job(ns, "missing") is None
        assert await api.get_configmap(ns, "missing") is None
        assert await api.get_object(TE, ns, "missing") is None
        assert await api.get_lease(ns, "missing") is None
        assert await api.pod_log(ns, "missing") is None
        assert await api.patch_status(TE, ns, "missing", {"state": "FAILED"}) is None
        assert (
            await api.patch_object(TE, ns, "missing", {"metadata": {"labels": {"a": "b"}}}) is None
        )
        assert await api.delete_job(ns, "missing") is False
        assert await api.delete_configmap(ns, "missing") is False
        assert await api.delete_object(TE, ns, "missing") is False
        assert await api.job_pods(ns, "missing") == []
        assert [c.status for c in calls] == [404] * 10 + [200]
        assert [c.write for c in calls] == [False] * 5 + [True] * 5 + [False]
        assert calls[4].resource == "pods/log" and calls[5].resource == "taskexecutions/status"

    run(side, scenario)


def test_stale_resource_version_on_a_status_patch_is_a_conflict(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        created = (await api.create_object(TE, ns, te("stale"))).object
        version = created["metadata"]["resourceVersion"]
        first = await api.patch_status(
            TE, ns, "stale", {"state": "IN_PROGRESS", "message": "one"}, resource_version=version
        )
        assert first is not None and rv(first) > rv(created)
        with pytest.raises(ConflictError) as err:
            await api.patch_status(
                TE, ns, "stale", {"state": "FAILED", "message": "two"}, resource_version=version
            )
        assert err.value.status == 409
        now = await api.get_object(TE, ns, "stale")
        assert now is not None and now["status"]["message"] == "one"
        assert now["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        # with the current version it goes through
        second = await api.patch_status(
            TE, ns, "stale", {"message": "two"}, resource_version=now["metadata"]["resourceVersion"]
        )
        assert second is not None and second["status"]["message"] == "two"
        assert second["status"]["state"] == "IN_PROGRESS"  # a merge patch keeps the rest

    run(side, scenario)


def test_generation_counts_spec_changes_resource_version_counts_writes(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        # an Adapter: its spec may change (a TaskExecution's spec is immutable, by CEL rule)
        body = adapter("gen", "patch")
        body["status"] = {"breakerState": "OPEN", "message": "forged"}
        created = (await api.create_object(ADAPTERS, ns, body)).object
        assert created["metadata"]["generation"] == 1
        assert (created.get("status") or {}).get("message", "") != "forged"  # status ignored

        status = await api.patch_status(
            ADAPTERS, ns, "gen", {"breakerState": "OPEN", "message": "m"}
        )
        assert status is not None
        assert status["metadata"]["generation"] == 1 and rv(status) > rv(created)

        same = await api.patch_status(ADAPTERS, ns, "gen", {"breakerState": "OPEN", "message": "m"})
        assert same is not None and rv(same) == rv(status)  # nothing changed: nothing written

        labelled = await api.patch_object(ADAPTERS, ns, "gen", {"metadata": {"labels": {"x": "y"}}})
        assert labelled is not None
        assert labelled["metadata"]["generation"] == 1 and rv(labelled) > rv(status)

        spec = await api.patch_object(
            ADAPTERS, ns, "gen", {"spec": {"description": "changed"}, "status": {"message": "no"}}
        )
        assert spec is not None and spec["metadata"]["generation"] == 2
        assert spec["spec"]["description"] == "changed"
        assert spec["status"]["message"] == "m"  # the main resource ignores status
        assert spec["metadata"]["uid"] == created["metadata"]["uid"]

        # a TaskExecution behaves the same for status: generation stays, the version moves
        task = (await api.create_object(TE, ns, te("gen-te"))).object
        moved = await api.patch_status(TE, ns, "gen-te", {"state": "IN_PROGRESS"})
        assert moved is not None and moved["metadata"]["generation"] == 1 and rv(moved) > rv(task)

    run(side, scenario)


def test_the_watch_echo_of_a_status_patch_carries_its_resource_version(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        created = (await api.create_object(TE, ns, te("echo"))).object
        since = created["metadata"]["resourceVersion"]
        patched = await api.patch_status(TE, ns, "echo", {"state": "VALIDATING"})
        assert patched is not None
        echo = await first_event(
            api, TE, ns, since, lambda e: e.object["metadata"]["name"] == "echo"
        )
        assert echo.type == "MODIFIED"
        assert echo.resource_version == patched["metadata"]["resourceVersion"]
        assert echo.object["status"]["state"] == "VALIDATING"

        assert await api.delete_object(TE, ns, "echo") is True
        gone = await first_event(
            api, TE, ns, echo.resource_version, lambda e: e.object["metadata"]["name"] == "echo"
        )
        assert gone.type == "DELETED" and rv(gone.object) > rv(patched)

    run(side, scenario)


def test_a_watch_without_version_starts_with_the_existing_objects(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        made = (await api.create_configmap(ns, configmap("listed", {"w": "1"}))).object
        event = await first_event(api, "configmaps", ns, None, lambda e: True, selector="w=1")
        assert event.type == "ADDED" and event.object["metadata"]["uid"] == made["metadata"]["uid"]
        assert event.object["kind"] == "ConfigMap"

    run(side, scenario)


def test_a_watch_from_a_lists_version_sees_exactly_the_later_changes(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        before = (await api.create_configmap(ns, configmap("listed-1", {"lw": "1"}))).object
        listing = await api.list_resource("configmaps", ns, label_selector="lw=1")
        assert [o["metadata"]["uid"] for o in listing.items] == [before["metadata"]["uid"]]
        assert int(listing.resource_version) >= rv(before)
        after = (await api.create_configmap(ns, configmap("listed-2", {"lw": "1"}))).object
        event = await first_event(
            api, "configmaps", ns, listing.resource_version, lambda e: True, selector="lw=1"
        )
        assert event.type == "ADDED" and event.object["metadata"]["uid"] == after["metadata"]["uid"]

    run(side, scenario)


def test_label_selected_watch_sees_objects_enter_and_leave(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        made = (await api.create_object(TE, ns, te("mover", {"tier": "b"}))).object
        since = made["metadata"]["resourceVersion"]
        moved = await api.patch_object(TE, ns, "mover", {"metadata": {"labels": {"tier": "a"}}})
        left = await api.patch_object(TE, ns, "mover", {"metadata": {"labels": {"tier": "c"}}})
        assert moved is not None and left is not None
        events: list[WatchEvent] = []
        async for event in api.watch(
            TE, ns, resource_version=since, label_selector="tier=a", timeout_seconds=5
        ):
            events.append(event)
            if len(events) == 2:
                break
        assert [e.type for e in events] == ["ADDED", "DELETED"]
        assert events[0].resource_version == moved["metadata"]["resourceVersion"]
        assert events[1].resource_version == left["metadata"]["resourceVersion"]

    run(side, scenario)


def test_label_selectors_the_operator_uses(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        for name, labels in (
            ("sel-a1", {"app": "orch", "attempt": "1"}),
            ("sel-a2", {"app": "orch", "attempt": "2"}),
            ("sel-b", {"app": "other"}),
        ):
            await api.create_job(ns, suspended_job(name, labels))
            await api.create_object(TE, ns, te(name, labels))

        async def names(selector: str | None) -> list[str]:
            jobs = sorted(j["metadata"]["name"] for j in await api.list_jobs(ns, selector))
            tes = sorted(t["metadata"]["name"] for t in await api.list_objects(TE, ns, selector))
            assert jobs == tes
            return jobs

        assert await names(None) == ["sel-a1", "sel-a2", "sel-b"]
        assert await names("app=orch") == ["sel-a1", "sel-a2"]
        assert await names("app==orch,attempt=2") == ["sel-a2"]
        assert await names("app!=orch") == ["sel-b"]
        assert await names("attempt in (1, 3)") == ["sel-a1"]
        assert await names("attempt notin (1)") == ["sel-a2", "sel-b"]
        assert await names("attempt") == ["sel-a1", "sel-a2"]
        assert await names("!attempt") == ["sel-b"]
        assert await names("app=none") == []
        every = await api.list_objects(TE, None, "app=orch")
        assert {t["metadata"]["namespace"] for t in every} >= {ns}
        for job in await api.list_jobs(ns, "app=orch"):
            assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
        assert await api.job_pods(ns, "sel-a1") == []  # suspended: no pods

    run(side, scenario)


def test_lease_create_and_replace_with_a_precondition(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        created = await api.create_lease(ns, lease("leader", "replica-a"))
        assert created.created
        taken = await api.create_lease(ns, lease("leader", "replica-b"))
        assert not taken.created and taken.object["spec"]["holderIdentity"] == "replica-a"

        seen = created.object
        renewed = await api.replace_lease(
            ns,
            {
                **seen,
                "spec": {**seen["spec"], "holderIdentity": "replica-a", "leaseTransitions": 1},
            },
        )
        assert rv(renewed) > rv(seen)
        with pytest.raises(ConflictError):  # replica-b acts on what it read before the renewal
            await api.replace_lease(
                ns, {**seen, "spec": {**seen["spec"], "holderIdentity": "replica-b"}}
            )
        current = await api.get_lease(ns, "leader")
        assert current is not None and current["spec"]["holderIdentity"] == "replica-a"
        assert current["metadata"]["resourceVersion"] == renewed["metadata"]["resourceVersion"]
        assert "generation" not in current["metadata"]

    run(side, scenario)


def test_delete_with_a_uid_precondition(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        old = (await api.create_configmap(ns, configmap("recycled"))).object
        assert await api.delete_configmap(ns, "recycled", uid=old["metadata"]["uid"]) is True
        new = (await api.create_configmap(ns, configmap("recycled"))).object
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        with pytest.raises(ConflictError):
            await api.delete_configmap(ns, "recycled", uid=old["metadata"]["uid"])
        assert await api.get_configmap(ns, "recycled") is not None
        assert await api.delete_configmap(ns, "recycled") is True
        assert await api.delete_configmap(ns, "recycled") is False

    run(side, scenario)


def test_invalid_labels_are_rejected_with_the_servers_message(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        value = "x" * 62 + "-"  # a 63-character name cut to a label value that ends in '-'
        with pytest.raises(RejectedError) as err:
            await api.create_configmap(ns, configmap("bad-label", {"orchestrator.dev/task": value}))
        assert err.value.status == 422 and err.value.reason == "Invalid"
        assert value in err.value.message
        assert await api.get_configmap(ns, "bad-label") is None

        with pytest.raises(RejectedError) as err:
            await api.create_job(ns, suspended_job("Bad_Name", {}))
        assert err.value.status == 422 and "Bad_Name" in err.value.message

        # the gate's patch travels in a ConfigMap: 1 MiB of values, binaryData counted decoded
        big = configmap("too-big")
        big["data"] = {"k": "vv"}  # one byte over
        big["binaryData"] = {"patch": base64.b64encode(b"x" * (1024 * 1024 - 1)).decode()}
        with pytest.raises(RejectedError) as err:
            await api.create_configmap(ns, big)
        assert err.value.status == 422 and "1048576" in err.value.message
        big["data"] = {}
        assert (await api.create_configmap(ns, big)).created

    run(side, scenario)


def test_finalizers_hold_a_deletion_and_bump_the_generation(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        body = te("held")
        body["metadata"]["finalizers"] = ["orchestrator.dev/contract"]
        created = (await api.create_object(TE, ns, body)).object
        assert await api.delete_object(TE, ns, "held") is True
        held = await api.get_object(TE, ns, "held")
        assert held is not None and held["metadata"].get("deletionTimestamp")
        assert held["metadata"]["generation"] == created["metadata"]["generation"] + 1
        assert await api.delete_object(TE, ns, "held") is True  # again: still being deleted
        released = await api.patch_object(TE, ns, "held", {"metadata": {"finalizers": None}})
        assert released is not None
        assert await api.get_object(TE, ns, "held") is None
        gone = await first_event(
            api, TE, ns, held["metadata"]["resourceVersion"], lambda e: e.type == "DELETED"
        )
        assert gone.object["metadata"]["uid"] == created["metadata"]["uid"]

    run(side, scenario)


def test_owned_objects_go_with_their_owner(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        owner = (await api.create_object(TE, ns, te("parent"))).object
        await api.create_configmap(ns, configmap("child-cm", owner=owner))
        job = suspended_job("child-job", {})
        job["metadata"]["ownerReferences"] = [_ref(owner)]
        await api.create_job(ns, job)
        await api.create_configmap(ns, configmap("bystander"))
        assert await api.delete_object(TE, ns, "parent") is True
        await eventually_gone(lambda: api.get_configmap(ns, "child-cm"))
        await eventually_gone(lambda: api.get_job(ns, "child-job"))
        assert await api.get_configmap(ns, "bystander") is not None

    run(side, scenario)


def test_network_policy_apply_keeps_to_what_it_owns(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        owner = (await api.create_object(ADAPTERS, ns, adapter("np-owner", "patch"))).object
        other = (await api.create_object(ADAPTERS, ns, adapter("np-other", "patch"))).object

        def policy(cidr: str, who: Body, name: str = "egress") -> Body:
            return {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": name, "ownerReferences": [_ref(who)]},
                "spec": {
                    "podSelector": {"matchLabels": {"orchestrator.dev/adapter": "np-owner"}},
                    "policyTypes": ["Egress"],
                    "egress": [
                        {
                            "to": [{"ipBlock": {"cidr": cidr}}],
                            "ports": [{"protocol": "TCP", "port": 443}],
                        }
                    ],
                },
            }

        calls: list[ApiCall] = []
        api.add_observer(calls.append)
        first = await api.apply_network_policy(ns, policy("10.0.0.0/8", owner))
        unchanged = await api.apply_network_policy(ns, policy("10.0.0.0/8", owner))
        assert unchanged["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        changed = await api.apply_network_policy(ns, policy("192.168.0.0/16", owner))
        assert changed["spec"]["egress"][0]["to"][0]["ipBlock"]["cidr"] == "192.168.0.0/16"
        assert changed["metadata"]["generation"] == 2
        assert [(c.verb, c.status) for c in calls] == [
            ("create", 201),
            ("create", 409),
            ("get", 200),
            ("create", 409),
            ("get", 200),
            ("update", 200),
        ]
        with pytest.raises(ForeignObjectError) as err:
            await api.apply_network_policy(ns, policy("0.0.0.0/0", other))
        assert err.value.existing["metadata"]["uid"] == first["metadata"]["uid"]

    run(side, scenario)


def test_events_are_posted_about_an_object(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        obj = (await api.create_object(TE, ns, te("noisy"))).object
        await api.post_event(obj, "Normal", "TASK_STARTED", "attempt 1", "Start")
        event = await first_event(
            api, "events", ns, None, lambda e: e.object.get("reason") == "TASK_STARTED"
        )
        assert event.object["involvedObject"]["uid"] == obj["metadata"]["uid"]
        assert event.object["metadata"]["name"].startswith("noisy.")
        assert event.object["message"] == "attempt 1" and event.object["type"] == "Normal"

    run(side, scenario)


def test_a_named_event_is_posted_once(side: Side) -> None:
    """A deterministic name: the second post is a 409, answered False, and nothing is added."""

    async def scenario(api: KubeApi, ns: str) -> None:
        obj = (await api.create_object(TE, ns, te("once"))).object
        name = "once.esc-0123456789abcdef"
        assert await api.post_event(obj, "Warning", "ESCALATION", "first", "x", name=name)
        assert not await api.post_event(obj, "Warning", "ESCALATION", "again", "x", name=name)
        listed = [
            e
            for e in (await api.list_resource("events", ns)).items
            if e["reason"] == "ESCALATION"
        ]
        assert [(e["metadata"]["name"], e["message"]) for e in listed] == [(name, "first")]
        assert listed[0]["involvedObject"]["uid"] == obj["metadata"]["uid"]

    run(side, scenario)


def test_a_status_patch_on_a_deleted_and_recreated_name_needs_the_new_version(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        old = (await api.create_object(TE, ns, te("reborn"))).object
        assert await api.delete_object(TE, ns, "reborn", uid=old["metadata"]["uid"]) is True
        await eventually_gone(lambda: api.get_object(TE, ns, "reborn"))
        new = (await api.create_object(TE, ns, te("reborn"))).object
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        with pytest.raises(ConflictError):
            await api.patch_status(
                TE,
                ns,
                "reborn",
                {"state": "FAILED"},
                resource_version=old["metadata"]["resourceVersion"],
            )

    run(side, scenario)


def test_custom_resources_are_pruned_and_defaulted_by_their_schema(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        body = te("pruned")
        body["spec"]["bogus"] = "dropped"
        body["spec"]["task"]["alsoBogus"] = 1
        made = (await api.create_object(TE, ns, body)).object
        assert "bogus" not in made["spec"] and "alsoBogus" not in made["spec"]["task"]
        assert made["spec"]["allowEmptyDiff"] is False  # a default of the schema
        patched = await api.patch_status(
            TE, ns, "pruned", {"state": "IN_PROGRESS", "handlerResult": {"kopf": "style"}}
        )
        assert patched is not None
        assert patched["status"] == {
            "state": "IN_PROGRESS",
            "attempt": 0,
            "reason": "",
            "message": "",
        }
        read = await api.get_object(TE, ns, "pruned")
        assert read is not None and read["status"] == patched["status"]
        assert read["spec"] == made["spec"]

    run(side, scenario)


def test_the_task_execution_spec_is_immutable(side: Side) -> None:
    async def scenario(api: KubeApi, ns: str) -> None:
        made = (await api.create_object(TE, ns, te("frozen"))).object
        with pytest.raises(RejectedError) as err:
            await api.patch_object(TE, ns, "frozen", {"spec": {"task": {"prompt": "changed"}}})
        assert err.value.status == 422 and "spec is immutable" in err.value.message
        read = await api.get_object(TE, ns, "frozen")
        assert read is not None and read["spec"] == made["spec"]
        assert read["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"]

    run(side, scenario)

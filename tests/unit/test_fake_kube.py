"""The in-memory KubeApi: what the contract test cannot show on a cluster (faults, watch
history limits, garbage-collection timing, graceful pod deletion, shared servers) and the
API-server rules it keeps, each asserted on what the fake's server holds afterwards.

tests/e2e/test_kube_api_contract.py holds the same fake to a real API server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from core.errors import (
    ConflictError,
    ExpiredError,
    ForeignObjectError,
    InfrastructureError,
    NotFoundError,
    RejectedError,
    TransientApiError,
)
from core.kube.api import ApiCall, Body, KubeApi, WatchEvent, is_owned_by
from core.testing.fake_apiserver import FakeApiServer
from core.testing.fake_kube import FakeKubeApi
from core.testing.kube_semantics import merge_patch, parse_selector, selector_matches

NS = "ns"
TE = "taskexecutions"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


def fake(**kwargs: Any) -> FakeKubeApi:
    server = FakeApiServer(namespaces=(NS,), now=lambda: T0, rng=random.Random(7), **kwargs)
    return FakeKubeApi(server, now=lambda: T0)


def te(name: str, labels: dict[str, str] | None = None, **meta: Any) -> Body:
    return {
        "apiVersion": "orchestrator.dev/v1alpha1",
        "kind": "TaskExecution",
        "metadata": {"name": name, "labels": labels or {}, **meta},
        "spec": {"runId": "r", "task": {"prompt": "p"}},
    }


def cm(name: str, owner: Body | None = None) -> Body:
    meta: Body = {"name": name}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
        ]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


def test_the_fake_satisfies_the_protocol() -> None:
    api: KubeApi = fake()  # mypy checks the same in core/testing/fake_kube.py
    assert callable(api.watch)


# --------------------------------------------------------------------------- the API server's rules


def test_one_resource_version_counter_for_every_kind_and_no_write_for_no_change() -> None:
    async def scenario() -> None:
        api = fake()
        a = (await api.create_object(TE, NS, te("a"))).object
        b = (await api.create_configmap(NS, cm("b"))).object
        c = await api.patch_status(TE, NS, "a", {"state": "IN_PROGRESS"})
        same = await api.patch_status(TE, NS, "a", {"state": "IN_PROGRESS"})
        assert c is not None and same is not None
        versions = [int(o["metadata"]["resourceVersion"]) for o in (a, b, c, same)]
        assert versions == [1, 2, 3, 3]
        assert api.server.revision == 3

    run(scenario)


def test_metadata_assigned_on_create_from_the_injected_clock_and_rng() -> None:
    async def scenario() -> None:
        first = (
            await fake().create_object(TE, NS, te("a", resourceVersion="99", uid="forged"))
        ).object
        second = (await fake().create_object(TE, NS, te("a"))).object
        meta = first["metadata"]
        assert meta["creationTimestamp"] == "2026-01-02T03:04:05Z"
        assert meta["uid"] == second["metadata"]["uid"] != "forged"  # same seed, same uid
        assert meta["resourceVersion"] == "1" and meta["generation"] == 1
        assert meta["namespace"] == NS
        plain = (await fake().create_configmap(NS, cm("c"))).object
        assert "generation" not in plain["metadata"]  # ConfigMaps have none

    run(scenario)


def test_generate_name_and_unknown_namespace() -> None:
    async def scenario() -> None:
        api = fake()
        made = await api.create_configmap(NS, {"metadata": {"generateName": "x."}, "data": {}})
        assert made.created and made.object["metadata"]["name"].startswith("x.")
        assert len(made.object["metadata"]["name"]) == len("x.") + 5
        with pytest.raises(NotFoundError, match='namespaces "elsewhere" not found'):
            await api.create_configmap("elsewhere", cm("c"))
        api.server.add_namespace("elsewhere")
        assert (await api.create_configmap("elsewhere", cm("c"))).created

    run(scenario)


def test_status_is_its_own_subresource() -> None:
    async def scenario() -> None:
        api = fake(schemas={})  # no structural schema: nothing pruned, defaulted or immutable
        await api.create_object(TE, NS, te("a"))
        patched = await api.patch_status(TE, NS, "a", {"state": "X"})
        assert patched is not None and patched["status"] == {"state": "X"}
        # status patch cannot touch spec or labels; main patch cannot touch status
        stored = api.server.get(TE, NS, "a")
        assert stored["spec"] == te("a")["spec"] and stored["metadata"]["labels"] == {}
        main = await api.patch_object(
            TE, NS, "a", {"status": {"state": "Y"}, "spec": {"runId": "s"}}
        )
        assert main is not None and main["status"] == {"state": "X"}
        assert main["metadata"]["generation"] == 2 and main["spec"]["runId"] == "s"

    run(scenario)


def test_custom_resources_are_pruned_defaulted_and_keep_an_immutable_spec() -> None:
    async def scenario() -> None:
        api = fake()
        body = te("a")
        body["spec"] |= {"bogus": 1, "source": {"repo": "r", "baseCommit": "c" * 40}}
        made = (await api.create_object(TE, NS, body)).object
        assert "bogus" not in made["spec"] and made["spec"]["allowEmptyDiff"] is False
        patched = await api.patch_status(TE, NS, "a", {"state": "IN_PROGRESS", "undeclared": 1})
        assert patched is not None
        assert patched["status"] == {
            "state": "IN_PROGRESS",
            "attempt": 0,
            "reason": "",
            "message": "",
        }
        with pytest.raises(RejectedError, match="spec is immutable") as err:
            await api.patch_object(TE, NS, "a", {"spec": {"runId": "other"}})
        assert err.value.status == 422
        assert api.server.get(TE, NS, "a")["spec"]["runId"] == "r"
        labelled = await api.patch_object(TE, NS, "a", {"metadata": {"labels": {"x": "y"}}})
        assert labelled is not None and labelled["metadata"]["labels"] == {"x": "y"}

    run(scenario)


def test_merge_patch_deletes_with_null_and_replaces_lists() -> None:
    target = {"a": {"b": 1, "c": [1, 2]}, "d": 4}
    assert merge_patch(target, {"a": {"b": None, "c": [3]}, "e": {"f": None}}) == {
        "a": {"c": [3]},
        "d": 4,
        "e": {},
    }
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": 4}  # not modified in place


def test_label_selectors() -> None:
    labels = {"metadata": {"labels": {"app": "orch", "attempt": "2"}}}
    cases = {
        "app=orch": True,
        "app==orch,attempt=2": True,
        "app = orch , attempt != 1": True,
        "attempt in (1,2)": True,
        "attempt notin (2)": False,
        "missing notin (2)": True,
        "attempt": True,
        "!attempt": False,
        "!missing": True,
        "app=other": False,
        "": True,
    }
    for selector, expected in cases.items():
        assert selector_matches(parse_selector(selector), labels) is expected, selector
    with pytest.raises(RejectedError) as err:
        parse_selector("app in orch")
    assert err.value.status == 400


def test_names_and_labels_are_validated_like_the_api_server() -> None:
    async def scenario() -> None:
        api = fake()
        with pytest.raises(RejectedError) as err:
            await api.create_configmap(NS, cm("Upper"))
        assert err.value.status == 422 and 'ConfigMap "Upper" is invalid' in err.value.message
        job = {"metadata": {"name": "j" * 64}, "spec": {"template": {"spec": {}}}}
        with pytest.raises(RejectedError, match="no more than 63 characters"):
            await api.create_job(NS, job)
        job = {
            "metadata": {"name": "j"},
            "spec": {"template": {"metadata": {"labels": {"a": "b-"}}}},
        }
        with pytest.raises(RejectedError, match=r"spec\.template\.labels"):
            await api.create_job(NS, job)
        await api.create_object(TE, NS, te("ok"))
        with pytest.raises(RejectedError):
            await api.patch_object(TE, NS, "ok", {"metadata": {"labels": {"bad key!": "x"}}})
        assert api.server.get(TE, NS, "ok")["metadata"]["labels"] == {}

    run(scenario)


def test_preconditions() -> None:
    async def scenario() -> None:
        api = fake()
        made = (await api.create_object(TE, NS, te("a"))).object
        version = made["metadata"]["resourceVersion"]
        await api.patch_status(TE, NS, "a", {"state": "A"}, resource_version=version)
        with pytest.raises(ConflictError) as err:
            await api.patch_status(TE, NS, "a", {"state": "B"}, resource_version=version)
        assert err.value.status == 409 and "the object has been modified" in err.value.message
        assert api.server.get(TE, NS, "a")["status"]["state"] == "A"
        with pytest.raises(ConflictError, match="UID in the precondition"):
            await api.delete_object(TE, NS, "a", uid="another")
        assert await api.delete_object(TE, NS, "a", uid=made["metadata"]["uid"])

    run(scenario)


def test_finalizers_hold_the_object_until_removed() -> None:
    async def scenario() -> None:
        api = fake()
        await api.create_object(TE, NS, te("a", finalizers=["f"]))
        assert await api.delete_object(TE, NS, "a")
        held = api.server.get(TE, NS, "a")
        assert held["metadata"]["deletionTimestamp"] == "2026-01-02T03:04:05Z"
        assert held["metadata"]["generation"] == 2
        assert await api.patch_object(TE, NS, "a", {"metadata": {"finalizers": []}}) is not None
        assert await api.get_object(TE, NS, "a") is None

    run(scenario)


# --------------------------------------------------------------------------- garbage collection


def test_owner_cascade_is_immediate_by_default() -> None:
    async def scenario() -> None:
        api = fake()
        owner = (await api.create_object(TE, NS, te("owner"))).object
        child = (await api.create_configmap(NS, cm("child", owner))).object
        await api.create_configmap(NS, cm("grandchild", child))
        assert is_owned_by(child, owner["metadata"]["uid"])
        assert await api.delete_object(TE, NS, "owner")
        assert api.server.list_objects("configmaps", NS) == []

    run(scenario)


def test_manual_cascade_shows_the_window_before_the_collector_runs() -> None:
    async def scenario() -> None:
        api = fake(cascade="manual")
        owner = (await api.create_object(TE, NS, te("owner"))).object
        await api.create_configmap(NS, cm("child", owner))
        await api.delete_object(TE, NS, "owner")
        assert await api.get_configmap(NS, "child") is not None  # the owner is gone, not yet it
        assert api.server.collect_garbage() == 1
        assert await api.get_configmap(NS, "child") is None

    run(scenario)


def test_a_recreated_owner_does_not_adopt_the_old_children() -> None:
    async def scenario() -> None:
        api = fake(cascade="manual")
        old = (await api.create_object(TE, NS, te("owner"))).object
        await api.create_configmap(NS, cm("child", old))
        await api.delete_object(TE, NS, "owner")
        new = (await api.create_object(TE, NS, te("owner"))).object
        existing = (await api.create_configmap(NS, cm("child", new))).object
        assert not is_owned_by(existing, new["metadata"]["uid"])  # adoption must check this
        api.server.collect_garbage()
        assert await api.get_configmap(NS, "child") is None  # owner uid gone: collected

    run(scenario)


def test_pods_on_a_node_are_deleted_gracefully() -> None:
    async def scenario() -> None:
        api = fake()
        server = api.server
        pod = {
            "metadata": {"name": "p"},
            "spec": {
                "nodeName": "n",
                "terminationGracePeriodSeconds": 7,
                "containers": [{"name": "c"}],
            },
        }
        server.create("pods", NS, pod)
        server.create(
            "pods", NS, {"metadata": {"name": "q"}, "spec": {"containers": [{"name": "c"}]}}
        )
        server.delete("pods", NS, "p")
        server.delete("pods", NS, "q")
        left = server.list_objects("pods", NS)
        assert [p["metadata"]["name"] for p in left] == ["p"]  # q was never bound: gone at once
        assert left[0]["metadata"]["deletionGracePeriodSeconds"] == 7
        server.delete("pods", NS, "p", force=True)  # what the kubelet does once stopped
        assert server.list_objects("pods", NS) == []

    run(scenario)


def test_pod_log_of_a_container_not_started_is_400_and_of_a_gone_pod_none() -> None:
    async def scenario() -> None:
        api = fake()
        api.server.create(
            "pods", NS, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
        )
        with pytest.raises(RejectedError, match="is waiting to start") as err:
            await api.pod_log(NS, "p")
        assert err.value.status == 400
        api.server.pod_logs[(NS, "p")] = lambda: "line\n"
        assert await api.pod_log(NS, "p") == "line\n"
        api.server.delete("pods", NS, "p")
        assert await api.pod_log(NS, "p") is None and (NS, "p") not in api.server.pod_logs

    run(scenario)


# --------------------------------------------------------------------------- watches


async def collect(api: KubeApi, *args: Any, n: int, **kwargs: Any) -> list[WatchEvent]:
    events: list[WatchEvent] = []
    async for event in api.watch(*args, **kwargs):
        events.append(event)
        if len(events) == n:
            break
    return events


def test_watch_replays_from_a_version_and_follows_live_changes() -> None:
    async def scenario() -> None:
        api = fake()
        made = (await api.create_object(TE, NS, te("a"))).object
        patched = await api.patch_status(TE, NS, "a", {"state": "S"})
        assert patched is not None
        replay = await collect(api, TE, NS, resource_version="1", n=1, timeout_seconds=1)
        assert [(e.type, e.resource_version) for e in replay] == [("MODIFIED", "2")]

        async def later() -> None:
            await asyncio.sleep(0)
            await api.delete_object(TE, NS, "a")

        task = asyncio.create_task(later())
        live = await collect(api, TE, NS, resource_version="2", n=1, timeout_seconds=5)
        await task
        assert [(e.type, e.resource_version) for e in live] == [("DELETED", "3")]
        assert live[0].object["metadata"]["uid"] == made["metadata"]["uid"]
        assert live[0].object["status"]["state"] == "S"

    run(scenario)


def test_a_watch_ends_at_its_timeout_and_filters_namespaces() -> None:
    async def scenario() -> None:
        api = fake()
        api.server.add_namespace("other")
        await api.create_object(TE, "other", te("a"))
        events = [e async for e in api.watch(TE, NS, resource_version="0", timeout_seconds=0)]
        assert events == []
        everywhere = [e async for e in api.watch(TE, None, timeout_seconds=0)]
        assert [e.object["metadata"]["namespace"] for e in everywhere] == ["other"]

    run(scenario)


def test_a_version_older_than_the_kept_history_is_410() -> None:
    async def scenario() -> None:
        api = fake(history_limit=2)
        for i in range(4):
            await api.create_object(TE, NS, te(f"t{i}"))
        with pytest.raises(ExpiredError) as err:
            await collect(api, TE, NS, resource_version="1", n=1, timeout_seconds=1)
        assert err.value.status == 410
        kept = await collect(api, TE, NS, resource_version="2", n=2, timeout_seconds=1)
        assert [e.resource_version for e in kept] == ["3", "4"]

    run(scenario)


# --------------------------------------------------------------------------- faults and observers


def test_fault_rules_fail_the_nth_matching_call() -> None:
    async def scenario() -> None:
        api = fake()
        await api.create_object(TE, NS, te("a"))
        rule = api.fail("get", TE, nth=2, times=2, status=503)
        assert await api.get_object(TE, NS, "a") is not None
        for _ in range(2):
            with pytest.raises(TransientApiError) as err:
                await api.get_object(TE, NS, "a")
            assert err.value.status == 503 and isinstance(err.value, InfrastructureError)
        assert await api.get_object(TE, NS, "a") is not None
        assert (rule.seen, rule.fired) == (4, 2)

    run(scenario)


def test_a_5xx_on_a_pod_log_raises_and_only_a_404_is_none() -> None:
    async def scenario() -> None:
        api = fake()
        api.server.create(
            "pods", NS, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
        )
        api.server.pod_logs[(NS, "p")] = lambda: "ok"
        api.fail("get", "pods/log", status=500)
        with pytest.raises(TransientApiError):
            await api.pod_log(NS, "p")
        api.fail("get", "pods/log", status=None)
        with pytest.raises(TransientApiError, match="timed out") as err:
            await api.pod_log(NS, "p")
        assert err.value.status is None
        assert await api.pod_log(NS, "p") == "ok"

    run(scenario)


def test_a_lost_answer_after_the_write_took_effect() -> None:
    async def scenario() -> None:
        api = fake()
        api.fail("create", "jobs", status=None, after=True)
        job = {"metadata": {"name": "j"}, "spec": {"template": {"spec": {}}}}
        with pytest.raises(TransientApiError):
            await api.create_job(NS, job)
        retried = await api.create_job(NS, job)  # the retry finds what the first call made
        assert not retried.created and retried.object["metadata"]["name"] == "j"

    run(scenario)


def test_delays_go_through_the_injected_sleep() -> None:
    async def scenario() -> None:
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        api = FakeKubeApi(namespaces=(NS,), sleep=sleep)
        rule = api.delay("list", TE, seconds=2.5)
        await api.list_objects(TE, NS)
        await api.list_objects(TE, NS)
        assert slept == [2.5, 2.5] and rule.fired == 2

    run(scenario)


def test_observers_see_every_call_with_the_servers_status() -> None:
    async def scenario() -> None:
        api = fake()
        calls: list[ApiCall] = []
        remove = api.add_observer(calls.append)
        api.add_observer(lambda call: 1 / 0)  # a broken observer never breaks a call
        await api.create_configmap(NS, cm("c"))
        await api.create_configmap(NS, cm("c"))
        await api.get_configmap(NS, "missing")
        api.fail("delete", "configmaps", status=500)
        with pytest.raises(TransientApiError):
            await api.delete_configmap(NS, "c")
        remove()
        await api.get_configmap(NS, "c")
        assert [(c.verb, c.resource, c.name, c.status, c.write) for c in calls] == [
            ("create", "configmaps", "c", 201, True),
            ("create", "configmaps", "c", 409, True),
            ("get", "configmaps", "c", 200, False),
            ("get", "configmaps", "missing", 404, False),
            ("delete", "configmaps", "c", 500, True),
        ]
        assert all(c.duration_seconds >= 0 and c.namespace == NS for c in calls)

    run(scenario)


def test_two_clients_of_one_server() -> None:
    async def scenario() -> None:
        server = FakeApiServer(namespaces=(NS,))
        operator, user = FakeKubeApi(server), FakeKubeApi(server)
        operator.fail("patch", f"{TE}/status", status=503)
        await user.create_object(TE, NS, te("a"))
        assert await operator.get_object(TE, NS, "a") is not None
        with pytest.raises(TransientApiError):
            await operator.patch_status(TE, NS, "a", {"state": "S"})
        assert await user.patch_status(TE, NS, "a", {"state": "S"}) is not None  # not its fault

    run(scenario)


def test_network_policy_apply_refuses_a_foreign_policy() -> None:
    async def scenario() -> None:
        api = fake()
        owner = (await api.create_object("adapters", NS, te("owner") | {"kind": "Adapter"})).object
        body = {
            "metadata": {"name": "np", "ownerReferences": [{"uid": owner["metadata"]["uid"]}]},
            "spec": {"podSelector": {}},
        }
        api.server.create("networkpolicies", NS, {"metadata": {"name": "np"}, "spec": {"x": 1}})
        with pytest.raises(ForeignObjectError) as err:
            await api.apply_network_policy(NS, body)
        assert err.value.existing["spec"] == {"x": 1}
        assert api.server.get("networkpolicies", NS, "np")["spec"] == {"x": 1}  # left alone

    run(scenario)


def test_lease_replace_needs_the_current_version() -> None:
    async def scenario() -> None:
        api = fake()
        lease = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
        seen = (await api.create_lease(NS, lease)).object
        taken = await api.replace_lease(NS, seen | {"spec": {"holderIdentity": "b"}})
        with pytest.raises(ConflictError):
            await api.replace_lease(NS, seen | {"spec": {"holderIdentity": "c"}})
        assert (
            (await api.get_lease(NS, "l") or {})["spec"] == taken["spec"] == {"holderIdentity": "b"}
        )

    run(scenario)

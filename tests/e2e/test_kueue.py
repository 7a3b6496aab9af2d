"""spec.queueName on a real Kueue: a ClusterQueue with quota for two runner pods runs five
tasks two at a time, and every one completes.

Off by default (marker ``kueue``): it needs Kueue's manager, built from the Go module proxy
(``make kueue-deps``; the cold build is long, then cached) and started on this host by
``hack/kueue/up`` against the local cluster. Turn it on with ``ORCHESTRATOR_E2E_KUEUE=1``.

What is asserted comes from the API server: the Workloads Kueue made for the tasks' Jobs and
the Jobs themselves, watched from before the first task is applied. Events of one resource
arrive in resourceVersion order, so "a Workload holds quota" (Admitted and not Finished) and
"a Job runs" (resumed and not finished) can be counted at every step of that order, and the
count never exceeds the quota.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.operator_harness import (
    ROOT,
    OperatorProcess,
    adapter,
    apply,
    apply_crds,
    demo_patch,
    get_json,
    git_server,
    task_execution,
    wait_for,
)

ENABLED = os.environ.get("ORCHESTRATOR_E2E_KUEUE") == "1"
OFF = (
    "the Kueue e2e is off by default: it needs Kueue's manager, built from the Go module proxy "
    "(make kueue-deps; a long cold build, then cached) and run on this host by hack/kueue/up. "
    "Turn it on with ORCHESTRATOR_E2E_KUEUE=1"
)
pytestmark = [pytest.mark.cluster, pytest.mark.kueue, pytest.mark.skipif(not ENABLED, reason=OFF)]
TASKS = 5
#: Each runner pod asks for this much cpu (its fetch init container asks for 200m, less);
#: the ClusterQueue's cpu quota is QUOTA of them.
POD_CPU_MILLI = 250
QUOTA = 2
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}


@pytest.fixture(scope="module")
def kueue(kube_cluster: Any) -> str:
    if not kube_cluster.local:
        pytest.skip(
            "hack/kueue/up runs Kueue against hack/cluster's local cluster only; this session "
            "uses $KUBECONFIG's cluster"
        )
    up = subprocess.run(
        [str(ROOT / "hack/kueue/up")], capture_output=True, text=True, timeout=3600
    )
    assert up.returncode == 0, up.stderr[-3000:]
    return up.stdout.strip().splitlines()[-1]


class Recorder:
    """Watches one namespaced resource from a resourceVersion and keeps its events in order."""

    def __init__(self, list_fn: Callable[..., Any], *args: Any) -> None:
        from kubernetes import watch

        self.events: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self._stopping = False
        self._watch = watch.Watch()
        first = list_fn(*args)
        since = first["metadata"]["resourceVersion"] if isinstance(first, dict) else (
            first.metadata.resource_version
        )
        self._thread = threading.Thread(
            target=self._run, args=(list_fn, args, since), daemon=True
        )
        self._thread.start()

    def _run(self, list_fn: Callable[..., Any], args: tuple[Any, ...], since: str) -> None:
        try:
            for event in self._watch.stream(
                list_fn, *args, resource_version=since, timeout_seconds=1800
            ):
                obj = event["object"]
                body = obj if isinstance(obj, dict) else obj.to_dict()
                self.events.append((event["type"], body))
        except BaseException as exc:  # reported by the test; not the cut that stop() makes
            if not self._stopping:
                self.error = exc

    def stop(self) -> list[tuple[str, dict[str, Any]]]:
        self._stopping = True
        self._watch.stop()
        self._thread.join(timeout=30)
        return list(self.events)


def _true(conditions: list[dict[str, Any]] | None, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions or [])


def holds_quota(workload: dict[str, Any]) -> bool:
    conditions = (workload.get("status") or {}).get("conditions")
    return _true(conditions, "Admitted") and not _true(conditions, "Finished")


def runs(job: dict[str, Any]) -> bool:
    """A Job resumed and not finished (the python client's snake_case body)."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions = status.get("conditions") or []
    done = any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions
    )
    return spec.get("suspend") is False and not done


def most_at_once(
    events: list[tuple[str, dict[str, Any]]], counts: Callable[[dict[str, Any]], bool]
) -> tuple[int, set[str]]:
    """The most objects for which ``counts`` held at one point of the event order, and every
    object it ever held for."""
    now: set[str] = set()
    ever: set[str] = set()
    most = 0
    for kind, body in events:
        name = body["metadata"]["name"]
        if kind != "DELETED" and counts(body):
            now.add(name)
            ever.add(name)
        else:
            now.discard(name)
        most = max(most, len(now))
    return most, ever


@pytest.fixture
def queues(kubectl: Any, kube_namespace: str, kueue: str) -> Iterator[str]:
    """A ResourceFlavor, a ClusterQueue for this namespace with cpu for QUOTA runner pods, and
    the namespace's LocalQueue ``tasks`` (its name is what the tasks' queueName says)."""
    name = f"orch-e2e-{uuid.uuid4().hex[:8]}"
    flavor = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ResourceFlavor",
        "metadata": {"name": name},
    }
    cluster_queue = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": kube_namespace}
            },
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory", "ephemeral-storage"],
                    "flavors": [
                        {
                            "name": name,
                            "resources": [
                                {"name": "cpu", "nominalQuota": f"{QUOTA * POD_CPU_MILLI}m"},
                                {"name": "memory", "nominalQuota": "64Gi"},
                                {"name": "ephemeral-storage", "nominalQuota": "1Ti"},
                            ],
                        }
                    ],
                }
            ],
        },
    }
    local_queue = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LocalQueue",
        "metadata": {"name": "tasks"},
        "spec": {"clusterQueue": name},
    }
    kubectl("apply", "-f", "-", input=json.dumps(flavor))
    kubectl("apply", "-f", "-", input=json.dumps(cluster_queue))
    apply(kubectl, kube_namespace, local_queue)

    def active() -> bool:
        cq = get_json(kubectl, "clusterqueue", name)
        conditions = (cq.get("status") or {}).get("conditions")
        return _true(conditions, "Active")

    wait_for(active, 60, f"ClusterQueue {name} to be Active", lambda: kueue_log())
    try:
        yield "tasks"
    finally:
        kubectl("delete", "namespace", kube_namespace, "--wait=true", "--timeout=120s", check=False)
        kubectl("delete", "clusterqueue", name, "--wait=false", check=False)
        kubectl("delete", "resourceflavor", name, "--wait=false", check=False)


def kueue_log(chars: int = 3000) -> str:
    path = os.path.join(os.environ.get("KUEUE_STATE", "/tmp/orchestrator-kueue"), "kueue.log")
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def test_a_cluster_queue_with_quota_for_two_runs_the_tasks_two_at_a_time(
    kube_cluster: Any,
    kubectl: Any,
    kube_api: Any,
    kube_namespace: str,
    queues: str,
    project_image: str,
    image_pull_policy: str,
    tmp_path: Any,
) -> None:
    from kubernetes import client

    ns = kube_namespace
    apply_crds(kubectl)
    repo = git_server(kubectl, ns, project_image, image_pull_policy)
    git_ip = get_json(kubectl, "pod", "git-server", "-n", ns)["status"]["podIP"]
    apply(
        kubectl,
        ns,
        adapter(
            "patch",
            "patch",
            retry={"maxAttempts": 1},
            resources={"cpu": f"{POD_CPU_MILLI}m", "memory": "256Mi"},
            egress=[{"cidr": f"{git_ip}/32", "ports": [9418]}],
        ),
    )
    custom = client.CustomObjectsApi(kube_api)
    batch = client.BatchV1Api(kube_api)
    workloads = Recorder(custom.list_namespaced_custom_object, GROUP, VERSION, ns, "workloads")
    jobs = Recorder(batch.list_namespaced_job, ns)
    operator = OperatorProcess(
        kubeconfig=kube_cluster.kubeconfig,
        namespace=ns,
        image=project_image,
        pull_policy=image_pull_policy,
        workdir=tmp_path / "operator",
    )
    operator.start()
    names = [f"queued-{i}" for i in range(TASKS)]
    try:
        for name in names:
            obj = task_execution(
                name,
                repo,
                "patch",
                task={"prompt": "Add mul.", "patch": demo_patch("add-multiply")},
                queueName=queues,
            )
            apply(kubectl, ns, obj)

        def all_done() -> list[dict[str, Any]] | None:
            items = get_json(kubectl, "taskexecutions", "-n", ns).get("items", [])
            states = [(i.get("status") or {}).get("state") for i in items]
            return items if len(items) == TASKS and all(s in TERMINAL for s in states) else None

        def debug() -> str:
            items = get_json(kubectl, "taskexecutions", "-n", ns).get("items", [])
            short = [
                (i["metadata"]["name"], (i.get("status") or {}).get("state"),
                 (i.get("status") or {}).get("reason"), (i.get("status") or {}).get("message"))
                for i in items
            ]
            wl = kubectl("get", "workloads", "-n", ns, check=False).stdout
            return f"{short}\n{wl}\noperator:\n{operator.tail()}\nkueue:\n{kueue_log()}"

        done = wait_for(all_done, 900, f"{TASKS} queued tasks to finish", debug)
    finally:
        operator.stop()
        workload_events = workloads.stop()
        job_events = jobs.stop()
    assert workloads.error is None and jobs.error is None, (workloads.error, jobs.error)

    for item in done:
        status = item["status"]
        assert status["state"] == "COMPLETED", (item["metadata"]["name"], status)
        assert status["attempt"] == 1 and status["gate"]["passed"]

    # every Job was created suspended, for the LocalQueue, and Kueue made a Workload for it
    created = [body for kind, body in job_events if kind == "ADDED"]
    assert len(created) == 2 * TASKS  # an adapter and a gate Job per task
    for body in created:
        assert body["spec"]["suspend"] is True, body["metadata"]["name"]
        assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queues

    most_admitted, admitted = most_at_once(workload_events, holds_quota)
    most_running, ran = most_at_once(job_events, runs)
    assert len(admitted) == 2 * TASKS, sorted(admitted)
    assert len(ran) == 2 * TASKS, sorted(ran)
    # the quota bound: never more than two at once, and two at once did happen
    assert most_admitted == QUOTA, most_admitted
    assert most_running <= QUOTA, most_running
    # while two held the quota, others waited (Kueue, not the operator, held them back)
    waiting = [
        body
        for _, body in workload_events
        if not holds_quota(body)
        and any(
            c.get("type") == "QuotaReserved" and c.get("status") == "False"
            for c in (body.get("status") or {}).get("conditions") or []
        )
    ]
    assert waiting, "no Workload ever waited for quota"
    print(
        f"\nkueue e2e: {len(admitted)} Workloads admitted, at most {most_admitted} at once "
        f"(quota {QUOTA}); {len(ran)} Jobs ran, at most {most_running} at once; "
        f"{len(workload_events)} Workload and {len(job_events)} Job events"
    )

"""Task identity on a real cluster: names are labels, not keys.

A TaskExecution deleted and applied again is a new task with its own history; the same name
in two namespaces is two tasks, each with its own DB row, ledger entry, patch and breaker.
Asserted on what the API server, the database and the ledger hold.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine
from core.db.tables import Adapter, PatchHistory, Task
from core.engine.evidence import local_store, read_all
from core.engine.patch_ledger import verify
from core.models import LedgerEntry
from tests.e2e.operator_harness import (
    ROOT,
    OperatorProcess,
    adapter,
    apply,
    demo_patch,
    get_json,
    git_server,
    task_execution,
    wait_for,
)

pytestmark = pytest.mark.cluster

TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}


@pytest.fixture(scope="module")
def env(
    kube_cluster, kubectl, project_image, image_pull_policy, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/taskexecutions.orchestrator.dev",
        "crd/adapters.orchestrator.dev",
    )
    suffix = uuid.uuid4().hex[:6]
    first, second = f"e2e-id-a-{suffix}", f"e2e-id-b-{suffix}"
    for ns in (first, second):
        kubectl("create", "namespace", ns)
        wait_for(
            lambda ns=ns: kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
            60,
            "the default ServiceAccount",
        )
    repo = git_server(kubectl, first, project_image, image_pull_policy)
    # NetworkPolicy sees the connection after the Service's DNAT: name the git server pod.
    git_ip = get_json(kubectl, "pod", "git-server", "-n", first)["status"]["podIP"]
    for ns in (first, second):
        apply(
            kubectl,
            ns,
            adapter(
                "patch",
                "patch",
                retry={"maxAttempts": 1},
                egress=[{"cidr": f"{git_ip}/32", "ports": [9418]}],
            ),
        )
    workdir = tmp_path_factory.mktemp("identity")
    operator = OperatorProcess(
        kubeconfig=kube_cluster.kubeconfig,
        namespace=first,
        also_namespaces=(second,),
        image=project_image,
        pull_policy=image_pull_policy,
        workdir=workdir,
    )
    operator.start()
    try:
        yield {"a": first, "b": second, "repo": repo, "workdir": workdir, "operator": operator}
    finally:
        operator.stop()
        print(f"\noperator log tail:\n{operator.tail()}")
        for ns in (first, second):
            kubectl("delete", "namespace", ns, "--wait=false", check=False)


def finished(kubectl, env, ns: str, name: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        obj = get_json(kubectl, "taskexecution", name, "-n", ns)
        return obj if obj.get("status", {}).get("state") in TERMINAL else None

    result: dict[str, Any] = wait_for(
        done, 300, f"{ns}/{name} to finish", lambda: env["operator"].tail()
    )
    return result


def rows(env) -> tuple[list[Task], list[PatchHistory], list[Adapter]]:
    engine = make_engine(default_url(env["workdir"]))
    with Session(engine) as s:
        out = (
            list(s.scalars(select(Task))),
            list(s.scalars(select(PatchHistory).order_by(PatchHistory.seq))),
            list(s.scalars(select(Adapter))),
        )
    engine.dispose()
    return out


def ledger(env) -> list[LedgerEntry]:
    path = env["workdir"] / ".state/patch_ledger.jsonl"
    return [LedgerEntry.model_validate_json(x) for x in path.read_text().splitlines()]


def test_a_deleted_name_applied_again_is_a_new_task_with_its_own_history(kubectl, env) -> None:
    ns = env["a"]
    manifest = task_execution(
        "again",
        env["repo"],
        "patch",
        task={"prompt": "Add mul.", "patch": demo_patch("add-multiply")},
    )
    apply(kubectl, ns, manifest)
    first = finished(kubectl, env, ns, "again")
    assert first["status"]["state"] == "COMPLETED", first["status"]
    kubectl("delete", "tex", "again", "-n", ns, "--wait=true", "--timeout=60s")

    apply(kubectl, ns, manifest)
    second = finished(kubectl, env, ns, "again")
    assert second["status"]["state"] == "COMPLETED", second["status"]
    uids = {first["metadata"]["uid"], second["metadata"]["uid"]}
    assert len(uids) == 2
    assert second["status"]["attempt"] == 1 and len(second["status"]["attempts"]) == 1

    tasks, history, _ = rows(env)
    mine = [t for t in tasks if t.task_id == "again" and t.scope == ns]
    assert {t.uid for t in mine} == uids
    assert [t.status for t in mine] == ["COMPLETED", "COMPLETED"]
    assert all(t.attempts == 1 for t in mine)
    entries = [e for e in ledger(env) if e.task_id == "again" and e.scope == ns]
    assert {e.task_uid for e in entries} == uids and len(entries) == 2
    assert {(h.task_uid, h.attempt) for h in history if h.task_id == "again"} == {
        (uid, 1) for uid in uids
    }


def test_the_same_name_in_two_namespaces_is_two_tasks(kubectl, env) -> None:
    patches = {env["a"]: demo_patch("add-multiply"), env["b"]: demo_patch("update-logo")}
    for ns, patch in patches.items():
        apply(
            kubectl,
            ns,
            task_execution("twin", env["repo"], "patch", task={"prompt": "x", "patch": patch}),
        )
    done = {ns: finished(kubectl, env, ns, "twin") for ns in patches}
    for obj in done.values():
        assert obj["status"]["state"] == "COMPLETED", obj["status"]
    sha = {ns: obj["status"]["diff"]["sha256"] for ns, obj in done.items()}
    assert len(set(sha.values())) == 2

    tasks, history, adapters = rows(env)
    twins = {t.scope: t for t in tasks if t.task_id == "twin"}
    assert set(twins) == set(patches)
    assert {ns: t.uid for ns, t in twins.items()} == {
        ns: obj["metadata"]["uid"] for ns, obj in done.items()
    }
    recorded = {h.scope: h for h in history if h.task_id == "twin"}
    assert {ns: h.diff_sha256 for ns, h in recorded.items()} == sha
    for ns, h in recorded.items():  # the full patch is kept, under its own hash
        assert h.patch_ref is not None
        assert (
            hashlib.sha256(read_all(local_store(env["workdir"]), h.patch_ref)).hexdigest()
            == sha[ns]
        )
    entries = {e.scope: e for e in ledger(env) if e.task_id == "twin"}
    assert {ns: e.diff_sha256 for ns, e in entries.items()} == sha
    # one Adapter name, one breaker per namespace
    assert {(a.scope, a.id) for a in adapters if a.id == "patch"} == {
        (env["a"], "patch"),
        (env["b"], "patch"),
    }
    report = verify(
        env["workdir"] / ".state/patch_ledger.jsonl",
        local_store(env["workdir"]),
        [(h.seq, h.entry_hash) for h in history],
    )
    assert report.ok, report.problems

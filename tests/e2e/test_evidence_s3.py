"""The S3 evidence backend on a real cluster against a real S3-compatible server.

``hack/s3/up`` starts SeaweedFS's S3 gateway (built from the Go module proxy, cached) on the
node address, where pods reach it without traffic leaving the machine. The operator runs
with ``ORCHESTRATOR_EVIDENCE_BACKEND=s3`` and the server's keys; runner pods get presigned
GET URLs and presigned POST forms only. Shown here: tasks complete with their full diffs
in the bucket under their sha256 and nothing left in ``incoming/``; the bucket's lifecycle
rules are the operator's; no Job carries a credential; the server itself refuses a grant
used for another key or for more bytes than it names; ``orchestrator export`` reads the
bucket and the export applies.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core.engine.evidence_grants import Grant
from core.engine.evidence_s3 import s3_client
from tests.e2e.operator_harness import (
    BASE_COMMIT,
    DEMO,
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

pytestmark = pytest.mark.cluster

ACCESS_KEY = "orchestrator-e2e"  # hack/s3/up's test-only identity
SECRET_KEY = "orchestrator-e2e-secret-key"
TWO_MIB = (
    "import pathlib\n"
    "pathlib.Path('data').mkdir(exist_ok=True)\n"
    "pathlib.Path('data/two.txt').write_text(''.join('row %08d\\n' % i for i in range(160000)))\n"
)


@pytest.fixture(scope="module")
def s3_endpoint(kube_cluster) -> str:
    if not kube_cluster.local:
        # an external cluster ($KUBECONFIG) cannot reach the S3 server hack/s3/up starts on this
        # machine's node address of hack/cluster; CI and `make test` use hack/cluster
        pytest.skip("needs hack/cluster: hack/s3/up serves on its node address only")
    out = subprocess.run(
        [str(ROOT / "hack/s3/up")], capture_output=True, text=True, timeout=3000, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def env(
    kube_cluster, kubectl, kube_api, project_image, image_pull_policy, tmp_path_factory, s3_endpoint
) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(s3_endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    s3.create_bucket(Bucket=bucket)
    apply_crds(kubectl)
    namespace = f"e2e-s3-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        60,
        "the default ServiceAccount",
    )
    repo = git_server(kubectl, namespace, project_image, image_pull_policy)
    git_ip = get_json(kubectl, "pod", "git-server", "-n", namespace)["status"]["podIP"]
    once: dict[str, Any] = {"retry": {"maxAttempts": 1}}
    for obj in (
        adapter("patch", "patch", egress=[{"cidr": f"{git_ip}/32", "ports": [9418]}], **once),
        adapter("two", "process", command=["{python}", "-c", TWO_MIB], **once),
    ):
        apply(kubectl, namespace, obj)
    settings = {
        "ORCHESTRATOR_EVIDENCE_BACKEND": "s3",
        "ORCHESTRATOR_S3_ENDPOINT": s3_endpoint,
        "ORCHESTRATOR_S3_BUCKET": bucket,
        "ORCHESTRATOR_S3_PREFIX": "evidence",
        "ORCHESTRATOR_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "ORCHESTRATOR_S3_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    workdir = tmp_path_factory.mktemp("operator-s3")
    operator = OperatorProcess(
        kubeconfig=kube_cluster.kubeconfig,
        namespace=namespace,
        image=project_image,
        pull_policy=image_pull_policy,
        workdir=workdir,
        env=settings,
    )
    operator.start()
    try:
        yield {
            "ns": namespace,
            "repo": repo,
            "operator": operator,
            "workdir": workdir,
            "s3": s3,
            "bucket": bucket,
            "settings": settings,
            "tmp": tmp_path_factory.mktemp("s3-data"),
        }
    finally:
        operator.stop()
        print(f"\noperator log tail:\n{operator.tail()}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        # the bucket goes too: SeaweedFS gives each bucket volumes of its own, and a server
        # that outlives many runs would otherwise run out of them
        listed = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in listed:
            for obj in page.get("Contents") or []:
                s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)


def run_task(kubectl, env, name: str, adapter_name: str, task: dict[str, Any]) -> dict[str, Any]:
    apply_crds(kubectl)  # the 1 MiB limit and patchFrom are this checkout's (a shared cluster)
    apply(kubectl, env["ns"], task_execution(name, env["repo"], adapter_name, task=task))

    def done() -> dict[str, Any] | None:
        status = get_json(kubectl, "taskexecution", name, "-n", env["ns"]).get("status", {})
        return status if status.get("state") in ("COMPLETED", "FAILED", "TIMEOUT") else None

    def debug() -> str:
        obj = get_json(kubectl, "taskexecution", name, "-n", env["ns"])
        pods = kubectl("get", "pods,jobs", "-n", env["ns"], check=False).stdout
        return f"{pods}\n{json.dumps(obj.get('status'), indent=1)}\n{env['operator'].tail()}"

    status: dict[str, Any] = wait_for(done, 420, f"{name} to finish", debug)
    assert status["state"] == "COMPLETED", debug()
    return status


def keys(env, prefix: str) -> list[str]:
    listed = env["s3"].list_objects_v2(Bucket=env["bucket"], Prefix=f"evidence/{prefix}")
    return [o["Key"] for o in listed.get("Contents") or []]


def test_tasks_complete_with_their_diffs_in_the_bucket(kubectl, env) -> None:
    patch = demo_patch("add-multiply")
    status = run_task(kubectl, env, "s3-patch", "patch", {"prompt": "p", "patch": patch})
    assert status["gate"]["passed"] is True
    two = run_task(kubectl, env, "s3-two-mib", "two", {"prompt": "two"})
    for done in (status, two):
        diff = done["diff"]
        key = f"evidence/patches/{diff['sha256']}.diff.gz"
        assert diff["patchRef"] == key.removeprefix("evidence/")
        body = env["s3"].get_object(Bucket=env["bucket"], Key=key)["Body"].read()
        assert hashlib.sha256(gzip.decompress(body)).hexdigest() == diff["sha256"]
    assert two["diff"]["bytes"] > 2 * 1024 * 1024
    assert keys(env, "incoming/") == []  # every upload adopted or discarded
    assert keys(env, "requests/")  # the requests stay until the lifecycle rule expires them

    # `orchestrator export` reads the bucket (the operator's settings) and the copy applies
    out = env["tmp"] / "two.diff"
    cmd = [sys.executable, "-m", "core.cli", "export", "--workdir", str(env["workdir"]),
           "--run", "e2e", "--task", "s3-two-mib", "-o", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                         env={**os.environ, **env["settings"]})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == two["diff"]["sha256"]
    tree = env["tmp"] / "fresh"
    subprocess.run(["git", "clone", "-q", str(DEMO / "repos/calc.bundle"), str(tree)], check=True)
    subprocess.run(["git", "-C", str(tree), "checkout", "-q", BASE_COMMIT], check=True)
    subprocess.run(["git", "-C", str(tree), "apply", "--index", str(out)], check=True)


def test_the_bucket_carries_the_operators_lifecycle_rules(env) -> None:
    rules = env["s3"].get_bucket_lifecycle_configuration(Bucket=env["bucket"])["Rules"]
    by_prefix = {(r.get("Filter") or {}).get("Prefix", r.get("Prefix")): r for r in rules}
    for prefix in ("evidence/incoming/", "evidence/requests/"):
        assert by_prefix[prefix]["Status"] == "Enabled"
        assert by_prefix[prefix]["Expiration"]["Days"] == 8


def test_pods_hold_no_credentials_and_the_server_enforces_their_grants(kubectl, env) -> None:
    jobs = get_json(kubectl, "jobs", "-n", env["ns"], "-l", "orchestrator.dev/role=adapter")
    assert jobs["items"], "the tasks above made Jobs"
    text = json.dumps(jobs)
    assert SECRET_KEY not in text and "AWS_SECRET" not in text and "SECRET_ACCESS" not in text
    job = next(j for j in jobs["items"] if "s3-two-mib" in j["metadata"]["name"])
    container = job["spec"]["template"]["spec"]["containers"][0]
    grant = Grant.model_validate_json(
        next(e["value"] for e in container["env"] if e["name"] == "ORCHESTRATOR_GRANT")
    )
    assert grant.downloads == {}  # the runner container only uploads
    upload = grant.uploads["diff"]
    assert upload.method == "POST" and "x-amz-signature" in upload.fields
    # the same signed form for another key: refused by the server
    other = {**upload.fields, "key": upload.fields["key"].replace("diff.gz", "other.gz")}
    refused = httpx.post(upload.url, data=other, files={"file": ("f", b"x")}, timeout=30)
    assert refused.status_code == 403, refused.text
    # more bytes than the grant names: refused too (content-length-range)
    log = grant.uploads["log"]
    too_big = b"x" * (log.max_bytes + 1)
    refused = httpx.post(log.url, data=log.fields, files={"file": ("f", too_big)}, timeout=60)
    assert refused.status_code in (400, 403), refused.text
    assert not any(k.endswith("other.gz") for k in keys(env, "incoming/"))

"""The ``api`` adapter kind on the cluster, and its failures escalated as Warning Events.

The operator runs as a real ``kopf run`` process; the call to the model API is made by the
runner in the adapter pod, to a scripted OpenAI Chat Completions server pod
(tests/e2e/llm_server.py, the project image's python), through the Adapter's egress
NetworkPolicy (the local cluster enforces NetworkPolicy: the policy names the server's *pod*
address) with the API key from a Kubernetes Secret (``spec.env[].secretKeyRef`` named by
``api.apiKeyEnv``). What is asserted is what the server, the API server, the database and
the ledger saw.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine
from core.db.tables import Adapter as AdapterRow
from core.db.tables import Escalation, ExecutionLog, Task
from core.engine.evidence import local_store, read_all
from tests.e2e.llm_server import PORT, server_pod
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

KEY = "sk-e2e-" + uuid.uuid4().hex
RETRY_AFTER = 3
SMALL = {"cpu": "250m", "memory": "256Mi"}
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}


def api_adapter(name: str, scenario: str, egress: list[dict[str, Any]], **spec: Any) -> dict:
    return adapter(
        name,
        "api",
        api={
            "protocol": "openai-chat",
            "url": f"http://{{server}}:{PORT}/{scenario}/v1",
            "model": "e2e-model",
            "apiKeyEnv": "LLM_API_KEY",
            "connectTimeoutSeconds": 5,
            "readTimeoutSeconds": 60,
        },
        env=[{"name": "LLM_API_KEY", "secretKeyRef": {"name": "llm-key", "key": "api-key"}}],
        egress=egress,
        resources=SMALL,
        **spec,
    )


@pytest.fixture(scope="module")
def env(
    kube_cluster, kubectl, kube_api, project_image, image_pull_policy, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/adapters.orchestrator.dev")
    namespace = f"e2e-api-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube_api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
    )
    wait_for(
        lambda: kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
        60,
        "the default ServiceAccount",
    )
    repo = git_server(kubectl, namespace, project_image, image_pull_policy)
    apply(
        kubectl,
        namespace,
        server_pod(
            "llm", project_image, image_pull_policy, demo_patch("add-multiply"), RETRY_AFTER
        ),
    )
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/llm", "--timeout=180s",
            timeout=200)  # fmt: skip
    kubectl(
        "create", "secret", "generic", "llm-key", "-n", namespace, f"--from-literal=api-key={KEY}"
    )
    git_ip = get_json(kubectl, "pod", "git-server", "-n", namespace)["status"]["podIP"]
    llm_ip = get_json(kubectl, "pod", "llm", "-n", namespace)["status"]["podIP"]
    # policies see connections after a Service's DNAT: the pods' own addresses
    git = {"cidr": f"{git_ip}/32", "ports": [9418]}
    llm = {"cidr": f"{llm_ip}/32", "ports": [PORT]}
    once = {"maxAttempts": 1}
    for obj in (
        api_adapter("llm", "ok", [git, llm], retry=once),
        api_adapter(
            "llm-throttled",
            "throttle",
            [git, llm],
            retry={"maxAttempts": 2, "backoffInitialSeconds": 0.1, "jitterSeconds": 0},
            breaker={"failureThreshold": 1, "cooldownSeconds": 3600},
        ),
        api_adapter("llm-malformed", "malformed", [git, llm], retry={"maxAttempts": 2}),
        api_adapter("llm-fallback", "fallback", [git, llm], retry=once),
        api_adapter("llm-walled", "walled", [git], retry=once),  # the API is not in its egress
        api_adapter(
            "llm-broken",
            "broken",
            [git, llm],
            retry=once,
            breaker={"failureThreshold": 1, "cooldownSeconds": 3600},
        ),
    ):
        obj["spec"]["api"]["url"] = obj["spec"]["api"]["url"].format(server=llm_ip)
        apply(kubectl, namespace, obj)
    workdir = tmp_path_factory.mktemp("operator-api")
    operator = OperatorProcess(
        kubeconfig=kube_cluster.kubeconfig,
        namespace=namespace,
        image=project_image,
        pull_policy=image_pull_policy,
        workdir=workdir,
        env={"ORCHESTRATOR_BREAKER_CHECK_SECONDS": "5"},
    )
    operator.start()
    # every task at once: the operator runs them side by side, each test waits for its own
    tasks = {
        "api-ok": ("llm", []),
        "api-throttled": ("llm-throttled", []),
        "api-malformed": ("llm-malformed", [{"name": "llm-fallback"}]),
        "api-walled": ("llm-walled", []),
        "api-broken": ("llm-broken", []),
    }
    for name, (adapter_name, fallbacks) in tasks.items():
        obj = task_execution(
            name,
            repo,
            adapter_name,
            task={"prompt": "Add a function mul(a, b) to calc/ops.py.",
                  "targetPaths": ["calc/ops.py"]},
            fallbackAdapterRefs=fallbacks,
            timeoutSeconds=600,
        )  # fmt: skip
        apply(kubectl, namespace, obj)
    try:
        yield {"ns": namespace, "operator": operator, "workdir": workdir}
    finally:
        operator.stop()
        print(f"\noperator log tail:\n{operator.tail()}")
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def finished(kubectl, env, name: str, timeout: float = 420) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        obj = get_json(kubectl, "taskexecution", name, "-n", env["ns"])
        return obj if (obj.get("status") or {}).get("state") in TERMINAL else None

    def debug() -> str:
        obj = get_json(kubectl, "taskexecution", name, "-n", env["ns"])
        return json.dumps(obj.get("status"), indent=1) + "\n" + env["operator"].tail()

    found: dict[str, Any] = wait_for(done, timeout, f"{name} to finish", debug)
    return found["status"]


def server_log(kubectl, env, scenario: str) -> list[dict[str, Any]]:
    out = kubectl("logs", "llm", "-n", env["ns"]).stdout
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return [x for x in lines if x["scenario"] == scenario]


@contextmanager
def db(env) -> Iterator[Session]:
    """A session on the operator's database; its connections closed afterwards (no reader of
    this process keeps the SQLite file open across an operator's crash and restart)."""
    engine = make_engine(default_url(env["workdir"]))
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


def task_row(env, task_id: str) -> Task:
    with db(env) as s:
        return s.scalars(select(Task).where(Task.task_id == task_id)).one()


def test_the_call_is_made_from_the_pod_and_its_diff_completes_the_task(kubectl, env) -> None:
    status = finished(kubectl, env, "api-ok")
    assert status["state"] == "COMPLETED", status
    assert status["attempt"] == 1 and status["adapter"] == "llm"
    assert status["gate"]["passed"] and status["diff"]["insertions"] == 8
    # the server got one call, authenticated with the Secret's key
    [call] = server_log(kubectl, env, "ok")
    assert call["authorization"] == f"Bearer {KEY}" and call["model"] == "e2e-model"
    assert call["path"] == "/ok/v1/chat/completions"
    # the recorded patch is the server's diff, as git applied it in the pod
    lines = (env["workdir"] / ".state/patch_ledger.jsonl").read_text().splitlines()
    entry = next(e for e in map(json.loads, lines) if e["task_id"] == "api-ok")
    patch = read_all(local_store(env["workdir"]), entry["patch_ref"]).decode()
    assert "+def mul(a, b):" in patch and entry["diff_sha256"] == status["diff"]["sha256"]
    # token usage: reported by the runner, carried by the operator's evidence into the record
    assert entry["result"]["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 40,
        "total_tokens": 160,
    }
    with db(env) as s:
        completed = s.scalars(
            select(ExecutionLog).where(
                ExecutionLog.task_id == "api-ok", ExecutionLog.event == "TASK_COMPLETED"
            )
        ).one()
    assert completed.payload["usage"]["total_tokens"] == 160
    url = f"http://127.0.0.1:{env['operator'].metrics_port}/metrics"
    metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'adapter_tokens_total{adapter="llm",type="prompt"}' in metrics


def test_429_then_success_on_attempt_2_after_the_servers_delay_breaker_untouched(
    kubectl, env
) -> None:
    status = finished(kubectl, env, "api-throttled")
    assert status["state"] == "COMPLETED", status
    first, second = status["attempts"]
    assert first["failureClass"] == "infrastructure"
    assert "HTTP 429" in first["message"] and f"Retry-After {RETRY_AFTER}s" in first["message"]
    assert second["state"] == "COMPLETED" and second["adapter"] == "llm-throttled"
    # the retry honoured the server's delay (the policy alone would wait 0.1 s): the server
    # measured the gap between its 429 and the second request
    calls = server_log(kubectl, env, "throttle")
    assert [c["status"] for c in calls] == [429, 200]
    assert calls[1]["received"] - calls[0]["answered"] >= RETRY_AFTER
    row = task_row(env, "api-throttled")
    assert row.result["attempts"][0]["backoff_seconds"] == RETRY_AFTER
    # not counted against the adapter: a breaker with threshold 1 stayed closed, untouched
    with db(env) as s:
        breaker = s.get(AdapterRow, (env["ns"], "llm-throttled"))
    assert breaker is not None
    assert breaker.breaker_state == "CLOSED" and breaker.breaker_failures == 0
    adp = get_json(kubectl, "adapter", "llm-throttled", "-n", env["ns"])
    assert (adp.get("status") or {}).get("breakerState", "CLOSED") == "CLOSED"


def test_a_malformed_reply_falls_back_to_the_next_adapter(kubectl, env) -> None:
    status = finished(kubectl, env, "api-malformed")
    assert status["state"] == "COMPLETED", status
    first, second = status["attempts"]
    assert first["adapter"] == "llm-malformed" and first["failureClass"] == "adapter_error"
    assert "carries no unified diff" in first["message"]
    assert second["adapter"] == "llm-fallback" and second["state"] == "COMPLETED"
    assert status["adapter"] == "llm-fallback"
    assert [c["status"] for c in server_log(kubectl, env, "malformed")] == [200]
    assert [c["status"] for c in server_log(kubectl, env, "fallback")] == [200]


def test_the_adapters_egress_policy_is_what_lets_the_call_out(kubectl, env) -> None:
    """The same server, the same key: without the API in its egress the call cannot leave."""
    status = finished(kubectl, env, "api-walled")
    assert status["state"] == "FAILED" and status["failureClass"] == "adapter_error", status
    assert "cannot reach the API" in status["message"]
    assert server_log(kubectl, env, "walled") == []  # never reached the server


def test_the_key_is_in_no_file_of_the_operator(kubectl, env) -> None:
    for name in ("api-ok", "api-throttled", "api-malformed", "api-walled", "api-broken"):
        finished(kubectl, env, name)
    for path in Path(env["workdir"]).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_breaker_open_escalates_once_as_warning_events_also_across_a_restart(kubectl, env) -> None:
    status = finished(kubectl, env, "api-broken")
    assert status["state"] == "FAILED" and "HTTP 500" in status["message"]

    def rows() -> list[Escalation]:
        with db(env) as s:
            return list(s.scalars(select(Escalation).where(Escalation.adapter_id == "llm-broken")))

    def escalation_events(kind: str, name: str) -> list[dict[str, Any]]:
        items = get_json(kubectl, "events", "-n", env["ns"]).get("items", [])
        return [
            e
            for e in items
            if e["reason"] == "ESCALATION"
            and e["involvedObject"]["kind"] == kind
            and e["involvedObject"]["name"] == name
        ]

    posted = wait_for(
        lambda: [r for r in rows() if r.reason == "breaker_open" and r.event_posted_at],
        120,
        "the breaker_open escalation to be posted",
        env["operator"].tail,
    )
    [row] = posted
    assert row.scope == env["ns"] and row.task_id == "api-broken"
    [on_adapter] = escalation_events("Adapter", "llm-broken")
    assert on_adapter["type"] == "Warning" and on_adapter["action"] == "breaker_open"
    assert "circuit breaker of adapter llm-broken opened" in on_adapter["message"]
    [on_task] = [e for e in escalation_events("TaskExecution", "api-broken")
                 if e["action"] == "breaker_open"]  # fmt: skip
    assert (
        on_task["involvedObject"]["uid"]
        == get_json(kubectl, "tex", "api-broken", "-n", env["ns"])["metadata"]["uid"]
    )
    described = kubectl("describe", "adp", "llm-broken", "-n", env["ns"]).stdout
    assert "ESCALATION" in described and "breaker_open" in described

    # the operator crashes after posting and before stamping the row (the worst moment):
    # the next leader's first pass posts it again, the API server answers 409 (the Event's
    # name is fixed), the row is stamped, and there is still exactly one Event per object
    before = {e["metadata"]["uid"]: e.get("count") for e in [on_adapter, on_task]}
    operator: OperatorProcess = env["operator"]
    operator.kill()
    with db(env) as s, s.begin():
        s.execute(
            update(Escalation)
            .where(Escalation.escalation_key == row.escalation_key)
            .values(event_posted_at=None)
        )
    operator.start()

    def stamped() -> list[Escalation]:
        return [r for r in rows() if r.escalation_key == row.escalation_key and r.event_posted_at]

    def debug() -> str:
        raw = sqlite3.connect(str(env["workdir"] / "orchestrator.db"))
        found = raw.execute("SELECT escalation_key, event_posted_at FROM escalations").fetchall()
        raw.close()
        return f"rows (sqlite3): {found}\n{operator.tail()}"

    wait_for(stamped, 120, "the restarted operator to post the unstamped escalation", debug)
    # its names were taken (a 409): the very same Event objects, neither replaced nor counted up
    after_adapter = escalation_events("Adapter", "llm-broken")
    breaker_open_on_task = [
        e for e in escalation_events("TaskExecution", "api-broken") if e["action"] == "breaker_open"
    ]
    assert len(after_adapter) == 1 and len(breaker_open_on_task) == 1
    assert {
        e["metadata"]["uid"]: e.get("count") for e in after_adapter + breaker_open_on_task
    } == before
    assert len([r for r in rows() if r.reason == "breaker_open"]) == 1

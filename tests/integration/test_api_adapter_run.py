"""The `api` adapter kind on the embedded backend, against a real local HTTP server.

The server (tests/http_server.py) listens on 127.0.0.1 and answers with scripted replies in
the OpenAI Chat Completions or the webhook protocol; the executor runs for real (git
worktrees, the test gate, SQLite, the ledger). Backoffs are slept for real: the 429 test
shows the retry came after the server's Retry-After.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.database import default_url, make_engine, upgrade
from core.db.tables import Adapter, ExecutionLog
from core.engine.evidence import local_store, read_all
from core.engine.executor import ExecutorConfig, build_executor
from core.engine.monitoring.metrics import Metrics
from core.engine.monitoring.progress import SilentProgress
from core.errors import EntryContractError
from core.models import FailureClass, TaskState
from tests.http_server import Reply, chat_reply, scripted_server
from tests.workdirs import make_workdir

KEY = "sk-test-0123456789abcdef"
CALC = "def add(a, b):\n    return a + b\n"
GOOD_DIFF = """diff --git a/calc.py b/calc.py
--- a/calc.py
+++ b/calc.py
@@ -1,2 +1,5 @@
 def add(a, b):
     return a + b
+
+def multiply(a, b):
+    return a * b
"""
#: Context that is not in calc.py: git apply refuses it.
BAD_DIFF = """--- a/calc.py
+++ b/calc.py
@@ -1,2 +1,3 @@
 def subtract(a, b):
     return a - b
+# never applies
"""
GATE = [
    {
        "name": "multiply",
        "command": ["{python}", "-c", "import calc; assert calc.multiply(3, 4) == 12"],
    }
]
TASK = {
    "task_id": "add-multiply",
    "title": "Add multiply",
    "prompt": "Add a function multiply(a, b) to calc.py.",
    "target_paths": ["calc.py"],
    "gate": GATE,
}


def api_adapter(url: str, protocol: str = "openai-chat", **extra: object) -> dict:
    api = {"protocol": protocol, "url": url, "api_key_env": "TEST_API_KEY"}
    if protocol == "openai-chat":
        api["model"] = "test-model"
    api.update(extra.pop("api", {}))  # type: ignore[arg-type]
    return {"id": "llm", "kind": "api", "api": api, **extra}


def execute(workdir: Path, run_id: str, env: dict[str, str] | None = None):
    upgrade(default_url(workdir))
    metrics = Metrics()
    executor = build_executor(
        ExecutorConfig(run_id=run_id, workdir=workdir),
        progress=SilentProgress(),
        metrics=metrics,
        env={"TEST_API_KEY": KEY} if env is None else env,
    )
    return executor.run(), metrics


def no_key_anywhere(workdir: Path) -> None:
    """The API key is in no file the executor wrote (logs, state, ledger, database)."""
    for path in workdir.rglob("*"):
        if path.is_file() and ".git" not in path.parts and "repo" not in path.parts:
            assert KEY.encode() not in path.read_bytes(), path


def breaker_row(workdir: Path) -> Adapter:
    engine = make_engine(default_url(workdir))
    with Session(engine) as s:
        return s.scalars(select(Adapter).where(Adapter.id == "llm")).one()


def test_chat_completions_reply_is_applied_gated_and_completed(tmp_path: Path) -> None:
    content = f"Here is the change:\n\n```diff\n{GOOD_DIFF}```\n"
    with scripted_server(Reply(body=chat_reply(content))) as server:
        workdir = make_workdir(
            tmp_path / "w",
            run_id="api",
            tasks=[TASK],
            adapters=[api_adapter(server.url + "/v1")],
            routes={"add-multiply": "llm"},
            files={"calc.py": CALC},
        )
        results, metrics = execute(workdir, "api")
    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED, task.failure_message
    attempt = task.attempts[0]
    assert attempt.gate is not None and attempt.gate.passed
    assert attempt.diff is not None and attempt.diff.files_changed == 1
    assert attempt.diff.insertions == 3
    assert attempt.usage is not None and attempt.usage.prompt_tokens == 120
    assert attempt.usage.completion_tokens == 40 and attempt.usage.total_tokens == 160
    # what the endpoint got: the protocol, the key in its header, the task and the file
    [request] = server.seen
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.json()
    assert body["model"] == "test-model" and body["stream"] is False
    user = body["messages"][1]["content"]
    assert "Add a function multiply(a, b) to calc.py." in user
    assert "def add(a, b):" in user and "- calc.py" in user
    # the ledger's patch is the server's diff as git applied it
    ledger = [json.loads(x) for x in (workdir / ".state/patch_ledger.jsonl").read_text().splitlines()]
    patch = read_all(local_store(workdir), ledger[0]["patch_ref"]).decode()
    assert "+def multiply(a, b):" in patch and "+    return a * b" in patch
    # usage in the database (event payload) and the metric, once
    engine = make_engine(default_url(workdir))
    with Session(engine) as s:
        payloads = [
            e.payload for e in s.scalars(select(ExecutionLog).where(ExecutionLog.event == "TASK_COMPLETED"))
        ]
    assert payloads[0]["usage"] == {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160}
    text = generate_latest(metrics.registry).decode()
    assert 'adapter_tokens_total{adapter="llm",type="prompt"} 120.0' in text
    assert 'adapter_tokens_total{adapter="llm",type="completion"} 40.0' in text
    no_key_anywhere(workdir)


def test_webhook_protocol_posts_the_task_and_applies_its_patch(tmp_path: Path) -> None:
    with scripted_server(Reply(body={"patch": GOOD_DIFF, "usage": {"input_tokens": 7}})) as server:
        workdir = make_workdir(
            tmp_path / "w",
            run_id="hook",
            tasks=[TASK],
            adapters=[api_adapter(server.url + "/tasks", "webhook", api={"api_key_header": "X-Api-Key"})],
            routes={"add-multiply": "llm"},
            files={"calc.py": CALC},
        )
        results, _ = execute(workdir, "hook")
    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED, task.failure_message
    assert task.attempts[0].usage is not None and task.attempts[0].usage.prompt_tokens == 7
    [request] = server.seen
    assert request.path == "/tasks" and request.headers["x-api-key"] == KEY
    body = request.json()
    assert body["protocol"] == "orchestrator.task/v1"
    assert body["task_id"] == "add-multiply" and body["attempt"] == 1 and body["run_id"] == "hook"
    assert body["files"] == [
        {"path": "calc.py", "content": CALC, "truncated": False, "missing": False, "binary": False}
    ]
    assert body["repository_files"] == ["calc.py"]
    no_key_anywhere(workdir)


def test_429_then_success_completes_on_attempt_2_after_the_servers_delay(tmp_path: Path) -> None:
    throttled = Reply(status=429, body={"error": "slow down"}, headers={"Retry-After": "2"})
    ok = Reply(body=chat_reply(f"```diff\n{GOOD_DIFF}```"))
    with scripted_server(throttled, ok) as server:
        workdir = make_workdir(
            tmp_path / "w",
            run_id="throttle",
            tasks=[TASK],
            # the policy alone would retry after 0.1 s: the server's 2 s must win
            adapters=[
                api_adapter(
                    server.url + "/v1",
                    retry={"backoff_initial_seconds": 0.1, "jitter_seconds": 0},
                    breaker={"failure_threshold": 1},
                )
            ],
            routes={"add-multiply": "llm"},
            files={"calc.py": CALC},
        )
        results, metrics = execute(workdir, "throttle")
    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED, task.failure_message
    first, second = task.attempts
    assert first.failure_class is FailureClass.INFRASTRUCTURE
    assert "HTTP 429" in first.failure_message and "Retry-After 2s" in first.failure_message
    assert first.backoff_seconds == 2.0
    assert second.attempt == 2 and second.adapter_id == "llm" and second.failure_class is None
    # the second request came no earlier than the server asked (measured by the server)
    assert len(server.seen) == 2
    assert server.seen[1].received - server.seen[0].answered >= 2.0
    assert (second.started_at - first.finished_at).total_seconds() >= 2.0
    # the breaker never heard of it: threshold 1, yet closed, no failure, never written
    row = breaker_row(workdir)
    assert (row.breaker_state, row.breaker_failures, row.breaker_version) == ("CLOSED", 0, 0)
    resilience = (workdir / "logs/resilience.jsonl").read_text()
    assert "circuit_breaker" not in resilience and "Retry-After" in resilience
    text = generate_latest(metrics.registry).decode()
    assert 'retry_attempts_total{adapter="llm",failure_class="infrastructure"} 1.0' in text


def test_a_reply_that_does_not_apply_is_an_adapter_error_and_falls_back(tmp_path: Path) -> None:
    with scripted_server(Reply(body=chat_reply(f"```diff\n{BAD_DIFF}```"))) as server:
        fallback = {"id": "patcher", "kind": "patch"}
        workdir = make_workdir(
            tmp_path / "w",
            run_id="fallback",
            tasks=[{**TASK, "patch": GOOD_DIFF}],
            adapters=[api_adapter(server.url + "/v1", retry={"jitter_seconds": 0, "backoff_initial_seconds": 0.1}), fallback],
            routes={"add-multiply": ["llm", "patcher"]},
            files={"calc.py": CALC},
        )
        results, _ = execute(workdir, "fallback")
    task = results.tasks[0]
    assert task.state is TaskState.COMPLETED, task.failure_message
    first, second = task.attempts
    assert first.adapter_id == "llm" and first.failure_class is FailureClass.ADAPTER_ERROR
    assert first.failure_message.startswith("the API's diff does not apply:")
    assert "patch failed: calc.py:1" in first.failure_message
    assert second.adapter_id == "patcher" and second.failure_class is None
    assert task.final_adapter_id == "patcher"
    assert breaker_row(workdir).breaker_failures == 1  # the adapter's own failure counts
    log = (workdir / "logs/execution/add-multiply.jsonl").read_text()
    assert '"event": "patch_failed"' in log and "never applies" in log


def test_a_slow_reply_past_the_timeout_is_an_adapter_timeout(tmp_path: Path) -> None:
    slow = Reply(body=chat_reply(f"```diff\n{GOOD_DIFF}```"), delay=30)
    with scripted_server(slow) as server:
        workdir = make_workdir(
            tmp_path / "w",
            run_id="slow",
            tasks=[TASK],
            adapters=[
                api_adapter(
                    server.url + "/v1",
                    api={"read_timeout_seconds": 1},
                    retry={"max_attempts": 1},
                )
            ],
            routes={"add-multiply": "llm"},
            files={"calc.py": CALC},
        )
        results, _ = execute(workdir, "slow")
    task = results.tasks[0]
    assert task.state is TaskState.TIMEOUT
    [attempt] = task.attempts
    assert attempt.failure_class is FailureClass.ADAPTER_TIMEOUT and attempt.timed_out
    assert len(server.seen) == 1 and server.seen[0].answered == 0.0  # never answered in time
    log = (workdir / "logs/execution/add-multiply.jsonl").read_text()
    assert '"event": "api_timed_out"' in log


def test_an_api_key_variable_that_is_not_set_stops_the_run_before_any_work(tmp_path: Path) -> None:
    workdir = make_workdir(
        tmp_path / "w",
        run_id="nokey",
        tasks=[TASK],
        adapters=[api_adapter("http://127.0.0.1:9/v1")],
        routes={"add-multiply": "llm"},
        files={"calc.py": CALC},
    )
    with pytest.raises(EntryContractError, match=r"\$TEST_API_KEY, which is not set"):
        execute(workdir, "nokey", env={})

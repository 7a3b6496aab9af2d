"""The `api` adapter's pieces: reply parsing, Retry-After, the lifecycle's use of the server's
delay, and the runner making the call from a pod-like process against a real local server."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.engine.api_adapter import (
    ApiCaller,
    extract_diff,
    mask,
    parse_reply,
    parse_usage,
    retry_after,
)
from core.engine.lifecycle import AttemptEvidence, TaskPlan, conclude, needs_gate
from core.engine.resilience.classification import FailureEvidence, classify_evidence
from core.engine.task_log import TaskLog
from core.engine.workspace import add_worktree
from core.models import AdapterSpec, ApiProtocol, ApiSpec, FailureClass, TaskSpec
from core.runner.protocol import parse_pod_log
from tests.http_server import Reply, chat_reply, scripted_server
from tests.unit.test_runner import pod_env, request

DIFF = "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-old\n+new\n"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_diff_is_taken_from_a_fenced_block_or_the_bare_answer() -> None:
    assert extract_diff(f"Sure.\n```diff\n{DIFF}```\nDone.") == DIFF
    assert extract_diff(f"```\n{DIFF}```") == DIFF
    assert extract_diff(f"```python\nprint(1)\n```\n```patch\n{DIFF}```") == DIFF
    assert extract_diff(f"The change:\n{DIFF}") == DIFF
    assert extract_diff("```diff\n```") == ""  # an explicit empty diff
    assert extract_diff("I cannot do that.") is None


def test_replies_without_a_diff_say_why() -> None:
    chat = ApiProtocol.OPENAI_CHAT
    assert parse_reply(chat, {"choices": []}).problem == "the reply has no choices[0].message.content"
    cut = {"choices": [{"message": {"content": "```diff\n--- a"}, "finish_reason": "length"}]}
    assert parse_reply(chat, cut).problem.endswith("(the model stopped at max_tokens)")
    assert parse_reply(ApiProtocol.WEBHOOK, {"diff": DIFF}).problem == 'the reply has no "patch" string'
    assert parse_reply(ApiProtocol.WEBHOOK, ["x"]).problem == "the reply is not a JSON object"
    ok = parse_reply(ApiProtocol.WEBHOOK, {"patch": DIFF, "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    assert ok.diff == DIFF and ok.usage is not None and ok.usage.total_tokens == 7
    assert parse_usage({"input_tokens": 5, "output_tokens": True}) is not None
    assert parse_usage("many") is None


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert retry_after("3", NOW) == 3.0
    assert retry_after(" 0.5 ", NOW) == 0.5
    assert retry_after("-4", NOW) == 0.0
    assert retry_after("Thu, 01 Jan 2026 00:00:30 GMT", NOW) == 30.0
    assert retry_after("soon", NOW) is None
    assert retry_after(None, NOW) is None
    assert retry_after("nan", NOW) is None


def test_the_key_is_masked() -> None:
    assert mask("auth failed for sk-123 (sk-123)", ("sk-123",)) == "auth failed for *** (***)"
    assert mask("x", ("",)) == "x"


def test_an_adapter_error_the_adapter_named_is_classified_with_its_message() -> None:
    verdict = classify_evidence(FailureEvidence(exit_code=None, adapter_error="the API answered HTTP 401"))
    assert verdict.failure_class is FailureClass.ADAPTER_ERROR
    assert verdict.message == "the API answered HTTP 401" and verdict.counts_against_adapter
    # a platform failure still wins
    infra = classify_evidence(FailureEvidence(infrastructure_reason="throttled", adapter_error="x"))
    assert infra.failure_class is FailureClass.INFRASTRUCTURE


def _plan(**retry: Any) -> TaskPlan:
    adapter = AdapterSpec(
        id="llm",
        kind="api",
        api=ApiSpec(protocol="webhook", url="http://127.0.0.1:1/x"),
        retry={"jitter_seconds": 0, "backoff_initial_seconds": 1, **retry},
        timeout_seconds=100,
    )
    task = TaskSpec(task_id="t", prompt="p", repo="r", base_commit="a" * 40)
    return TaskPlan.of(task, ["llm"], {"llm": adapter})


def _evidence(**fields: Any) -> AttemptEvidence:
    return AttemptEvidence(1, "llm", NOW, NOW + timedelta(seconds=1), **fields)


def test_conclude_waits_for_the_longer_of_the_policy_backoff_and_retry_after() -> None:
    plan = _plan()
    throttled = _evidence(infrastructure_reason="HTTP 429", retry_after_seconds=7.5)
    verdict = conclude(plan, [], throttled, rng=random.Random(0))
    assert verdict.finish is None and verdict.result.backoff_seconds == 7.5
    assert verdict.decision.reason.endswith("(the server's Retry-After)")
    assert verdict.classification.counts_against_adapter is False
    short = conclude(plan, [], _evidence(infrastructure_reason="x", retry_after_seconds=0.2), rng=random.Random(0))
    assert short.result.backoff_seconds == 1.0  # the policy's backoff is longer
    # a delay the budget cannot cover ends the task instead of waiting past it
    late = conclude(plan, [], _evidence(infrastructure_reason="x", retry_after_seconds=500), rng=random.Random(0))
    assert late.finish is not None and late.finish.budget_exhausted


def test_a_named_adapter_error_never_reaches_the_gate() -> None:
    evidence = _evidence(exit_code=None, adapter_error="the API's diff does not apply")
    assert not needs_gate(_plan(), evidence)


def test_a_stop_request_cancels_a_call_to_a_slow_server(git_repo: Any, tmp_path: Path) -> None:
    repo = git_repo({"a.txt": "old\n"})
    tree = add_worktree(repo.path, tmp_path / "tree", repo.base)
    stop = threading.Event()
    spec = ApiSpec(protocol="webhook", url="http://127.0.0.1:1/x")
    task = TaskSpec(task_id="t", prompt="p", repo="r", base_commit=repo.base)
    with scripted_server(Reply(body={"patch": DIFF}, delay=60)) as server:
        spec = spec.model_copy(update={"url": server.url + "/x"})
        log = TaskLog(tmp_path / "log.jsonl", task_id="t", attempt=1, max_bytes=10_000)
        caller = ApiCaller(spec, log=log, note=log.note, env={}, stop=stop)
        threading.Timer(0.5, stop.set).start()
        outcome = caller.run(task, tree, prompt="p", run_id="r", attempt=1, feedback=None, timeout=60)
        log.close()
    assert outcome.cancelled and not outcome.timed_out and outcome.exit_code is None
    assert len(server.seen) == 1 and server.seen[0].answered == 0.0
    assert (tree / "a.txt").read_text() == "old\n"


def _api_request(repo: Any, url: str, **api: Any) -> dict[str, Any]:
    adapter = {
        "id": "llm",
        "kind": "api",
        "api": {"protocol": "openai-chat", "url": url, "model": "m", "api_key_env": "LLM_KEY", **api},
    }
    return request(repo, adapter=adapter, task={"target_paths": ["a.txt"]})


def _run_pod(workdir: Path, req: dict[str, Any]) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "core.runner", "adapter"],
        env=pod_env(workdir, req, LLM_KEY="pod-secret-key"),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pod-secret-key" not in proc.stdout + proc.stderr
    parsed = parse_pod_log(proc.stdout)
    assert parsed.result is not None
    return parsed.result


@pytest.fixture
def pod_dir(tmp_path: Path) -> Path:
    path = tmp_path / "pod"
    path.mkdir()
    return path


def test_the_runner_calls_the_api_from_the_pod_and_reports_the_diff(git_repo: Any, pod_dir: Path) -> None:
    repo = git_repo({"a.txt": "old\n"})
    with scripted_server(Reply(body=chat_reply(f"```diff\n{DIFF}```"))) as server:
        result = _run_pod(pod_dir, _api_request(repo, server.url + "/v1"))
    assert result.exit_code == 0 and result.adapter_error is None
    assert result.diff is not None and result.diff.files_changed == 1
    assert result.usage is not None and result.usage.total_tokens == 160
    assert server.seen[0].headers["authorization"] == "Bearer pod-secret-key"


def test_the_runner_reports_throttling_with_the_servers_delay(git_repo: Any, pod_dir: Path) -> None:
    repo = git_repo({"a.txt": "old\n"})
    busy = Reply(status=503, body={"error": "busy"}, headers={"Retry-After": "12"})
    with scripted_server(busy) as server:
        result = _run_pod(pod_dir, _api_request(repo, server.url + "/v1", max_retry_after_seconds=5))
    assert result.infrastructure_reason == "the API is unavailable (HTTP 503, Retry-After 5s)"
    assert result.retry_after_seconds == 5.0 and result.exit_code is None
    assert result.diff is not None and result.diff.empty

"""The ``api`` adapter kind: send the task to an HTTP endpoint, apply the diff it answers with.

Two protocols (:class:`core.models.ApiProtocol`):

* ``openai-chat`` -- OpenAI-compatible Chat Completions (what vLLM, llama.cpp's server,
  Ollama and most gateways speak): ``POST {url}/chat/completions`` with a system prompt asking
  for a unified diff and the task as the user message; the diff is read from the reply's
  ``choices[0].message.content`` (a fenced ``diff`` block, or the bare diff).
* ``webhook`` -- ``POST {url}`` with the task as JSON (:func:`webhook_payload`); the reply is
  ``{"patch": "<unified diff>", "usage": {...}}`` (``usage`` optional).

Either way the task carries the prompt, the target files' contents within
``max_context_bytes`` and the repository's file list, and the diff is applied to the
attempt's checkout by the same ``git apply`` ladder as the ``patch`` kind, so the diff that
is captured, gated and recorded is what git made of the reply.

How a call ends (the lifecycle classifies the evidence; see
``core.engine.resilience.classification``):

* HTTP 429, or 503 with ``Retry-After``: ``infrastructure`` with the server's delay, so the
  retry waits at least that long and the adapter's breaker is not fed;
* no reply within the read timeout or the attempt's budget: timed out (``adapter_timeout``);
* unreachable endpoint, any other HTTP error, a reply without a diff, a diff that does not
  apply: ``adapter_error`` carrying the reason (git's message for a diff that does not apply);
* the executor's stop event: cancelled (the driver records the attempt as interrupted).

Why httpx: a maintained client with separate connect/read timeouts and a synchronous API
that fits the executor's thread. A call runs in a worker thread so that a stop request does
not wait for a slow server: the client is closed under it. The API key is read from the
environment at call time, goes only into one header, and is masked in every line this
module writes (log records, messages).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from core.engine.process_group import LineSink
from core.engine.workspace import git, try_apply_patch
from core.models import ApiProtocol, ApiSpec, TaskSpec, TokenUsage

#: Asked of the model: the reply format the diff extraction below expects.
REPLY_FORMAT = (
    "Reply with the change as ONE unified diff in `git diff` format, inside a single "
    "```diff fenced block: paths relative to the repository root with a/ and b/ prefixes, "
    "3 lines of context, /dev/null for new or deleted files. Nothing else changes the files."
)
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful software engineer working on a git repository. You receive a task and "
    "the current contents of the relevant files. " + REPLY_FORMAT
)
#: Repository file names sent as context (after the target files' contents).
MAX_FILE_LIST = 500
MAX_FILE_LIST_BYTES = 32 * 1024
#: Characters of an error reply kept in messages and the log.
ERROR_EXCERPT = 300
#: How often a waiting call looks at the stop event (the call itself never polls).
STOP_CHECK_SECONDS = 0.2
MASK = "***"


@dataclass(frozen=True)
class ContextFile:
    path: str
    content: str
    truncated: bool = False
    missing: bool = False
    binary: bool = False


@dataclass(frozen=True)
class TaskContext:
    """What the endpoint is told besides the prompt."""

    files: tuple[ContextFile, ...]
    repository_files: tuple[str, ...]
    repository_files_truncated: bool


@dataclass(frozen=True)
class ApiOutcome:
    """Evidence of one ``api`` attempt (mirrors the fields of a process result)."""

    exit_code: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    #: The adapter failed for a reason we can name (HTTP error, no diff, diff not applicable).
    adapter_error: str | None = None
    #: A platform failure (throttled, service unavailable): retried, not the adapter's fault.
    infrastructure_reason: str | None = None
    #: The server's Retry-After (capped by ``max_retry_after_seconds``).
    retry_after_seconds: float | None = None
    usage: TokenUsage | None = None
    duration_seconds: float = 0.0
    tail: str = ""
    status_code: int | None = None


@dataclass(frozen=True)
class _Reply:
    response: httpx.Response | None = None
    error: BaseException | None = None


@dataclass
class _Call:
    done: threading.Event = field(default_factory=threading.Event)
    reply: _Reply = field(default_factory=_Reply)


# --------------------------------------------------------------------------- request


def gather_context(tree: Path, task: TaskSpec, max_bytes: int) -> TaskContext:
    """The target files' contents (text only, cut to ``max_bytes`` in total) and the
    repository's file list (bounded)."""
    files: list[ContextFile] = []
    room = max_bytes
    for rel in task.target_paths:
        path = tree / rel
        if not path.is_file() or path.is_symlink():
            files.append(ContextFile(rel, "", missing=True))
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            files.append(ContextFile(rel, "", binary=True))
            continue
        cut = data[: max(room, 0)]
        room -= len(cut)
        files.append(
            ContextFile(rel, cut.decode("utf-8", errors="replace"), truncated=len(cut) < len(data))
        )
    names = git("ls-files", "-z", cwd=tree).decode("utf-8", errors="replace").split("\0")
    names = [n for n in names if n]
    listed: list[str] = []
    size = 0
    for name in names[:MAX_FILE_LIST]:
        size += len(name) + 1
        if size > MAX_FILE_LIST_BYTES:
            break
        listed.append(name)
    return TaskContext(tuple(files), tuple(listed), len(listed) < len(names))


def user_message(prompt: str, task: TaskSpec, context: TaskContext) -> str:
    """The task as one text: the prompt, the repository, the files, the reply format."""
    parts = [prompt.rstrip(), "", "## Repository", "", f"Base commit: {task.base_commit}"]
    more = " (list cut)" if context.repository_files_truncated else ""
    parts += [f"Tracked files{more}:", *(f"- {n}" for n in context.repository_files)]
    if context.files:
        parts += ["", "## Current contents of the files to change"]
    for f in context.files:
        if f.missing:
            parts += ["", f"### {f.path}", "(does not exist yet)"]
        elif f.binary:
            parts += ["", f"### {f.path}", "(binary file, not shown)"]
        else:
            cut = " (cut: the file is longer)" if f.truncated else ""
            parts += ["", f"### {f.path}{cut}", "```", f.content.rstrip("\n"), "```"]
    parts += ["", "## Reply format", "", REPLY_FORMAT]
    return "\n".join(parts) + "\n"


def chat_payload(spec: ApiSpec, message: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": spec.model,
        "messages": [
            {"role": "system", "content": spec.system_prompt or DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": message},
        ],
        "stream": False,
    }
    if spec.temperature is not None:
        payload["temperature"] = spec.temperature
    if spec.max_tokens is not None:
        payload["max_tokens"] = spec.max_tokens
    return payload


def webhook_payload(
    task: TaskSpec,
    *,
    run_id: str,
    attempt: int,
    feedback: str | None,
    message: str,
    context: TaskContext,
) -> dict[str, Any]:
    """The JSON a webhook receives (``protocol`` names this shape's version)."""
    return {
        "protocol": "orchestrator.task/v1",
        "run_id": run_id,
        "task_id": task.task_id,
        "attempt": attempt,
        "title": task.title,
        "prompt": task.prompt,
        "feedback": feedback,
        "base_commit": task.base_commit,
        "target_paths": list(task.target_paths),
        "files": [
            {
                "path": f.path,
                "content": f.content,
                "truncated": f.truncated,
                "missing": f.missing,
                "binary": f.binary,
            }
            for f in context.files
        ],
        "repository_files": list(context.repository_files),
        "repository_files_truncated": context.repository_files_truncated,
        "reply_format": 'JSON {"patch": "<unified diff, git diff format>"}',
        "message": message,
    }


def endpoint(spec: ApiSpec) -> str:
    if spec.protocol is ApiProtocol.OPENAI_CHAT:
        return spec.url.rstrip("/") + "/chat/completions"
    return spec.url


def headers(spec: ApiSpec, api_key: str | None) -> dict[str, str]:
    out = {"Accept": "application/json", "User-Agent": "orchestrator-api-adapter"}
    if api_key:
        value = f"Bearer {api_key}" if spec.api_key_header.lower() == "authorization" else api_key
        out[spec.api_key_header] = value
    return out


# --------------------------------------------------------------------------- reply


_FENCE = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _looks_like_diff(text: str) -> bool:
    return "diff --git " in text or ("--- " in text and "+++ " in text and "@@" in text)


def extract_diff(content: str) -> str | None:
    """The unified diff in a model's answer: the first fenced block that holds one (an empty
    ``diff`` block is an empty diff), else the bare diff from its first header line."""
    for match in _FENCE.finditer(content):
        lang, body = match.group(1).lower(), match.group(2)
        if _looks_like_diff(body) or (lang in ("diff", "patch") and not body.strip()):
            return body
    if _looks_like_diff(content):
        lines = content.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.startswith(("diff --git ", "--- ")):
                return "".join(lines[i:])
    return None


def parse_usage(raw: object) -> TokenUsage | None:
    """OpenAI's ``prompt_tokens``/``completion_tokens`` (or ``input_``/``output_tokens``)."""
    if not isinstance(raw, Mapping):
        return None

    def number(*names: str) -> int:
        for name in names:
            value = raw.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return 0

    prompt = number("prompt_tokens", "input_tokens")
    completion = number("completion_tokens", "output_tokens")
    total = number("total_tokens") or prompt + completion
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


@dataclass(frozen=True)
class ParsedReply:
    diff: str | None
    usage: TokenUsage | None
    #: Why there is no diff ('' when there is one).
    problem: str = ""
    #: The model's own text (openai-chat), for the task log.
    text: str = ""


def parse_reply(protocol: ApiProtocol, body: object) -> ParsedReply:
    """The diff and token usage of a 2xx reply, or why it carries no diff."""
    if not isinstance(body, dict):
        return ParsedReply(None, None, "the reply is not a JSON object")
    usage = parse_usage(body.get("usage"))
    if protocol is ApiProtocol.WEBHOOK:
        patch = body.get("patch")
        if not isinstance(patch, str):
            return ParsedReply(None, usage, 'the reply has no "patch" string')
        return ParsedReply(patch, usage)
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ParsedReply(None, usage, "the reply has no choices[0].message.content")
    if not isinstance(content, str):
        return ParsedReply(None, usage, "choices[0].message.content is not text")
    diff = extract_diff(content)
    if diff is None:
        stopped = choice.get("finish_reason") == "length"
        cut = " (the model stopped at max_tokens)" if stopped else ""
        return ParsedReply(None, usage, f"the model's answer carries no unified diff{cut}", content)
    return ParsedReply(diff, usage, "", content)


def retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


# --------------------------------------------------------------------------- the call


class ApiCaller:
    """One attempt's call: request, reply, apply. Injected clocks; nothing global."""

    def __init__(
        self,
        spec: ApiSpec,
        *,
        log: LineSink,
        note: Callable[..., None],
        env: Mapping[str, str],
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.spec = spec
        self.log = log
        self.note = note
        self.env = env
        self.stop = stop
        self.clock = clock
        self.wall = wall
        self.transport = transport

    def run(
        self,
        task: TaskSpec,
        tree: Path,
        *,
        prompt: str,
        run_id: str,
        attempt: int,
        feedback: str | None,
        timeout: float,
        fuzzy: bool = False,
    ) -> ApiOutcome:
        """Call the endpoint with ``prompt`` and the tree's context; apply the diff to ``tree``."""
        started = self.clock()
        spec = self.spec
        key = self.env.get(spec.api_key_env) if spec.api_key_env else None
        secrets = (key,) if key else ()
        if spec.api_key_env and not key:
            return self._end(
                started, adapter_error=f"the API key variable {spec.api_key_env} is not set"
            )
        context = gather_context(tree, task, spec.max_context_bytes)
        message = user_message(prompt, task, context)
        payload = (
            chat_payload(spec, message)
            if spec.protocol is ApiProtocol.OPENAI_CHAT
            else webhook_payload(
                task,
                run_id=run_id,
                attempt=attempt,
                feedback=feedback,
                message=message,
                context=context,
            )
        )
        url = endpoint(spec)
        self.note(
            "api_request",
            protocol=spec.protocol.value,
            url=url,
            model=spec.model,
            message_chars=len(message),
            files=[f.path for f in context.files],
            authenticated=bool(key),
        )
        call, client = self._start(url, payload, headers(spec, key), timeout)
        deadline = started + timeout
        while not call.done.wait(max(0.0, min(STOP_CHECK_SECONDS, deadline - self.clock()))):
            if self.stop is not None and self.stop.is_set():
                client.close()
                self.note("api_cancelled")
                return self._end(started, cancelled=True, tail="cancelled: the executor stopped")
            if self.clock() >= deadline:
                client.close()
                return self._timed_out(started, timeout)
        client.close()
        reply = call.reply
        if reply.error is not None:
            return self._failed(started, reply.error, url, timeout, secrets)
        assert reply.response is not None
        return self._answer(started, reply.response, secrets, tree, fuzzy)

    def _start(
        self, url: str, payload: dict[str, Any], hdrs: dict[str, str], timeout: float
    ) -> tuple[_Call, httpx.Client]:
        spec = self.spec
        read = min(spec.read_timeout_seconds, timeout)
        client = httpx.Client(
            timeout=httpx.Timeout(
                read, connect=min(spec.connect_timeout_seconds, timeout), pool=read
            ),
            transport=self.transport,
            trust_env=False,  # no proxy or .netrc from the executor's environment
            follow_redirects=False,
        )
        call = _Call()

        def send() -> None:
            try:
                response = client.post(url, json=payload, headers=hdrs)
                call.reply = _Reply(response=response)
            except BaseException as exc:  # handed to the waiting thread
                call.reply = _Reply(error=exc)
            finally:
                call.done.set()

        threading.Thread(target=send, name="api-adapter-call", daemon=True).start()
        return call, client

    def _answer(
        self,
        started: float,
        response: httpx.Response,
        secrets: tuple[str, ...],
        tree: Path,
        fuzzy: bool,
    ) -> ApiOutcome:
        status = response.status_code
        text = mask(response.text, secrets)
        wait = retry_after(response.headers.get("retry-after"), self.wall())
        capped = None if wait is None else min(wait, self.spec.max_retry_after_seconds)
        self.note(
            "api_response",
            status=status,
            bytes=len(response.content),
            retry_after_seconds=capped,
            seconds=round(self.clock() - started, 3),
        )
        if status == 429 or (status == 503 and wait is not None):
            why = "throttled the request" if status == 429 else "is unavailable"
            delay = f", Retry-After {capped:g}s" if capped is not None else ""
            return self._end(
                started,
                status=status,
                infrastructure_reason=f"the API {why} (HTTP {status}{delay})",
                retry_after_seconds=capped,
            )
        if not 200 <= status < 300:
            excerpt = " ".join(text.split())[:ERROR_EXCERPT]
            return self._end(
                started, status=status, adapter_error=f"the API answered HTTP {status}: {excerpt}"
            )
        try:
            body = json.loads(response.content)
        except ValueError:
            return self._end(started, status=status, adapter_error="the reply is not JSON")
        parsed = parse_reply(self.spec.protocol, body)
        diff, usage = parsed.diff, parsed.usage
        if usage is not None:
            self.note("api_usage", **usage.model_dump())
        for line in mask(parsed.text, secrets).splitlines():
            self.log.line("api", line)
        if diff is None:
            return self._end(started, status=status, usage=usage, adapter_error=parsed.problem)
        patch = diff if diff.endswith("\n") or not diff else diff + "\n"
        method, error = try_apply_patch(tree, patch.encode("utf-8"), fuzzy=fuzzy)
        if method is None:
            first = " ".join(mask(error, secrets).split())[:ERROR_EXCERPT]
            self.note("patch_failed", what="API reply", error=first)
            return self._end(
                started,
                status=status,
                usage=usage,
                adapter_error=f"the API's diff does not apply: {first}",
            )
        self.note("patch_applied", what="API reply", method=method)
        return self._end(started, status=status, usage=usage, exit_code=0)

    def _failed(
        self,
        started: float,
        error: BaseException,
        url: str,
        timeout: float,
        secrets: tuple[str, ...],
    ) -> ApiOutcome:
        if isinstance(error, httpx.TimeoutException) and not isinstance(
            error, httpx.ConnectTimeout
        ):
            return self._timed_out(started, min(self.spec.read_timeout_seconds, timeout))
        if not isinstance(error, httpx.HTTPError):
            raise error  # a bug, not the endpoint: let it surface
        what = mask(f"{type(error).__name__}: {error}", secrets)[:ERROR_EXCERPT]
        self.note("api_unreachable", error=what)
        return self._end(started, adapter_error=f"cannot reach the API at {url}: {what}")

    def _timed_out(self, started: float, seconds: float) -> ApiOutcome:
        self.note("api_timed_out", timeout_seconds=round(seconds, 3))
        return self._end(started, timed_out=True, tail=f"no reply from the API within {seconds:g}s")

    def _end(
        self,
        started: float,
        *,
        status: int | None = None,
        exit_code: int | None = None,
        timed_out: bool = False,
        cancelled: bool = False,
        adapter_error: str | None = None,
        infrastructure_reason: str | None = None,
        retry_after_seconds: float | None = None,
        usage: TokenUsage | None = None,
        tail: str = "",
    ) -> ApiOutcome:
        return ApiOutcome(
            exit_code=exit_code,
            timed_out=timed_out,
            cancelled=cancelled,
            adapter_error=adapter_error,
            infrastructure_reason=infrastructure_reason,
            retry_after_seconds=retry_after_seconds,
            usage=usage,
            duration_seconds=self.clock() - started,
            tail=tail or adapter_error or infrastructure_reason or "",
            status_code=status,
        )

"""Delivery of escalations to a webhook: Alertmanager's alert API or a generic JSON POST.

Why a sender thread: an escalation is raised while an attempt is being recorded, and a slow
or dead receiver must not hold the executor (or the operator) up. Records are queued and
delivered in order by one daemon thread, each with retries (tenacity: exponential backoff,
a bounded number of attempts; connection errors, 429 and 5xx are retried, other 4xx are
not); the outcome goes back to the caller (``on_result``: the database's ``notified_at`` /
``notify_error``), so what was not delivered is known and resent after a restart.
:meth:`WebhookSender.flush` waits for the queue before the process ends.

Formats:

* ``generic``: the escalation record itself (the line of ``logs/escalations.jsonl``);
* ``alertmanager``: a list with one alert as ``POST /api/v2/alerts`` of Alertmanager takes
  it (``labels`` with ``alertname=OrchestratorEscalation``, ``reason``, ``severity``, the
  run, task and adapter; ``annotations`` with the message and the evidence; ``startsAt``).
  Point ``url`` at ``http://<alertmanager>:9093/api/v2/alerts``; Alertmanager groups,
  silences and routes them.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

WebhookFormat = Literal["generic", "alertmanager"]
ALERT_NAME = "OrchestratorEscalation"
#: Labels copied from the record into an Alertmanager alert (when not empty).
ALERT_LABELS = ("reason", "severity", "run_id", "task_id", "task_uid", "scope", "adapter_id")
MAX_QUEUE = 1000


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    format: WebhookFormat = "generic"
    #: Sent as ``Authorization: Bearer`` when set (read from the environment by the caller).
    token: str | None = None
    timeout_seconds: float = 5.0
    attempts: int = 5
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 10.0

    def __repr__(self) -> str:  # never print the token
        return f"WebhookConfig(url={self.url!r}, format={self.format!r})"


class _Retryable(Exception):
    """A delivery failure worth another try (connection error, 429, 5xx)."""


def alertmanager_payload(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    labels = {"alertname": ALERT_NAME}
    for name in ALERT_LABELS:
        value = record.get(name)
        if value not in (None, ""):
            labels[name] = str(value)
    evidence = record.get("evidence") or {}
    lines = "\n".join(f"{k}: {v}" for k, v in evidence.items())
    return [
        {
            "labels": labels,
            "annotations": {
                "summary": str(record.get("message", "")),
                "description": f"{record.get('message', '')}\n\nEvidence:\n{lines}".strip(),
                "escalation_key": str(record.get("escalation_key", "")),
                "evidence": json.dumps(evidence, sort_keys=True),
            },
            "startsAt": str(record.get("ts", "")),
        }
    ]


def payload(config: WebhookConfig, record: Mapping[str, Any]) -> Any:
    return alertmanager_payload(record) if config.format == "alertmanager" else dict(record)


class WebhookSender:
    """Queues records and delivers them from one thread (see the module docstring)."""

    def __init__(
        self,
        config: WebhookConfig,
        on_result: Callable[[str, str | None], None],
        *,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self.on_result = on_result
        self.sleep = sleep
        self._transport = transport
        self._client: httpx.Client | None = None
        self._queue: queue.Queue[Mapping[str, Any] | None] = queue.Queue(MAX_QUEUE)
        self._idle = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    def send(self, record: Mapping[str, Any]) -> None:
        """Queue one record (key ``escalation_key``); a full queue is recorded as a failure."""
        with self._idle:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="escalation-webhook", daemon=True
                )
                self._thread.start()
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self.on_result(str(record["escalation_key"]), "webhook queue full; not sent")
                return
            self._pending += 1

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record was delivered or given up; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then end the thread and the connection pool (``send`` starts them again)."""
        flushed = self.flush(timeout)
        with self._idle:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)  # the worker's signal to end
        if thread is not None:
            thread.join(timeout)
        if self._client is not None:
            self._client.close()
            self._client = None
        return flushed

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                timeout=self.config.timeout_seconds, transport=self._transport, trust_env=False
            )
        return self._client

    def deliver(self, record: Mapping[str, Any]) -> str | None:
        """POST one record with retries; None when delivered, else why not."""
        cfg = self.config
        headers = {"Content-Type": "application/json"}
        if cfg.token:
            headers["Authorization"] = f"Bearer {cfg.token}"
        body = json.dumps(payload(cfg, record), default=str).encode()

        def post() -> None:
            try:
                response = self._http().post(cfg.url, content=body, headers=headers)
            except httpx.TransportError as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
            status = response.status_code
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status}")
            if not 200 <= status < 300:
                raise ValueError(f"HTTP {status}: {' '.join(response.text.split())[:200]}")

        retrying = Retrying(
            stop=stop_after_attempt(cfg.attempts),
            wait=wait_exponential(multiplier=cfg.backoff_seconds, max=cfg.backoff_max_seconds),
            retry=retry_if_exception_type(_Retryable),
            sleep=self.sleep,
        )
        try:
            retrying(post)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            return f"not delivered after {cfg.attempts} attempts: {last}"
        except ValueError as exc:
            return f"refused: {exc}"
        return None

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                error = self.deliver(record)
                self.on_result(str(record["escalation_key"]), error)
            except Exception as exc:  # the sender must survive a broken database write
                error = f"delivery failed: {exc!r}"
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

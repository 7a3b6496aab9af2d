"""A real HTTP server on 127.0.0.1 with scripted replies, for the `api` adapter and the
escalation webhook: it speaks HTTP/1.1 over a real socket and records every request. And
:func:`stub_kube_api`: the real Kubernetes client against a hand-played API endpoint.

Each request takes the next scripted :class:`Reply` (the last one repeats). A reply with a
``delay`` holds the answer back (released at once when the server stops), to play a slow
endpoint.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiohttp import web
from kubernetes.aio import client

from core.kube.client_api import ClientKubeApi

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (timeout, cancel) resets its connection: expected


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received: float  # time.monotonic() when the request arrived
    answered: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


class ScriptedServer:
    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    time.monotonic(),
                )
                with server._lock:
                    server.seen.append(seen)
                    index = min(len(server.seen), len(server.replies)) - 1
                    reply = server.replies[index]
                if reply.delay and server.release.wait(reply.delay):
                    self.close_connection = True
                    return  # the server is stopping: the slow reply never comes
                data = (
                    reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                )
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                    seen.answered = time.monotonic()
                except OSError:
                    pass  # the client gave up (a timeout test)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ScriptedServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def scripted_server(*replies: Reply) -> Iterator[ScriptedServer]:
    server = ScriptedServer(list(replies) or [Reply()]).start()
    try:
        yield server
    finally:
        server.stop()


def chat_reply(content: str, *, prompt_tokens: int = 120, completion_tokens: int = 40) -> dict:
    """An OpenAI Chat Completions response carrying ``content``."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


@asynccontextmanager
async def stub_kube_api(path: str, handler: Handler) -> AsyncIterator[ClientKubeApi]:
    """The real Kubernetes client against an aiohttp server answering GET ``path`` with
    ``handler`` (a watch stream played by hand), on 127.0.0.1."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api = ClientKubeApi(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")))
    try:
        yield api
    finally:
        await api.close()
        await runner.cleanup()

"""A fault-injecting proxy in front of a real kube-apiserver, for e2e tests.

Clients (the operator, kubectl) get a kubeconfig pointing at ``http://127.0.0.1:<port>``;
the proxy forwards every request to the real API server with the admin's client
certificate, streaming the answer (watches included), unless a :class:`Rule` says to fail
it: answer with a status (500, 503, 429, ...), drop the connection, or add latency first;
with ``after`` the API server gets the request and acts on it, and only its answer is lost.
Rules match the verb (``get``, ``list``, ``watch``, ``create``, ``update``, ``patch``,
``delete``) and the resource (``jobs``, ``pods/log``, ``taskexecutions/status``, ...) of the
Nth matching call, so a test can make exactly one call fail the way the network or the API
server would, and assert on what the API server and the database saw afterwards.

It runs in a thread of the test process with its own event loop (aiohttp, which the
kubernetes client already depends on). Loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "content-length",
    "content-encoding",
}


@dataclass(frozen=True)
class Call:
    verb: str
    resource: str
    namespace: str | None
    name: str | None
    status: int | None  # None: the proxy dropped the connection


@dataclass
class Rule:
    """Fail the ``nth`` .. ``nth + times - 1`` calls matching ``verb`` and ``resource``."""

    verb: str | None = None
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    nth: int = 1
    times: int = 1
    status: int | None = 500  # None: drop the connection without an answer
    delay_seconds: float = 0.0
    #: the API server gets the request and acts on it; only its answer is replaced by the
    #: fault (a write that happened although the client saw it fail); not for watches
    after: bool = False
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def matches(self, call: Call) -> bool:
        return all(
            want is None or want == got
            for want, got in (
                (self.verb, call.verb),
                (self.resource, call.resource),
                (self.namespace, call.namespace),
                (self.name, call.name),
            )
        )

    def fires(self) -> bool:
        self.seen += 1
        if self.nth <= self.seen < self.nth + self.times:
            self.fired += 1
            return True
        return False


def classify(method: str, path: str, query: dict[str, str]) -> Call:
    """(verb, resource, namespace, name) of a request path, as the API server's audit does."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return Call(method.lower(), "/".join(parts), None, None, None)
    namespace = None
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource += "/" + rest[2]
    verb = {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }.get(method, "get")
    if method == "GET" and name is None:
        verb = "watch" if query.get("watch") in ("1", "true") else "list"
    return Call(verb, resource, namespace, name, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultProxy:
    def __init__(self, kubeconfig: str) -> None:
        config = yaml.safe_load(Path(kubeconfig).read_text())
        ctx = next(c for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c for c in config["clusters"] if c["name"] == ctx["context"]["cluster"])
        user = next(u for u in config["users"] if u["name"] == ctx["context"]["user"])
        self.upstream = cluster["cluster"]["server"].rstrip("/")
        self._dir = tempfile.TemporaryDirectory(prefix="fault-proxy-")
        root = Path(self._dir.name)
        files = {}
        for key, data in (
            ("ca", cluster["cluster"]["certificate-authority-data"]),
            ("cert", user["user"]["client-certificate-data"]),
            ("key", user["user"]["client-key-data"]),
        ):
            files[key] = root / key
            files[key].write_bytes(base64.b64decode(data))
        self._ssl = ssl.create_default_context(cafile=str(files["ca"]))
        self._ssl.load_cert_chain(str(files["cert"]), str(files["key"]))
        self.port = _free_port()
        self.kubeconfig = str(root / "kubeconfig")
        Path(self.kubeconfig).write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}
                    ],
                    "users": [{"name": "proxy", "user": {}}],
                    "contexts": [
                        {"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}
                    ],
                    "current-context": "proxy",
                }
            )
        )
        self.rules: list[Rule] = []
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._dir.cleanup()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def seen(self, verb: str | None = None, resource: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self.calls
                if (verb is None or c.verb == verb) and (resource is None or c.resource == resource)
            ]

    # ------------------------------------------------------------------ serving

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # open watches never end by themselves: stop waiting for them after a second
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()  # ends the streams of open watches
        if self._runner is not None:
            await self._runner.cleanup()

    def _rule_for(self, call: Call) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(call) and rule.fires():
                    return rule
        return None

    def _record(self, call: Call, status: int | None) -> None:
        with self._lock:
            self.calls.append(Call(call.verb, call.resource, call.namespace, call.name, status))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        call = classify(request.method, request.path, dict(request.query))
        rule = self._rule_for(call)
        if rule is not None:
            if rule.delay_seconds:
                await asyncio.sleep(rule.delay_seconds)
            if rule.after and call.verb != "watch":
                await self._send_upstream(request)
            if rule.status is None:
                self._record(call, None)
                assert request.transport is not None
                request.transport.close()  # no answer, as a broken connection looks
                raise asyncio.CancelledError
            if rule.status:
                self._record(call, rule.status)
                return web.json_response(_status(rule.status, call), status=rule.status)
        return await self._forward(request, call)

    async def _send_upstream(self, request: web.Request) -> None:
        """The request goes to the API server; its answer is read and thrown away."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body if body else None,
            ssl=self._ssl,
        ) as upstream:
            await upstream.read()

    async def _forward(self, request: web.Request, call: Call) -> web.StreamResponse:
        try:
            return await self._relay(request, call)
        except aiohttp.ClientConnectorError:
            # the API server is down (a chaos restart): the client sees what it would see
            # without the proxy, a connection that fails, not a 500 the proxy made up
            self._record(call, None)
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError from None

    async def _relay(self, request: web.Request, call: Call) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body if body else None,
            ssl=self._ssl,
        ) as upstream:
            self._record(call, upstream.status)
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_HEADERS:
                    response.headers[key] = value
            if upstream.headers.get("Content-Encoding"):
                response.headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:  # the client went away (a killed operator's watch)
                pass
            return response


def _status(code: int, call: Call) -> dict[str, Any]:
    reasons = {500: "InternalError", 503: "ServiceUnavailable", 429: "TooManyRequests"}
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reasons.get(code, "InternalError"),
        "message": f"injected by the fault proxy: {call.verb} {call.resource}",
    }

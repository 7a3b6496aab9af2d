"""The operator's evidence server: its local store over HTTP, for runner pods with a grant.

Why the operator serves it itself: a single-replica operator keeps its store on its own
volume, which no pod can mount (ReadWriteOnce, and runner pods must get no writable host
path). Runner pods reach it through a Service; every request must carry a grant token
(:class:`~core.engine.evidence_grants.GrantSigner`) naming exactly that method, that key
and a byte limit, unexpired, or it is refused before a byte is read or written:

* ``GET /v1/objects/<key>?grant=<token>``: the object as stored (gzip), sendfile;
* ``PUT /v1/objects/<key>?grant=<token>``: the body, at most the token's byte limit
  (``Content-Length`` over it is refused at once, a longer body cut off with 413), written
  to a temporary file and renamed into place only when complete; only ``incoming/`` keys;
* ``GET /healthz``.

What arrives is not trusted either: the operator checks its sha256 and size against the
runner's report before it records anything (:mod:`core.kube.attempt_io`). aiohttp is the
server kopf already runs on (its health endpoint), so it adds no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from pathlib import Path

from aiohttp import web

from core.engine.evidence_grants import INCOMING, GrantError, GrantSigner, LocalGrantingStore
from core.errors import EvidenceError

log = logging.getLogger("orchestrator.evidence")
_CHUNK = 256 * 1024


class EvidenceServer:
    def __init__(self, store: LocalGrantingStore, signer: GrantSigner) -> None:
        self.store = store
        self.signer = signer
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/v1/objects/{key:.+}", self._get)
        app.router.add_put("/v1/objects/{key:.+}", self._put)
        return app

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (port 0: any free one); the port listened on.
        ``reuse_port``: other processes on this host may listen on the same port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        addresses = self._runner.addresses  # (host, port, ...) of every bound socket
        self.port = int(addresses[0][1]) if addresses else port
        log.info("evidence server on %s:%s", host, self.port)
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ handlers

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def _allowed(self, request: web.Request, method: str) -> tuple[str, int]:
        key = request.match_info["key"]
        try:
            limit = self.signer.check(request.query.get("grant", ""), method, key)
        except GrantError as exc:
            raise web.HTTPForbidden(text=f"{exc}\n") from None
        return key, limit

    async def _get(self, request: web.Request) -> web.StreamResponse:
        key, _ = self._allowed(request, "GET")
        try:
            path = self.store.path(key)
        except EvidenceError:
            raise web.HTTPForbidden(text="bad key\n") from None
        if not path.is_file():
            raise web.HTTPNotFound(text="no such object\n")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def _put(self, request: web.Request) -> web.Response:
        key, limit = self._allowed(request, "PUT")
        if not key.startswith(INCOMING + "/"):
            raise web.HTTPForbidden(text="uploads go to incoming/ only\n")
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        try:
            target = self.store.path(key)
        except EvidenceError:
            raise web.HTTPForbidden(text="bad key\n") from None
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=".put-", suffix=".tmp")
        tmp = Path(name)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(os.fsync, out.fileno())
            await asyncio.to_thread(os.replace, tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return web.Response(status=201, text=f"{size}\n")

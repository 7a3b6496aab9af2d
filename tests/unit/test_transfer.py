"""The runner's transfers outlast an evidence endpoint that is down for a while (the operator
serves the local store itself and may be restarted at any time), and give up after their
retry time, naming what failed. A real HTTP server on loopback; only the pauses are
injected (a fake clock that the pauses advance)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.engine.evidence_grants import Download
from core.runner.transfer import RETRY_SECONDS, TransferError, download

CONTENT = b"the request\n" * 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = gzip.compress(CONTENT)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class LateServer:
    """Listens only once ``start`` is called: until then a connection is refused."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.server: http.server.HTTPServer | None = None

    def start(self) -> None:
        self.server = http.server.HTTPServer(("127.0.0.1", self.port), _Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def late() -> Iterator[LateServer]:
    server = LateServer()
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now


def grant(port: int) -> Download:
    return Download(
        url=f"http://127.0.0.1:{port}/requests/r.json.gz",
        sha256=hashlib.sha256(CONTENT).hexdigest(),
        size=len(CONTENT),
        max_bytes=len(CONTENT),
        gzip=True,
    )


def test_a_download_waits_for_an_endpoint_that_comes_back(tmp_path: Path, late) -> None:
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.pauses.append(seconds)
        clock.now += seconds
        if clock.now >= 30:  # the operator is back after about half a minute
            late.start()

    download(grant(late.port), tmp_path / "request.json", sleep=sleep, clock=clock)
    assert (tmp_path / "request.json").read_bytes() == CONTENT
    assert clock.pauses == [1, 2, 4, 8, 10, 10]  # backoff, capped
    assert clock.now == 35


def test_a_download_gives_up_after_its_retry_time(tmp_path: Path, late) -> None:
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.pauses.append(seconds)
        clock.now += seconds

    with pytest.raises(TransferError, match=r"^download: .*retried 300s"):
        download(grant(late.port), tmp_path / "request.json", sleep=sleep, clock=clock)
    assert clock.now <= RETRY_SECONDS
    assert clock.now + 10 > RETRY_SECONDS  # it did wait for most of it
    assert not (tmp_path / "request.json").exists()

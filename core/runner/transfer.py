"""The runner's side of a grant: download its inputs, upload its evidence (httpx, streamed).

Why here and not in the engine: only a pod transfers through grants; the operator reads and
writes its store directly. Downloads are checked against the sha256 and size the grant names
before anything uses them (a request or patch swapped in the store is refused); uploads are
gzip-compressed first (diffs and logs compress 4-10x) and report the content's sha256 and
size, which the operator checks against what arrived before it records anything.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from core.engine.evidence_grants import Download, Upload, UploadedEvidence, gzip_file

_CHUNK = 1024 * 1024
#: How long connection problems are retried: the evidence endpoint restarting (the operator
#: serves the local store itself, and may be killed or rolled out at any time), a Service
#: blip. Refusals (4xx) are final at once.
RETRY_SECONDS = 300.0
#: The longest pause between two tries.
MAX_DELAY = 10.0


class TransferError(Exception):
    """A download or upload failed for good (refused, expired, wrong content)."""


def _retrying(
    what: str,
    call: Callable[[], None],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    retry_seconds: float = RETRY_SECONDS,
) -> None:
    deadline = clock() + retry_seconds
    delay = 1.0
    while True:
        try:
            call()
            return
        except (httpx.TransportError, _Retry) as exc:
            if clock() + delay > deadline:
                raise TransferError(f"{what}: {exc} (retried {retry_seconds:.0f}s)") from exc
            sleep(delay)
            delay = min(delay * 2, MAX_DELAY)


class _Retry(Exception):
    pass


def _check_status(response: httpx.Response, what: str) -> None:
    if response.status_code >= 500 or response.status_code == 429:
        raise _Retry(f"HTTP {response.status_code}")
    if response.status_code >= 300:
        body = response.read()[:300].decode(errors="replace")
        raise TransferError(f"{what}: HTTP {response.status_code}: {body}")


def download(
    grant: Download,
    target: Path,
    *,
    timeout: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Fetch ``grant`` into ``target`` (decompressed), checking its size and sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    os.close(fd)
    packed = Path(tmp)

    def fetch() -> None:
        with (
            httpx.stream("GET", grant.url, headers=grant.headers, timeout=timeout) as response,
            open(packed, "wb") as out,
        ):
            _check_status(response, "download")
            for chunk in response.iter_bytes(_CHUNK):
                out.write(chunk)

    try:
        _retrying("download", fetch, sleep=sleep, clock=clock)
        digest, size = hashlib.sha256(), 0
        with open(packed, "rb") as raw, open(target, "wb") as out:
            source = gzip.GzipFile(fileobj=raw, mode="rb") if grant.gzip else raw
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > grant.max_bytes:
                    raise TransferError(f"download: more than {grant.max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
    except (OSError, EOFError) as exc:
        raise TransferError(f"download: unreadable content ({exc})") from exc
    finally:
        packed.unlink(missing_ok=True)
    if grant.size is not None and size != grant.size:
        raise TransferError(f"download: {size} bytes, the grant names {grant.size}")
    if grant.sha256 is not None and digest.hexdigest() != grant.sha256:
        raise TransferError("download: the content does not match the grant's sha256")


def upload(
    grant: Upload,
    source: Path,
    *,
    timeout: float = 600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> UploadedEvidence:
    """Compress ``source`` and send it where ``grant`` says; what the report names."""
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        packed = Path(tmp) / (source.name + ".gz")
        sha256, size, stored = gzip_file(source, packed)
        if stored > grant.max_bytes:
            raise TransferError(
                f"upload of {grant.key}: {stored} bytes compressed, the grant allows "
                f"{grant.max_bytes}"
            )

        def chunks() -> Iterator[bytes]:
            with open(packed, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk

        def send() -> None:
            with open(packed, "rb") as fh:
                if grant.method == "PUT":
                    headers = {**grant.headers, "Content-Length": str(stored)}
                    response = httpx.put(
                        grant.url, content=chunks(), headers=headers, timeout=timeout
                    )
                else:
                    files = {"file": (packed.name, fh, "application/gzip")}
                    response = httpx.post(
                        grant.url,
                        data=grant.fields,
                        files=files,
                        headers=grant.headers,
                        timeout=timeout,
                    )
            _check_status(response, f"upload of {grant.key}")

        _retrying(f"upload of {grant.key}", send, sleep=sleep, clock=clock)
    return UploadedEvidence(key=grant.key, sha256=sha256, size=size, stored_bytes=stored)

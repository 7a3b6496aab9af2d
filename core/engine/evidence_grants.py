"""Grants: what one runner pod may read from and write to the evidence store, nothing more.

Why: bulk (the runner request with its prompt and patch, the full diff, the full log) must
not travel through etcd, environment variables or the pod log, and runner pods run
untrusted code, so they must hold no store credentials. The operator therefore hands each
attempt's pod a :class:`Grant`: a download per input (URL, sha256, size) and an upload per
output (URL, the one key it writes, the most bytes it may send), valid until the attempt's
backstop deadline. Two backends issue them behind one Protocol (:class:`GrantingStore`):

* :class:`LocalGrantingStore`: the operator's own directory (single replica, on its volume),
  served by the operator over HTTP (``core.kube.evidence_server``); each URL carries an
  HMAC-SHA256 token over (method, key, byte limit, expiry) that the server checks before it
  reads or writes a byte. Why HMAC tokens and not a library: the check is twenty lines of
  the standard library (``hmac.compare_digest``), and a JWT library would add algorithms
  and key types we must then refuse.
* :class:`~core.engine.evidence_s3.S3EvidenceStore`: presigned GET URLs and presigned POST
  forms whose policy carries ``content-length-range`` (the object store enforces the size).

A pod uploads to ``incoming/...`` only; the operator then checks the sha256 and size the
runner reported against what arrived (:func:`verify_upload`) before it records anything,
and moves a diff to its content address (:func:`adopt_patch`). Uploaded objects are gzip
(the key ends in ``.gz``); sizes and hashes are of the content, as everywhere in the store.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal, Protocol
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from core.engine.evidence import (
    EvidenceRef,
    EvidenceStore,
    LocalEvidenceStore,
    patch_key,
)
from core.errors import EvidenceError

#: Environment variable of a runner container holding its :class:`Grant` (JSON, a few KiB).
GRANT_ENV = "ORCHESTRATOR_GRANT"
INCOMING = "incoming"
REQUESTS = "requests"
_CHUNK = 1024 * 1024


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Download(_Frozen):
    """One object a pod may read."""

    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    sha256: str | None = Field(default=None, description="Of the content (after gunzip).")
    size: int | None = Field(default=None, ge=0, description="Bytes of the content.")
    max_bytes: int = Field(ge=0, description="Refuse content larger than this.")
    gzip: bool = Field(description="The object is stored gzip-compressed.")


class Upload(_Frozen):
    """One object a pod may write: exactly ``key``, at most ``max_bytes`` sent."""

    key: str
    url: str
    method: Literal["PUT", "POST"]
    fields: dict[str, str] = Field(
        default_factory=dict, description="Form fields of a POST (an S3 presigned POST)."
    )
    headers: dict[str, str] = Field(default_factory=dict)
    max_bytes: int = Field(ge=0, description="Bytes the store accepts (compressed, as sent).")


class Grant(_Frozen):
    """What one attempt's pod may read and write, until ``expires_at``."""

    expires_at: datetime
    downloads: dict[str, Download] = Field(default_factory=dict)
    uploads: dict[str, Upload] = Field(default_factory=dict)

    def env_value(self) -> str:
        return self.model_dump_json(exclude_defaults=True)

    def only(self, *, downloads: bool) -> Grant:
        """The part one container needs: the init container reads, the runner writes."""
        if downloads:
            return self.model_copy(update={"uploads": {}})
        return self.model_copy(update={"downloads": {}})


class UploadedEvidence(_Frozen):
    """What a runner reports about one object it uploaded (its pod log carries only this)."""

    key: str
    sha256: str
    size: int = Field(ge=0, description="Bytes of the content (uncompressed).")
    stored_bytes: int = Field(ge=0, description="Bytes sent (gzip).")


class GrantingStore(EvidenceStore, Protocol):
    """An evidence store that can hand out grants and move objects (both backends)."""

    def put_raw(self, key: str, source: Path) -> None:
        """Store ``source`` as it is (already compressed when ``key`` ends in ``.gz``)."""
        ...

    def put_object(self, key: str, data: bytes) -> None:
        """Store ``data`` as it is, atomically (a small object: a runner request)."""
        ...

    def move(self, source: str, target: str) -> None:
        """Rename ``source`` to ``target`` (replacing it); :class:`EvidenceError` if absent."""
        ...

    def download_grant(
        self,
        key: str,
        *,
        sha256: str | None,
        size: int | None,
        max_bytes: int,
        expires_at: datetime,
    ) -> Download: ...

    def upload_grant(self, key: str, *, max_bytes: int, expires_at: datetime) -> Upload: ...


# --------------------------------------------------------------------------- keys


def incoming_key(scope: str, uid: str, attempt: int, role: str, name: str) -> str:
    """Where one attempt's pod uploads ``name`` (``diff.gz``, ``log.jsonl.gz``)."""
    return f"{INCOMING}/{scope or '-'}/{uid or '-'}/{attempt}-{role}/{name}"


def gzip_file(source: Path, target: Path, level: int = 6) -> tuple[str, int, int]:
    """Compress ``source`` into ``target``; (sha256 and size of the content, stored bytes).

    ``mtime=0`` and no file name: the same content always compresses to the same bytes.
    """
    digest = hashlib.sha256()
    size = 0
    with (
        open(source, "rb") as src,
        open(target, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz,
    ):
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            gz.write(chunk)
    return digest.hexdigest(), size, target.stat().st_size


def store_request(store: GrantingStore, data: bytes) -> tuple[str, str, int]:
    """Put a runner request in the store, content-addressed: (key, sha256, size).

    Compressed in memory (the operator refuses a request above 8 MiB): no spool files,
    one write; ``mtime=0`` so the same request always stores the same bytes."""
    sha = hashlib.sha256(data).hexdigest()
    key = f"{REQUESTS}/{sha}.json.gz"
    if not store.exists(key):
        store.put_object(key, gzip.compress(data, compresslevel=6, mtime=0))
    return key, sha, len(data)


def verify_upload(store: EvidenceStore, uploaded: UploadedEvidence, *, max_size: int) -> str | None:
    """A problem with what a pod uploaded, or None when the object holds exactly the content
    the runner reported (sha256 and size). Reads at most ``max_size`` + 1 content bytes, so
    a gzip bomb costs nothing."""
    if uploaded.size > max_size:
        return f"{uploaded.key}: {uploaded.size} bytes reported, more than the limit {max_size}"
    digest = hashlib.sha256()
    seen = 0
    try:
        with store.open(uploaded.key) as fh:
            while chunk := fh.read(min(_CHUNK, uploaded.size + 1 - seen) or 1):
                digest.update(chunk)
                seen += len(chunk)
                if seen > uploaded.size:
                    break
    except EvidenceError:
        return f"{uploaded.key}: not in the evidence store (the upload did not arrive)"
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return f"{uploaded.key}: unreadable ({exc})"
    if seen != uploaded.size:
        more = "+" if seen > uploaded.size else ""
        return f"{uploaded.key}: {seen}{more} bytes stored, {uploaded.size} reported"
    if digest.hexdigest() != uploaded.sha256:
        return f"{uploaded.key}: content does not match the reported sha256"
    return None


def adopt_patch(store: GrantingStore, uploaded: UploadedEvidence, *, max_size: int) -> EvidenceRef:
    """Verify an uploaded diff and give it its content address (``patches/<sha256>.diff.gz``).

    Idempotent: after a crash between the move and the record, the incoming object is gone
    and the content-addressed one is checked instead. :class:`EvidenceError` names a problem.
    """
    target = patch_key(uploaded.sha256)
    if store.exists(uploaded.key):
        problem = verify_upload(store, uploaded, max_size=max_size)
        if problem is not None:
            raise EvidenceError(problem)
        if store.exists(target):
            store.delete(uploaded.key)  # the same content is stored already
        else:
            store.move(uploaded.key, target)
    elif not store.exists(target):
        raise EvidenceError(
            f"{uploaded.key}: not in the evidence store (the upload did not arrive)"
        )
    else:
        adopted = uploaded.model_copy(update={"key": target})
        problem = verify_upload(store, adopted, max_size=max_size)
        if problem is not None:
            raise EvidenceError(problem)
    return EvidenceRef(target, uploaded.sha256, uploaded.size, uploaded.stored_bytes)


def read_upload(store: EvidenceStore, uploaded: UploadedEvidence, *, max_size: int) -> bytes:
    """The content of a verified upload (a log: bounded by its cap)."""
    problem = verify_upload(store, uploaded, max_size=max_size)
    if problem is not None:
        raise EvidenceError(problem)
    with store.open(uploaded.key) as fh:
        return fh.read(uploaded.size)


# --------------------------------------------------------------------------- HMAC tokens


class GrantError(Exception):
    """A token that does not allow the request (forged, expired, another key or method)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GrantSigner:
    """HMAC-SHA256 tokens naming (method, key, byte limit, expiry); checked by the server."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("the grant secret needs at least 32 bytes")
        self._secret = secret
        self._clock = clock

    def token(self, method: str, key: str, max_bytes: int, expires_at: datetime) -> str:
        claims = {"m": method, "k": key, "n": max_bytes, "e": int(expires_at.timestamp())}
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        mac = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(mac)}"

    def check(self, token: str, method: str, key: str) -> int:
        """The byte limit the token grants for ``method`` on ``key``; :class:`GrantError`."""
        try:
            body, mac = token.split(".", 1)
            expected = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_unb64(mac), expected):
                raise GrantError("bad signature")
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError) as exc:
            raise GrantError(f"malformed grant: {exc}") from None
        if claims.get("m") != method or claims.get("k") != key:
            raise GrantError("the grant is for another object or method")
        if int(claims.get("e", 0)) < self._clock():
            raise GrantError("the grant has expired")
        return int(claims.get("n", 0))


def load_secret(path: Path) -> bytes:
    """The operator's grant secret: created once (0600) on its volume, kept across restarts,
    so the grants of Jobs created before a restart still verify."""
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".grant-key-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32))
    os.chmod(tmp, 0o600)
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)  # the first writer wins; a concurrent one reads the winner's key
    Path(tmp).unlink(missing_ok=True)
    return path.read_bytes()


class LocalGrantingStore(LocalEvidenceStore):
    """The local directory store, granting access through the operator's evidence server
    at ``base_url`` (e.g. ``http://10.96.0.12:8081``: what runner pods connect to)."""

    def __init__(self, root: Path, *, base_url: str, signer: GrantSigner, level: int = 6) -> None:
        super().__init__(root, level=level)
        self.base_url = base_url.rstrip("/")
        self.signer = signer

    def object_url(self, key: str, token: str) -> str:
        return f"{self.base_url}/v1/objects/{quote(key)}?grant={token}"

    def put_raw(self, key: str, source: Path) -> None:
        with self._atomic(key) as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, _CHUNK)

    def put_object(self, key: str, data: bytes) -> None:
        with self._atomic(key) as out:
            out.write(data)

    @contextlib.contextmanager
    def _atomic(self, key: str) -> Iterator[BinaryIO]:
        """A temp file beside the target, fsynced and renamed onto it when the block ends."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def move(self, source: str, target: str) -> None:
        src, dst = self.path(source), self.path(target)
        if not src.is_file():
            raise EvidenceError(f"evidence {source} is not in the store at {self.root}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        with contextlib.suppress(OSError):
            src.parent.rmdir()

    def download_grant(
        self,
        key: str,
        *,
        sha256: str | None,
        size: int | None,
        max_bytes: int,
        expires_at: datetime,
    ) -> Download:
        token = self.signer.token("GET", key, max_bytes, expires_at)
        return Download(
            url=self.object_url(key, token),
            sha256=sha256,
            size=size,
            max_bytes=max_bytes,
            gzip=key.endswith(".gz"),
        )

    def upload_grant(self, key: str, *, max_bytes: int, expires_at: datetime) -> Upload:
        token = self.signer.token("PUT", key, max_bytes, expires_at)
        return Upload(key=key, url=self.object_url(key, token), method="PUT", max_bytes=max_bytes)

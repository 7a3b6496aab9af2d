"""The evidence store: bulk evidence (full patches) kept by content hash, outside the records.

Why: the ledger, the database, the results file and a TaskExecution's status must stay
small, and a patch must never be cut (a prefix of a diff cannot be applied). So every
attempt's full diff goes here, content-addressed (``patches/<sha256>.diff.gz``), and the
records carry only its sha256, sizes and the key (:class:`EvidenceRef`).

:class:`EvidenceStore` is the interface, like an httpx transport: :class:`LocalEvidenceStore`
(a directory; the embedded default, and a single-replica operator on its volume) is the one
backend today. An S3-compatible backend implements the same five methods over a bucket and
prefix with the same keys; runner pods would then upload through a per-attempt scoped grant
(a presigned PUT for ``incoming/<attempt>/...``) and the operator verifies the sha256 and
moves the object to its content address with :meth:`EvidenceStore.put_file` semantics, so
nothing in the records changes.

Compression: gzip from the standard library. A diff compresses 4-10x with it; zstd would be
faster with a better ratio, but needs a compiled dependency in every image (operator and
runner), while gzip needs nothing, is readable with ``zcat`` by whoever debugs a store, and is
a standard ``Content-Encoding`` for an object store. The encoding is part of the key, so a
later ``.zst`` backend reads old objects unchanged. Keys ending in ``.diff`` are uncompressed
copies written by versions before migration ``0004``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

from core.errors import EvidenceError

PATCHES = "patches"
GZIP_SUFFIX = ".diff.gz"
LEGACY_SUFFIX = ".diff"
_CHUNK = 1024 * 1024
#: Default evidence directory of a work dir (the ledger's, where patches always lived).
LEDGER_DIR = ".ledger"


@dataclass(frozen=True, slots=True)
class EvidenceRef:
    """Where a piece of evidence is, and what it is: enough to find and check it."""

    key: str
    sha256: str
    #: Bytes of the evidence itself (uncompressed).
    size: int
    #: Bytes the store keeps (compressed).
    stored_bytes: int


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    stored_bytes: int
    modified: datetime


def patch_key(sha256: str) -> str:
    return f"{PATCHES}/{sha256}{GZIP_SUFFIX}"


def key_sha256(key: str) -> str | None:
    """The sha256 a content-addressed key names (None for a key that names none)."""
    name = key.rsplit("/", 1)[-1]
    for suffix in (GZIP_SUFFIX, LEGACY_SUFFIX):
        if name.endswith(suffix):
            stem = name.removesuffix(suffix)
            return stem if len(stem) == 64 else None
    return None


class EvidenceStore(Protocol):
    """Content-addressed bulk evidence; every method is idempotent."""

    def put_file(self, source: Path, sha256: str | None = None) -> EvidenceRef:
        """Store a patch from a file (compressed); a stored object of that content is kept.

        ``sha256`` (of ``source``), when known, saves reading the file twice.
        """
        ...

    def open(self, key: str) -> IO[bytes]:
        """The evidence, decompressed, as a binary stream; :class:`EvidenceError` if absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool:
        """Remove an object; True if it was there."""
        ...

    def objects(self, prefix: str = PATCHES) -> Iterator[StoredObject]: ...


def put_bytes(store: EvidenceStore, data: bytes, spool_dir: Path | None = None) -> EvidenceRef:
    """Store ``data`` (a patch held in memory: the Kubernetes runner's report)."""
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="evidence-", delete=False) as fh:
        fh.write(data)
    try:
        return store.put_file(Path(fh.name), hashlib.sha256(data).hexdigest())
    finally:
        Path(fh.name).unlink(missing_ok=True)


def read_all(store: EvidenceStore, key: str) -> bytes:
    with store.open(key) as fh:
        return fh.read()


def check(store: EvidenceStore, key: str, sha256: str | None = None) -> str | None:
    """A problem with a stored object (missing, edited), or None when its content hashes to
    ``sha256`` (default: the sha256 its key names)."""
    expected = sha256 or key_sha256(key)
    if not store.exists(key):
        return "missing"
    digest = hashlib.sha256()
    try:
        with store.open(key) as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return f"unreadable ({exc})"
    if expected is not None and digest.hexdigest() != expected:
        return "edited (content does not match its sha256)"
    return None


class LocalEvidenceStore:
    """A directory: ``<root>/patches/<sha256>.diff.gz``, written atomically (temp + rename)."""

    def __init__(self, root: Path, *, level: int = 6) -> None:
        self.root = root
        self.level = level
        self._real_root = root.resolve()

    def path(self, key: str) -> Path:
        target = (self.root / key).resolve()
        if not target.is_relative_to(self._real_root):
            raise EvidenceError(f"evidence key {key!r} points outside the store")
        return target

    def put_file(self, source: Path, sha256: str | None = None) -> EvidenceRef:
        size = source.stat().st_size
        if sha256 is None:
            sha256 = file_sha256(source)
        key = patch_key(sha256)
        target = self.path(key)
        if target.exists():
            return EvidenceRef(key, sha256, size, target.stat().st_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-", suffix=".tmp")
        try:
            # mtime=0 and no file name: the same patch always compresses to the same bytes
            with (
                os.fdopen(fd, "wb") as raw,
                open(source, "rb") as src,
            ):
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=self.level, mtime=0) as gz:
                    shutil.copyfileobj(src, gz, _CHUNK)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return EvidenceRef(key, sha256, size, target.stat().st_size)

    def open(self, key: str) -> IO[bytes]:
        path = self.path(key)
        try:
            if key.endswith(".gz"):
                return gzip.open(path, "rb")  # type: ignore[return-value]
            return open(path, "rb")
        except FileNotFoundError as exc:
            raise EvidenceError(f"evidence {key} is not in the store at {self.root}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> bool:
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty
        return True

    def objects(self, prefix: str = PATCHES) -> Iterator[StoredObject]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if not path.is_file():
                continue
            st = path.stat()
            yield StoredObject(
                str(path.relative_to(self.root)),
                st.st_size,
                datetime.fromtimestamp(st.st_mtime, UTC),
            )


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_store(workdir: Path) -> LocalEvidenceStore:
    """The embedded backend's store: ``<workdir>/.ledger``."""
    return LocalEvidenceStore(workdir / LEDGER_DIR)

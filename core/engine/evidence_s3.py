"""The evidence store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, SeaweedFS...).

Why: a store on the operator's volume serves one replica; a bucket is shared by every
operator replica (and by ``orchestrator export`` on a laptop), and the object store itself
expires what is temporary (lifecycle rules). The keys are the local store's
(``patches/<sha256>.diff.gz``, ``requests/...``, ``incoming/...``) under an optional prefix.

Why boto3: it is AWS's own maintained SDK and the reference implementation of SigV4, it
speaks to any S3-compatible endpoint (``endpoint_url``), and it has the two calls grants
need: presigned GET URLs and presigned POST forms with a ``content-length-range``
condition, which makes the object store refuse an upload over the byte limit (a presigned
PUT cannot bound the size). Runner pods get only those URLs and forms, never the keys.
``public_endpoint`` signs them for the address pods reach (SigV4 signs the host), which may
differ from the operator's own (a Service name vs. an address).
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from core.engine.evidence import PATCHES, EvidenceRef, StoredObject, file_sha256, patch_key
from core.engine.evidence_grants import INCOMING, REQUESTS, Download, Upload
from core.errors import EvidenceError

_CHUNK = 1024 * 1024


class S3EvidenceStore:
    """``s3://<bucket>/<prefix><key>`` through boto3 (client made by :func:`s3_client`)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str = "",
        presigner: Any | None = None,
        level: int = 6,
    ) -> None:
        self.client = client
        self.presigner = presigner or client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.level = level

    def _name(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise EvidenceError(f"evidence key {key!r} points outside the store")
        return self.prefix + key

    # ------------------------------------------------------------------ EvidenceStore

    def put_file(self, source: Path, sha256: str | None = None) -> EvidenceRef:
        size = source.stat().st_size
        sha256 = sha256 or file_sha256(source)
        key = patch_key(sha256)
        head = self._head(key)
        if head is not None:
            return EvidenceRef(key, sha256, size, int(head["ContentLength"]))
        with tempfile.TemporaryDirectory() as tmp:
            packed = Path(tmp) / "patch.gz"
            with (
                open(source, "rb") as src,
                open(packed, "wb") as raw,
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=self.level, mtime=0) as gz,
            ):
                while chunk := src.read(_CHUNK):
                    gz.write(chunk)
            self.put_raw(key, packed)
            return EvidenceRef(key, sha256, size, packed.stat().st_size)

    def open(self, key: str) -> IO[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
        except self.client.exceptions.NoSuchKey as exc:
            raise EvidenceError(
                f"evidence {key} is not in s3://{self.bucket}/{self.prefix}"
            ) from exc
        if key.endswith(".gz"):
            return gzip.GzipFile(fileobj=body, mode="rb")  # type: ignore[return-value]
        return body  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def delete(self, key: str) -> bool:
        existed = self.exists(key)
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        return existed

    def objects(self, prefix: str = PATCHES) -> Iterator[StoredObject]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._name(prefix.rstrip("/") + "/")
        )
        for page in pages:
            for obj in page.get("Contents") or []:
                modified = obj["LastModified"]
                if modified.tzinfo is None:
                    modified = modified.replace(tzinfo=UTC)
                yield StoredObject(obj["Key"][len(self.prefix) :], int(obj["Size"]), modified)

    # ------------------------------------------------------------------ GrantingStore

    def put_raw(self, key: str, source: Path) -> None:
        self.client.upload_file(str(source), self.bucket, self._name(key))

    def put_object(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data)

    def move(self, source: str, target: str) -> None:
        if not self.exists(source):
            raise EvidenceError(f"evidence {source} is not in s3://{self.bucket}/{self.prefix}")
        self.client.copy_object(
            Bucket=self.bucket,
            Key=self._name(target),
            CopySource={"Bucket": self.bucket, "Key": self._name(source)},
        )
        self.client.delete_object(Bucket=self.bucket, Key=self._name(source))

    def download_grant(
        self,
        key: str,
        *,
        sha256: str | None,
        size: int | None,
        max_bytes: int,
        expires_at: datetime,
    ) -> Download:
        url = self.presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._name(key)},
            ExpiresIn=_seconds_until(expires_at),
        )
        return Download(
            url=url, sha256=sha256, size=size, max_bytes=max_bytes, gzip=key.endswith(".gz")
        )

    def upload_grant(self, key: str, *, max_bytes: int, expires_at: datetime) -> Upload:
        post = self.presigner.generate_presigned_post(
            self.bucket,
            self._name(key),
            Conditions=[["content-length-range", 0, max_bytes]],
            ExpiresIn=_seconds_until(expires_at),
        )
        return Upload(
            key=key,
            url=post["url"],
            method="POST",
            fields={str(k): str(v) for k, v in post["fields"].items()},
            max_bytes=max_bytes,
        )

    # ------------------------------------------------------------------ retention

    def lifecycle_rules(
        self, *, temporary_days: int, patch_days: int | None
    ) -> list[dict[str, Any]]:
        """Expire what pods uploaded and requests after ``temporary_days`` (longer than any
        attempt may run), and patches after ``patch_days`` when set (None: kept; prune them
        with ``orchestrator gc``, which keeps what the ledger references)."""
        rules: list[dict[str, Any]] = [
            {
                "ID": f"orchestrator-{name}",
                "Filter": {"Prefix": self._name(name + "/")},
                "Status": "Enabled",
                "Expiration": {"Days": temporary_days},
            }
            for name in (INCOMING, REQUESTS)
        ]
        if patch_days is not None:
            rules.append(
                {
                    "ID": f"orchestrator-{PATCHES}",
                    "Filter": {"Prefix": self._name(PATCHES + "/")},
                    "Status": "Enabled",
                    "Expiration": {"Days": patch_days},
                }
            )
        return rules

    def ensure_lifecycle(self, *, temporary_days: int, patch_days: int | None) -> None:
        """Put the bucket's lifecycle rules (replaces the bucket's configuration)."""
        self.client.put_bucket_lifecycle_configuration(
            Bucket=self.bucket,
            LifecycleConfiguration={
                "Rules": self.lifecycle_rules(temporary_days=temporary_days, patch_days=patch_days)
            },
        )

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._name(key))  # type: ignore[no-any-return]
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise


def _seconds_until(when: datetime) -> int:
    return max(60, int((when - datetime.now(UTC)).total_seconds()))


def s3_client(
    endpoint: str | None,
    *,
    region: str = "us-east-1",
    access_key: str | None = None,
    secret_key: str | None = None,
    path_style: bool = True,
) -> Any:
    """A boto3 S3 client (SigV4; path-style addressing, which every S3-compatible server
    speaks). Credentials: the arguments, else boto3's usual chain (env, web identity...)."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if path_style else "auto"},
        retries={"max_attempts": 5, "mode": "standard"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def store_from_env(environ: Mapping[str, str]) -> S3EvidenceStore | None:
    """The operator's S3 store as its settings name it (``ORCHESTRATOR_EVIDENCE_BACKEND=s3``,
    ``ORCHESTRATOR_S3_*``), for ``orchestrator export`` and ``gc``; None: the local store."""
    if environ.get("ORCHESTRATOR_EVIDENCE_BACKEND") != "s3":
        return None
    bucket = environ.get("ORCHESTRATOR_S3_BUCKET")
    if not bucket:
        raise EvidenceError(
            "ORCHESTRATOR_S3_BUCKET: required with ORCHESTRATOR_EVIDENCE_BACKEND=s3"
        )
    client = s3_client(
        environ.get("ORCHESTRATOR_S3_ENDPOINT"),
        region=environ.get("ORCHESTRATOR_S3_REGION") or "us-east-1",
        access_key=environ.get("ORCHESTRATOR_S3_ACCESS_KEY_ID"),
        secret_key=environ.get("ORCHESTRATOR_S3_SECRET_ACCESS_KEY"),
    )
    return S3EvidenceStore(client, bucket, prefix=environ.get("ORCHESTRATOR_S3_PREFIX", ""))

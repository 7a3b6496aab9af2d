"""Grants and the operator's evidence server: a pod can read and write exactly what its grant
names, no more bytes than it allows, until it expires; and what arrives is checked."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from core.engine.evidence_grants import (
    GrantError,
    GrantSigner,
    LocalGrantingStore,
    UploadedEvidence,
    adopt_patch,
    store_request,
    verify_upload,
)
from core.errors import EvidenceError
from core.kube.evidence_server import EvidenceServer

SECRET = b"0123456789abcdef0123456789abcdef"


def test_a_token_names_method_key_limit_and_expiry() -> None:
    now = [1000.0]
    signer = GrantSigner(SECRET, clock=lambda: now[0])
    expires = datetime.fromtimestamp(2000, UTC)
    token = signer.token("PUT", "incoming/a/b", 10, expires)
    assert signer.check(token, "PUT", "incoming/a/b") == 10
    for method, key in (("GET", "incoming/a/b"), ("PUT", "incoming/a/c")):
        with pytest.raises(GrantError, match="another object"):
            signer.check(token, method, key)
    body, mac = token.split(".")
    with pytest.raises(GrantError, match="signature"):
        signer.check(body.replace("A", "B", 1) + "." + mac, "PUT", "incoming/a/b")
    with pytest.raises(GrantError, match="signature"):
        GrantSigner(b"x" * 32).check(token, "PUT", "incoming/a/b")
    now[0] = 2001.0
    with pytest.raises(GrantError, match="expired"):
        signer.check(token, "PUT", "incoming/a/b")


def test_the_server_refuses_what_the_grant_does_not_allow(tmp_path: Path) -> None:
    async def main() -> None:
        signer = GrantSigner(SECRET)
        store = LocalGrantingStore(tmp_path / "store", base_url="", signer=signer)
        server = EvidenceServer(store, signer)
        port = await server.start("127.0.0.1", 0)
        store.base_url = f"http://127.0.0.1:{port}"
        soon = datetime.now(UTC) + timedelta(minutes=5)
        try:
            async with httpx.AsyncClient() as client:
                up = store.upload_grant(
                    "incoming/x/1-adapter/diff.gz", max_bytes=100, expires_at=soon
                )
                ok = await client.put(up.url, content=b"a" * 100)
                assert ok.status_code == 201
                assert store.path("incoming/x/1-adapter/diff.gz").read_bytes() == b"a" * 100
                big = await client.put(up.url, content=b"a" * 101)
                assert big.status_code == 413  # over the granted size: nothing replaced
                assert store.path("incoming/x/1-adapter/diff.gz").read_bytes() == b"a" * 100

                async def chunks() -> object:
                    for _ in range(3):
                        yield b"b" * 60  # no Content-Length: cut off while streaming

                streamed = await client.put(up.url, content=chunks())  # type: ignore[arg-type]
                assert streamed.status_code == 413
                other = up.url.replace("diff.gz", "log.gz")
                assert (await client.put(other, content=b"x")).status_code == 403
                assert (await client.get(up.url)).status_code == 403  # a PUT grant only
                no_grant = up.url.split("?")[0]
                assert (await client.put(no_grant, content=b"x")).status_code == 403
                # downloads: the object as stored; uploads never outside incoming/
                (tmp_path / "r.gz").write_bytes(gzip.compress(b"request"))
                store.put_raw("requests/r.json.gz", tmp_path / "r.gz")
                down = store.download_grant(
                    "requests/r.json.gz", sha256=None, size=None, max_bytes=10, expires_at=soon
                )
                got = await client.get(down.url)
                assert got.status_code == 200 and gzip.decompress(got.content) == b"request"
                sneaky = store.upload_grant("requests/r.json.gz", max_bytes=10, expires_at=soon)
                assert (await client.put(sneaky.url, content=b"x")).status_code == 403
                escape = store.upload_grant("incoming/../../x", max_bytes=10, expires_at=soon)
                assert (await client.put(escape.url, content=b"x")).status_code in (403, 404)
                assert not (tmp_path / "x").exists()
        finally:
            await server.close()

    asyncio.run(main())


def test_an_upload_is_adopted_only_when_it_is_what_the_runner_reported(tmp_path: Path) -> None:
    store = LocalGrantingStore(tmp_path, base_url="", signer=GrantSigner(SECRET))
    content = b"diff --git a/x b/x\n" * 100
    (tmp_path / "u.gz").write_bytes(gzip.compress(content))
    key = "incoming/ns/uid/1-adapter/diff.gz"
    store.put_raw(key, tmp_path / "u.gz")
    sha = hashlib.sha256(content).hexdigest()
    good = UploadedEvidence(key=key, sha256=sha, size=len(content), stored_bytes=1)
    assert verify_upload(store, good.model_copy(update={"sha256": "0" * 64}), max_size=10**6)
    assert verify_upload(store, good.model_copy(update={"size": 5}), max_size=10**6)
    assert "limit" in (verify_upload(store, good, max_size=10) or "")
    with pytest.raises(EvidenceError):
        adopt_patch(store, good.model_copy(update={"sha256": "0" * 64}), max_size=10**6)
    ref = adopt_patch(store, good, max_size=10**6)
    assert ref.key == f"patches/{sha}.diff.gz" and not store.exists(key)
    assert adopt_patch(store, good, max_size=10**6) == ref  # a replay after the move


def test_a_runner_request_is_stored_once_by_its_content_and_atomically(tmp_path: Path) -> None:
    store = LocalGrantingStore(tmp_path / ".ledger", base_url="", signer=GrantSigner(b"k" * 32))
    data = b'{"kind": "adapter", "prompt": "' + b"p" * 5000 + b'"}'
    key, sha, size = store_request(store, data)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert key == f"requests/{sha}.json.gz"
    stored = store.path(key).read_bytes()
    assert gzip.decompress(stored) == data
    assert store_request(store, data) == (key, sha, size)  # the same content: not rewritten
    assert store.path(key).read_bytes() == stored
    assert [p.name for p in store.path(key).parent.iterdir()] == [f"{sha}.json.gz"]  # no temp

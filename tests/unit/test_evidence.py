"""core.engine.evidence and core.engine.retention: the local store and gc's policy."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.engine.evidence import (
    LocalEvidenceStore,
    check,
    key_sha256,
    patch_key,
    put_bytes,
    read_all,
)
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore, store_request
from core.engine.retention import PRUNED_FILE, RetentionPolicy, collect, pruned_keys
from core.errors import EvidenceError


def test_put_is_content_addressed_compressed_and_idempotent(tmp_path: Path) -> None:
    store = LocalEvidenceStore(tmp_path / "store")
    data = b"diff --git a/x b/x\n" + b"+line\n" * 10_000
    ref = put_bytes(store, data, tmp_path)
    assert ref.key == patch_key(hashlib.sha256(data).hexdigest()) == f"patches/{ref.sha256}.diff.gz"
    assert ref.size == len(data) and ref.stored_bytes < len(data) // 10
    assert key_sha256(ref.key) == ref.sha256
    first = store.path(ref.key).read_bytes()
    assert put_bytes(store, data, tmp_path) == ref and store.path(ref.key).read_bytes() == first
    assert gzip.decompress(first) == data and read_all(store, ref.key) == data
    assert check(store, ref.key) is None
    assert not list(tmp_path.glob("evidence-*"))  # the spool file went


def test_check_names_missing_and_edited_objects(tmp_path: Path) -> None:
    store = LocalEvidenceStore(tmp_path)
    ref = put_bytes(store, b"abc\n", tmp_path)
    store.path(ref.key).write_bytes(gzip.compress(b"abd\n"))
    assert check(store, ref.key) == "edited (content does not match its sha256)"
    store.path(ref.key).write_bytes(b"not gzip")
    assert (check(store, ref.key) or "").startswith("unreadable")
    assert store.delete(ref.key) and not store.delete(ref.key)
    assert check(store, ref.key) == "missing"
    with pytest.raises(EvidenceError):
        read_all(store, ref.key)


def test_keys_cannot_leave_the_store(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError):
        LocalEvidenceStore(tmp_path / "s").path("../outside.diff")


def age(path: Path, days: float) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t))


def test_gc_keeps_referenced_patches_unless_told_and_leaves_tombstones(tmp_path: Path) -> None:
    store = LocalEvidenceStore(tmp_path / ".ledger")
    logs = tmp_path / "logs" / "execution"
    logs.mkdir(parents=True)
    kept = put_bytes(store, b"referenced\n", tmp_path)
    orphan = put_bytes(store, b"orphan\n", tmp_path)
    young = put_bytes(store, b"young orphan\n", tmp_path)
    for ref in (kept, orphan):
        age(store.path(ref.key), 40)
    (logs / "done.jsonl").write_text("{}\n")
    (logs / "running.jsonl").write_text("{}\n")
    for name in ("done", "running"):
        age(logs / f"{name}.jsonl", 40)
    now = datetime.now(UTC)
    policy = RetentionPolicy(older_than=timedelta(days=30))

    dry = collect(store, logs, referenced={kept.key}, active_logs={"running"},
                  policy=RetentionPolicy(older_than=timedelta(days=30), dry_run=True), now=now)
    assert {i.name for i, _ in dry.removed} == {orphan.key, "done.jsonl"}
    assert store.exists(orphan.key)  # a dry run deletes nothing

    report = collect(store, logs, referenced={kept.key}, active_logs={"running"},
                     policy=policy, now=now)
    assert {i.name for i, _ in report.removed} == {orphan.key, "done.jsonl"}
    assert report.kept_referenced == 1
    assert store.exists(kept.key) and store.exists(young.key) and not store.exists(orphan.key)
    assert (logs / "running.jsonl").exists() and not (logs / "done.jsonl").exists()
    assert not (store.root / PRUNED_FILE).exists()

    told = RetentionPolicy(older_than=timedelta(days=30), include_referenced=True)
    report = collect(store, logs, referenced={kept.key}, active_logs=set(), policy=told, now=now)
    assert [i.name for i, _ in report.removed if i.kind == "patch"] == [kept.key]
    assert not store.exists(kept.key) and pruned_keys(store) == {kept.key}
    assert json.loads((store.root / PRUNED_FILE).read_text())["key"] == kept.key


def test_gc_size_limit_deletes_oldest_eligible_first(tmp_path: Path) -> None:
    store = LocalEvidenceStore(tmp_path / ".ledger")
    logs = tmp_path / "logs"
    logs.mkdir()
    for i, days in enumerate((5, 3, 1)):
        (logs / f"t{i}.jsonl").write_bytes(b"x" * 1000)
        age(logs / f"t{i}.jsonl", days)
    report = collect(store, logs, referenced=set(), active_logs=set(),
                     policy=RetentionPolicy(max_bytes=1500), now=datetime.now(UTC))
    assert [i.name for i, _ in report.removed] == ["t0.jsonl", "t1.jsonl"]
    assert report.remaining_bytes == 1000


def test_gc_deletes_runner_requests_and_pod_uploads_once_older_than_the_grace(
    tmp_path: Path,
) -> None:
    """The operator's store also holds requests/ and incoming/ (Kubernetes backend): they
    are temporary, but a young one may still be read by a pod starting or being adopted."""
    store = LocalGrantingStore(tmp_path / ".ledger", base_url="", signer=GrantSigner(b"k" * 32))
    key, _, _ = store_request(store, b'{"kind": "adapter"}')
    upload = tmp_path / "log.gz"
    upload.write_bytes(b"\x1f\x8b")
    old_upload = "incoming/ns/uid/1-adapter/log.jsonl.gz"
    young_upload = "incoming/ns/uid/2-adapter/log.jsonl.gz"
    store.put_raw(old_upload, upload)
    store.put_raw(young_upload, upload)
    age(store.path(key), 3)
    age(store.path(old_upload), 3)
    logs = tmp_path / "logs"
    logs.mkdir()
    report = collect(store, logs, referenced=set(), active_logs=set(),
                     policy=RetentionPolicy(older_than=timedelta(days=1)), now=datetime.now(UTC))  # fmt: skip
    assert {(i.kind, i.name) for i, _ in report.removed} == {
        ("request", key),
        ("upload", old_upload),
    }
    assert not store.exists(key) and not store.exists(old_upload) and store.exists(young_upload)
    # the size pass never takes a young one either
    report = collect(store, logs, referenced=set(), active_logs=set(),
                     policy=RetentionPolicy(max_bytes=0), now=datetime.now(UTC))  # fmt: skip
    assert report.removed == [] and store.exists(young_upload)

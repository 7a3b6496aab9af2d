"""Retention for the embedded work dir: what ``orchestrator gc`` may delete, and in what order.

Why a policy and not a cron ``find -mtime``: the evidence store is content-addressed and the
ledger (with its database mirror) is the record that references it. Deleting a patch the
ledger names breaks ``orchestrator export`` and ``ledger verify`` for that attempt, so:

* **Referenced patches** (named by a ledger entry or a ``patch_history`` row) are never
  deleted unless asked (``include_referenced``); when they are, each key is written to a
  tombstone file (``.ledger/pruned.jsonl``) that ``ledger verify`` reads, so a pruned patch
  is reported as pruned, not as tampering.
* **Unreferenced patches** (a crash between storing a diff and recording its attempt) and
  interrupted writes are garbage, deleted once older than the age limit and never younger
  than :data:`ORPHAN_GRACE` (an attempt being recorded right now has one for a moment).
* **Task logs** (``logs/execution/*.jsonl``) of tasks that are not running or waiting are
  deleted once older than the age limit (by modification time).
* **Runner requests and pod uploads** (``requests/``, ``incoming/``: the Kubernetes
  backend's, see ``core.engine.evidence_grants``) are temporary: the request is read when
  its pod starts, an upload is adopted (or discarded) when its attempt is recorded. They
  go like orphans, never younger than :data:`ORPHAN_GRACE`.

The store may be the local directory or an S3 bucket (``objects``/``delete`` of the
:class:`~core.engine.evidence.EvidenceStore` Protocol); on a bucket the lifecycle rules
expire the temporary prefixes as well, and tombstones go to the work dir's ledger directory.

An age limit applies first; a size limit then deletes what is eligible, oldest first, until
evidence and logs together fit (referenced patches only with ``include_referenced``). Nothing
else in the work dir (state files, the ledger, the database, ``logs/*.jsonl``) is touched.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.engine.evidence import PATCHES, EvidenceStore, LocalEvidenceStore
from core.engine.evidence_grants import INCOMING, REQUESTS

ORPHAN_GRACE = timedelta(hours=1)
PRUNED_FILE = "pruned.jsonl"


@dataclass(frozen=True)
class RetentionPolicy:
    older_than: timedelta | None = None
    max_bytes: int | None = None
    include_referenced: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Item:
    kind: str  # "patch", "orphan", "log", "temp", "request", "upload"
    name: str
    size: int
    modified: datetime
    referenced: bool = False


@dataclass
class GcReport:
    removed: list[tuple[Item, str]] = field(default_factory=list)
    kept_referenced: int = 0
    remaining_bytes: int = 0

    @property
    def freed_bytes(self) -> int:
        return sum(item.size for item, _ in self.removed)


def pruned_keys(store: LocalEvidenceStore | Path) -> set[str]:
    """Keys ``gc --include-referenced`` pruned (``store``: the local store or its root)."""
    root = store if isinstance(store, Path) else store.root
    path = root / PRUNED_FILE
    if not path.exists():
        return set()
    keys = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            keys.add(json.loads(raw)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


def inventory(
    store: EvidenceStore, logs_dir: Path, referenced: Collection[str], active_logs: set[str]
) -> list[Item]:
    """Everything gc may consider, with whether the ledger references it."""
    items = [
        Item("request" if prefix == REQUESTS else "upload", obj.key, obj.stored_bytes, obj.modified)
        for prefix in (REQUESTS, INCOMING)
        for obj in store.objects(prefix)
    ]
    items += [
        Item(
            "patch" if obj.key in referenced else "orphan",
            obj.key,
            obj.stored_bytes,
            obj.modified,
            obj.key in referenced,
        )
        for obj in store.objects(PATCHES)
        if not obj.key.rsplit("/", 1)[-1].startswith(".")
    ]
    patches = store.root / PATCHES if isinstance(store, LocalEvidenceStore) else None
    for temp in patches.glob(".put-*.tmp") if patches is not None and patches.is_dir() else ():
        st = temp.stat()
        items.append(Item("temp", temp.name, st.st_size, _mtime(st.st_mtime)))
    if logs_dir.is_dir():
        for log in logs_dir.glob("*.jsonl"):
            if log.stem in active_logs:
                continue
            st = log.stat()
            items.append(Item("log", log.name, st.st_size, _mtime(st.st_mtime)))
    return items


def _mtime(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def plan(items: Iterable[Item], policy: RetentionPolicy, now: datetime) -> list[tuple[Item, str]]:
    """Which items to delete and why, oldest first within the size pass."""
    items = list(items)
    chosen: list[tuple[Item, str]] = []
    taken: set[tuple[str, str]] = set()

    def eligible(item: Item) -> bool:
        if item.referenced and not policy.include_referenced:
            return False
        temporary = ("orphan", "temp", "request", "upload")
        return item.kind not in temporary or now - item.modified >= ORPHAN_GRACE

    if policy.older_than is not None:
        for item in items:
            if eligible(item) and now - item.modified >= policy.older_than:
                chosen.append((item, f"older than {policy.older_than}"))
                taken.add((item.kind, item.name))
    if policy.max_bytes is not None:
        left = [i for i in items if (i.kind, i.name) not in taken]
        total = sum(i.size for i in left)
        for item in sorted(left, key=lambda i: i.modified):
            if total <= policy.max_bytes:
                break
            if eligible(item):
                chosen.append((item, f"over the size limit of {policy.max_bytes} bytes"))
                total -= item.size
    return chosen


def collect(
    store: EvidenceStore,
    logs_dir: Path,
    *,
    referenced: Collection[str],
    active_logs: set[str],
    policy: RetentionPolicy,
    now: datetime,
    tombstones_dir: Path | None = None,
) -> GcReport:
    """Apply ``policy`` (or, with ``dry_run``, only say what it would delete).

    ``tombstones_dir``: where ``pruned.jsonl`` goes (default: the local store's root)."""
    items = inventory(store, logs_dir, referenced, active_logs)
    doomed = plan(items, policy, now)
    report = GcReport(removed=doomed)
    gone = {(i.kind, i.name) for i, _ in doomed}
    report.kept_referenced = sum(1 for i in items if i.referenced and (i.kind, i.name) not in gone)
    report.remaining_bytes = sum(i.size for i in items if (i.kind, i.name) not in gone)
    if policy.dry_run:
        return report
    tombstones = []
    for item, _ in doomed:
        if item.kind in ("patch", "orphan", "request", "upload"):
            store.delete(item.name)
            if item.referenced:
                tombstones.append({"key": item.name, "pruned_at": now.isoformat()})
        elif item.kind == "temp" and isinstance(store, LocalEvidenceStore):
            (store.root / PATCHES / item.name).unlink(missing_ok=True)
        else:
            (logs_dir / item.name).unlink(missing_ok=True)
    if tombstones:
        root = tombstones_dir or (store.root if isinstance(store, LocalEvidenceStore) else None)
        if root is None:
            raise ValueError("tombstones_dir: required for a store that is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        with open(root / PRUNED_FILE, "a", encoding="utf-8") as fh:
            for stone in tombstones:
                fh.write(json.dumps(stone) + "\n")
    return report

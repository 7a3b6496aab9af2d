"""Collecting an :class:`~core.testing.invariants.Snapshot`: the cluster, the database, the
ledger and the work dir, as they are at the end of a run and as they were during it.

Why observe during the run: the end state alone hides what the rules are about. A Job that was
created twice for one attempt and deleted by hand once, an Event the API server dropped after
its TTL (``--event-ttl``, one hour on the local cluster): only a recorder that listed them
while the run went on has seen them. :class:`ClusterRecorder` lists the operator's Jobs and
the namespaces' Events every few seconds in a thread of its own and keeps every object it saw
by uid; a failed listing (an API server being restarted on purpose) is counted and retried.

Reads are raw JSON through the official client's ``param_serialize``/``call_api`` (as
:mod:`core.kube.client_api` does, synchronously here): no typed models, the same bodies the
operator sees.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.db.database import make_engine
from core.db.integration_rows import IntegrationRows
from core.db.store import Store
from core.db.tables import Adapter, ExecutionLog, PatchHistory, Task
from core.engine.evidence import check, local_store
from core.engine.patch_ledger import verify
from core.engine.retention import pruned_keys
from core.engine.state_files import PATCH_LEDGER, STATE_DIR
from core.kube.api import resource_type
from core.models import LedgerEntry
from core.testing.invariants import Body, Snapshot, task_key

MANAGED = "app.kubernetes.io/managed-by=orchestrator"


class ClusterReader:
    """Synchronous raw-JSON lists and gets against one cluster (a kubeconfig)."""

    def __init__(self, kubeconfig: str, *, timeout: float = 30.0) -> None:
        from kubernetes import config

        self.api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    def close(self) -> None:
        self.api_client.close()

    def _get(self, path: str, query: list[tuple[str, Any]]) -> dict[str, Any]:
        params = self.api_client.param_serialize(
            method="GET",
            resource_path=path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*params, _request_timeout=self.timeout)
        response.read()
        if response.status >= 300:
            raise RuntimeError(f"GET {path}: {response.status} {response.data[:300]!r}")
        doc: dict[str, Any] = json.loads(response.data)
        return doc

    def list(self, plural: str, namespace: str, label_selector: str | None = None) -> list[Body]:
        """Every object of ``plural`` in ``namespace`` (paged, 500 at a time)."""
        rt = resource_type(plural)
        items: list[Body] = []
        token: str | None = None
        while True:
            query: list[tuple[str, Any]] = [("limit", 500)]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if token:
                query.append(("continue", token))
            page = self._get(rt.path(namespace), query)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items


class ClusterRecorder:
    """Every Job (the operator's) and Event seen in ``namespaces`` while it runs, by uid."""

    def __init__(
        self, reader: ClusterReader, namespaces: Sequence[str], *, interval: float = 3.0
    ) -> None:
        self.reader = reader
        self.namespaces = list(namespaces)
        self.interval = interval
        self.jobs: dict[str, Body] = {}
        self.events: dict[str, Body] = {}
        self.polls = 0
        self.failed_polls = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_namespace(self, namespace: str) -> None:
        with self._lock:
            if namespace not in self.namespaces:
                self.namespaces.append(namespace)

    def poll(self) -> None:
        """One round: list Jobs and Events of every namespace, remember what is new."""
        with self._lock:
            namespaces = list(self.namespaces)
        for ns in namespaces:
            jobs = self.reader.list("jobs", ns, MANAGED)
            events = self.reader.list("events", ns)
            with self._lock:
                for job in jobs:
                    self.jobs[str(job["metadata"]["uid"])] = _slim(job)
                for ev in events:
                    self.events[str(ev["metadata"]["uid"])] = ev
        self.polls += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cluster-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # an API server restarted on purpose: count it, poll again
                self.failed_polls += 1

    def jobs_seen(self) -> list[Body]:
        with self._lock:
            return list(self.jobs.values())

    def events_seen(self) -> list[Body]:
        with self._lock:
            return list(self.events.values())


def _slim(job: Body) -> Body:
    meta = job["metadata"]
    keep = ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp")
    return {"metadata": {k: meta[k] for k in keep if k in meta}, "status": job.get("status")}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def collect(
    reader: ClusterReader,
    namespaces: Iterable[str],
    *,
    database_url: str,
    workdir: Path,
    recorder: ClusterRecorder | None = None,
) -> Snapshot:
    """Everything the rules look at, now (and, with ``recorder``, during the run)."""
    namespaces = list(namespaces)
    tes = [te for ns in namespaces for te in reader.list("taskexecutions", ns)]
    jobs = [j for ns in namespaces for j in reader.list("jobs", ns)]
    pods = [p for ns in namespaces for p in reader.list("pods", ns)]
    configmaps = [c for ns in namespaces for c in reader.list("configmaps", ns)]
    if recorder is not None:
        recorder.poll()  # the last word: whatever happened since its last round
        jobs_seen, events_seen = recorder.jobs_seen(), recorder.events_seen()
    else:
        jobs_seen = [_slim(j) for j in jobs]
        events_seen = [e for ns in namespaces for e in reader.list("events", ns)]

    engine = make_engine(database_url)
    scopes = set(namespaces)
    with engine.connect() as conn:
        db_tasks = [
            dict(r) for r in conn.execute(select(Task.__table__)).mappings() if r["scope"] in scopes
        ]
        uids = {str(r["uid"]) for r in db_tasks}
        db_events = [
            dict(r)
            for r in conn.execute(select(ExecutionLog.__table__)).mappings()
            if r["task_uid"] in uids
        ]
        history = [
            dict(r)
            for r in conn.execute(select(PatchHistory.__table__)).mappings()
            if r["scope"] in scopes
        ]
        adapters = [
            dict(r)
            for r in conn.execute(select(Adapter.__table__)).mappings()
            if r["scope"] in scopes
        ]
    store = Store(engine)
    anchor = store.ledger_anchor() + IntegrationRows(engine).ledger_anchor()

    evidence = local_store(workdir)
    ledger_path = workdir / STATE_DIR / PATCH_LEDGER
    report = verify(ledger_path, evidence, anchor, pruned_keys(evidence))
    engine.dispose()
    ledger = [
        LedgerEntry.model_validate(r) for r in _read_jsonl(ledger_path) if r.get("scope") in scopes
    ]
    refs = {e.patch_ref for e in ledger if e.patch_ref}
    logs = {}
    for te in tes:
        name = task_key(te).log_name
        logs[name] = _read_jsonl(workdir / "logs" / "execution" / f"{name}.jsonl")
    return Snapshot(
        task_executions=tes,
        jobs_seen=jobs_seen,
        events_seen=[e for e in events_seen if e.get("metadata", {}).get("namespace") in scopes],
        jobs=jobs,
        pods=pods,
        configmaps=configmaps,
        db_tasks=db_tasks,
        db_events=db_events,
        patch_history=history,
        ledger=ledger,
        ledger_problems=list(report.problems),
        jsonl_events=[
            r for r in _read_jsonl(workdir / "logs" / "executor.jsonl") if r.get("task_uid") in uids
        ],
        task_logs=logs,
        evidence={ref: check(evidence, ref) for ref in sorted(refs)},
        db_adapters=adapters,
    )

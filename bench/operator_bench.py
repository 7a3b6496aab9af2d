#!/usr/bin/env python
"""Operator benchmarks on a real cluster (issue 7 items 2-6, issue 5's recorded measurement).

Runs ``kopf run operator/handlers.py`` out of cluster (like tests/e2e) against one fresh
namespace per benchmark, drives it through the API from this process and records, each
against a limit measured in the same run:

``latency``     apply -> adapter Job created (sequential, low load) and Job finished -> status
                COMPLETED, p50/p95/p99; API cost of those tasks.
``throughput``  bulk create N TaskExecutions: rate to adapter Job created and to COMPLETED vs
                the raw rate at which this client creates (suspended) Jobs on the same server.
``queued``      N TaskExecutions whose pods can never start (ResourceQuota pods=0): the
                operator-bound Job-create throughput and latency with N queued, then a few
                sequential ones on top of the backlog, RSS with N present.
``api-cost``    N tasks to COMPLETED; write/read calls per task from the API server's
                ``apiserver_request_total`` deltas and from the operator's own counters.
``memory``      operator RSS with 0 / 1,000 / 10,000 TaskExecutions present (PENDING on a
                missing Adapter) and over a soak.
``db``          the throughput run on SQLite or PostgreSQL: execution_log / patch_history rows/s.

Times are this process's monotonic clock: POST sent -> watch event received (creationTimestamp
has 1 s resolution). The operator runs with a probe file (generated into its work dir, loaded
by kopf next to handlers.py) that counts and times every API call (through the API layer's
public observer hook, ``KubeApi.add_observer``), every database call and every reconcile, and
dumps them to JSON once a second: the profile behind the numbers.

``.venv/bin/python bench/operator_bench.py latency --n 50`` -> bench/results/operator-latency.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GROUP, VERSION, TE = "orchestrator.dev", "v1alpha1", "taskexecutions"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})
READ_VERBS = frozenset({"GET", "LIST"})
TERMINAL = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"})
NOOP_GATE = [{"name": "noop", "command": ["{python}", "-c", "pass"]}]

# ---------------------------------------------------------------------------- pure helpers


def percentile(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; None when empty."""
    data = sorted(values)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Iterable[float], scale: float = 1000.0) -> dict[str, Any]:
    """n, mean, p50/p95/p99, max of seconds, reported in ms (scale)."""
    data = [v * scale for v in values]
    if not data:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(data), "mean": round(sum(data) / len(data), 2)}
    for q in (50, 95, 99):
        out[f"p{q}"] = round(percentile(data, q) or 0.0, 2)
    out["max"] = round(max(data), 2)
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Key = tuple[tuple[str, str], ...]


def parse_metrics(text: str, name: str = "apiserver_request_total") -> dict[Key, float]:
    """Samples of one Prometheus counter from exposition text: {sorted label items: value}."""
    out: dict[Key, float] = {}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = _SAMPLE.match(line.strip())
        if m is None or m.group(1) != name:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        try:
            out[labels] = out.get(labels, 0.0) + float(m.group(4))
        except ValueError:
            continue
    return out


def metric_delta(before: dict[Key, float], after: dict[Key, float]) -> dict[Key, float]:
    """after - before per series (a series new in `after` counts from 0); zeros dropped."""
    out = {}
    for key, value in after.items():
        d = value - before.get(key, 0.0)
        if d > 0:
            out[key] = d
    return out


def request_table(delta: dict[Key, float]) -> dict[str, int]:
    """Collapse deltas to 'VERB group/resource[/subresource] code' -> count."""
    table: Counter[str] = Counter()
    for key, value in delta.items():
        lab = dict(key)
        res = lab.get("resource", "")
        if lab.get("group"):
            res = f"{lab['group']}/{res}"
        if lab.get("subresource"):
            res = f"{res}/{lab['subresource']}"
        table[f"{lab.get('verb', '?')} {res} {lab.get('code', '?')}"] += round(value)
    return dict(sorted(table.items(), key=lambda kv: (-kv[1], kv[0])))


def count_requests(
    table: dict[str, int],
    verbs: frozenset[str],
    resources: Iterable[str] | None = None,
) -> int:
    """Sum a request_table over verbs (and resource names such as 'batch/jobs')."""
    wanted = set(resources) if resources is not None else None
    total = 0
    for key, value in table.items():
        verb, res, _code = key.split(" ")
        if verb in verbs and (wanted is None or res in wanted):
            total += value
    return total


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in KiB (empty when it is gone)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (its threads included), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_named(*names: str) -> dict[str, int]:
    """First pid per command name (comm), e.g. kube-apiserver, etcd: read-only /proc scan."""
    out: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                comm = (entry / "comm").read_text().strip()
                if comm in names and comm not in out:
                    out[comm] = int(entry.name)
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_quiet(limit: float = 0.25, window: float = 3.0, timeout: float = 180.0) -> dict[str, Any]:
    """Until the machine's CPUs are less than ``limit`` busy over one ``window``: a round
    measured while the last one's deletions (or another run's) still load the API server
    would be measured against that load, not against the limit."""
    started = time.monotonic()
    while True:
        busy0, total0 = _cpu_ticks()
        time.sleep(window)
        busy1, total1 = _cpu_ticks()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        waited = time.monotonic() - started
        if busy < limit or waited > timeout:
            return {"waited_s": round(waited, 1), "busy": round(busy, 3), "quiet": busy < limit}


def rate(n: int, seconds: float | None) -> float | None:
    return round(n / seconds, 2) if seconds and seconds > 0 else None


# ---------------------------------------------------------------------------- the operator's probe

PROBE = r'''
"""Generated by bench/operator_bench.py: counts and times API calls, DB calls, sync steps.

Everything through public hooks: the API layer's observer (KubeApi.add_observer: one record
per HTTP call) and the controller's (Controller.add_observer: every sync step and DB call)."""
import asyncio, json, os, time
import kopf

STATS = {"api": {}, "api_errors": {}, "writes": 0, "db": {},
         "reconcile": {"n": 0, "s": 0.0, "max": 0.0}}


def _add(table, key, dt):
    e = table.setdefault(key, {"n": 0, "s": 0.0, "max": 0.0})
    e["n"] += 1; e["s"] += dt; e["max"] = max(e["max"], dt)


def _on_api_call(call):
    _add(STATS["api"], f"{call.verb}:{call.resource}", call.duration_seconds)
    if call.write:
        STATS["writes"] += 1
    if call.status is None or call.status >= 400:
        key = f"{call.verb}:{call.resource}:{call.status}"
        STATS["api_errors"][key] = STATS["api_errors"].get(key, 0) + 1


def _on_step(kind, name, dt):
    if kind == "db":
        _add(STATS["db"], name, dt)
    else:
        r = STATS["reconcile"]; r["n"] += 1; r["s"] += dt; r["max"] = max(r["max"], dt)


def _top(stats, n=30):
    return [{"where": str(st.traceback[0]) if st.traceback else "?",
             "kib": round(st.size / 1024, 1), "blocks": st.count} for st in stats[:n]]


def _diff(stats, n=30):
    return [{"where": str(st.traceback[0]) if st.traceback else "?",
             "kib": round(st.size / 1024, 1), "kib_diff": round(st.size_diff / 1024, 1),
             "blocks_diff": st.count_diff} for st in stats[:n]]


def _snapshots(state):
    """Answer snapshot requests: <dir>/<label>.req -> <dir>/<label>.json (tracemalloc)."""
    import gc, tracemalloc
    folder = os.environ.get("OPBENCH_TRACEMALLOC")
    if not folder:
        return
    for req in sorted(p for p in os.listdir(folder) if p.endswith(".req")):
        label = req[:-4]
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        out = {"label": label, "traced_kib": round(tracemalloc.get_traced_memory()[0] / 1024, 1),
               "by_file": _top(snap.statistics("filename")),
               "by_line": _top(snap.statistics("lineno"))}
        base = state.get("base")
        if base is None:
            state["base"] = snap
        else:
            out["diff_by_file"] = _diff(snap.compare_to(base, "filename"))
            out["diff_by_line"] = _diff(snap.compare_to(base, "lineno"))
        with open(os.path.join(folder, label + ".json.tmp"), "w") as fh:
            json.dump(out, fh)
        os.replace(os.path.join(folder, label + ".json.tmp"), os.path.join(folder, label + ".json"))
        os.remove(os.path.join(folder, req))


async def _dump(memo):
    path = os.environ["OPBENCH_STATS"]
    loop = asyncio.get_running_loop()
    lag_max = 0.0
    snapshots = {}
    while True:
        t = loop.time()
        await asyncio.sleep(0.5)
        lag_max = max(lag_max, loop.time() - t - 0.5)
        _snapshots(snapshots)
        loop_ = getattr(memo, "loop", None)
        out = dict(STATS, queue=len(loop_.queue) if loop_ else None,
                   loop_lag_max_s=round(lag_max, 4), tasks=len(asyncio.all_tasks()), t=time.time())
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh)
        os.replace(tmp, path)


if os.environ.get("OPBENCH_TRACEMALLOC"):
    import tracemalloc

    tracemalloc.start(1)


@kopf.on.startup()
async def opbench_probe(memo, **_):
    if getattr(memo, "controller", None) is None:
        raise kopf.TemporaryError("the controller is not built yet", delay=0.2)
    memo.controller.api.add_observer(_on_api_call)
    memo.controller.add_observer(_on_step)
    memo.opbench_dump = asyncio.create_task(_dump(memo))
    if os.environ.get("OPBENCH_PYINSTRUMENT"):
        from pyinstrument import Profiler

        memo.opbench_prof = Profiler(interval=0.001, async_mode="disabled")
        memo.opbench_prof.start()


@kopf.on.cleanup()
async def opbench_cleanup(memo, **_):
    prof = getattr(memo, "opbench_prof", None)
    if prof is not None:
        prof.stop()
        with open(os.environ["OPBENCH_PYINSTRUMENT"], "w") as fh:
            fh.write(prof.output_text(unicode=False, color=False))
'''


# ---------------------------------------------------------------------------- cluster access


class Cluster:
    def __init__(self) -> None:
        from kubernetes import client, config

        self.kubeconfig = (
            os.environ.get("KUBECONFIG")
            or subprocess.run(
                [str(ROOT / "hack/cluster/kubeconfig")], capture_output=True, text=True, check=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        env = _env_file(Path("/var/lib/orchestrator-cluster/images.env"))
        self.image = os.environ.get("ORCHESTRATOR_IMAGE") or env.get("PROJECT_IMAGE", "")
        self.pull_policy = os.environ.get("ORCHESTRATOR_IMAGE_PULL_POLICY", "Never")
        self.api_client = config.new_client_from_config(config_file=self.kubeconfig)
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.kubectl_bin = shutil.which("kubectl") or "kubectl"

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc

    def metrics(self) -> dict[Key, float]:
        return parse_metrics(self.kubectl("get", "--raw", "/metrics", timeout=60).stdout)

    def versions(self) -> dict[str, str]:
        import kopf
        import kubernetes
        from kubernetes import client

        server = client.VersionApi(self.api_client).get_code()
        return {
            "kubernetes_server": server.git_version,
            "kubernetes_client": kubernetes.__version__,
            "kopf": kopf.__version__,
            "python": sys.version.split()[0],
        }


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep:
                out[k.strip()] = v.strip()
    return out


def wait_until(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Watcher(threading.Thread):
    """Watches Jobs and TaskExecutions in one namespace; stamps each event on arrival."""

    def __init__(self, cluster: Cluster, namespace: str, kind: str) -> None:
        super().__init__(daemon=True, name=f"watch-{kind}")
        self.cluster, self.namespace, self.kind = cluster, namespace, kind
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}  # job name -> te, role, added, finished
        self.tes: dict[str, dict[str, Any]] = {}  # te name -> states {state: t}, events
        self.ready = threading.Event()

    def _list_call(self, rv: str | None, timeout: int) -> Any:
        kw: dict[str, Any] = dict(
            watch=True,
            _preload_content=False,
            timeout_seconds=timeout,
            allow_watch_bookmarks=True,
            _request_timeout=timeout + 30,
        )
        if rv:
            kw["resource_version"] = rv
        if self.kind == "jobs":
            return self.cluster.batch.list_namespaced_job(
                self.namespace, label_selector="app.kubernetes.io/managed-by=orchestrator", **kw
            )
        return self.cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, TE, **kw
        )

    def run(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        rv: str | None = None
        while not self.stop.is_set():
            try:
                resp = self._list_call(rv, 60)
                self.ready.set()
                for line in iter_resp_lines(resp):
                    now = time.monotonic()
                    if self.stop.is_set():
                        break
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        rv = None
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                    if ev.get("type") in ("ADDED", "MODIFIED"):
                        self._record(obj, now, ev["type"])
                resp.release_conn()
            except Exception as exc:
                print(f"watch {self.kind}: {exc!r}", file=sys.stderr)
                time.sleep(0.5)

    def _record(self, obj: dict[str, Any], now: float, type_: str) -> None:
        meta = obj["metadata"]
        with self.lock:
            if self.kind == "jobs":
                lab = meta.get("labels") or {}
                rec = self.jobs.setdefault(
                    meta["name"],
                    {
                        "te": lab.get("orchestrator.dev/taskexecution"),
                        "role": lab.get("orchestrator.dev/role"),
                        "added": now,
                    },
                )
                if "finished" not in rec and _job_finished(obj):
                    rec["finished"] = now
            else:
                rec = self.tes.setdefault(meta["name"], {"states": {}, "events": 0})
                rec["events"] += 1
                status = obj.get("status") or {}
                state = status.get("state")
                if state:
                    rec["states"].setdefault(state, now)
                reason = status.get("reason")
                if reason:
                    rec.setdefault("reasons", {}).setdefault(reason, now)

    def by_te(self, role: str) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {j["te"]: j for j in self.jobs.values() if j["role"] == role}


def _job_finished(job: dict[str, Any]) -> bool:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return True
    return False


# ---------------------------------------------------------------------------- one benchmark session


class Session:
    """A namespace, optional git server and Adapter, watches, and the operator process."""

    def __init__(
        self,
        cluster: Cluster,
        tag: str,
        *,
        git: bool = True,
        quota_pods: int | None = None,
        db_url: str | None = None,
        resync: float = 30.0,
        adapter: bool = True,
        profile: bool = False,
        tracemalloc: bool = False,
        env: dict[str, str] | None = None,
        adapter_cpu: str = "500m",
    ) -> None:
        self.adapter_cpu = adapter_cpu
        self.profile = profile
        self.tracemalloc = tracemalloc
        self.extra_env = env or {}
        self.cluster = cluster
        self.ns = f"opbench-{tag}-{uuid.uuid4().hex[:6]}"
        self.run_id = f"opbench-{tag}"
        self.git, self.quota_pods, self.db_url = git, quota_pods, db_url
        self.resync, self.with_adapter = resync, adapter
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.ns}-"))
        self.stats_path = self.workdir / "probe-stats.json"
        self.repo = "git://127.0.0.1:1/none.git"
        self.created: dict[str, dict[str, float]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.jobs = Watcher(cluster, self.ns, "jobs")
        self.tes = Watcher(cluster, self.ns, "tes")
        self.patch = ""

    # -- lifecycle
    def __enter__(self) -> Session:
        from tests.e2e.operator_harness import adapter, apply, demo_patch, git_server

        c = self.cluster
        c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        c.kubectl("create", "namespace", self.ns)
        wait_until(
            lambda: c.kubectl("get", "sa", "default", "-n", self.ns, check=False).returncode == 0,
            60,
            "default ServiceAccount",
            0.5,
        )
        if self.git:
            self.repo = git_server(c.kubectl, self.ns, c.image, c.pull_policy)
        if self.quota_pods is not None:
            quota = {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "no-pods"},
                "spec": {"hard": {"pods": str(self.quota_pods)}},
            }
            apply(c.kubectl, self.ns, quota)
        if self.with_adapter:
            apply(
                c.kubectl,
                self.ns,
                adapter(
                    "patch",
                    "patch",
                    retry={"maxAttempts": 1},
                    gate=NOOP_GATE,
                    resources={"cpu": self.adapter_cpu, "memory": "256Mi"},
                ),
            )
        self.patch = demo_patch("add-multiply")
        self.jobs.start()
        self.tes.start()
        try:
            self.start_operator()
        except BaseException:  # no operator and no namespace left behind by a failed start
            self.__exit__()
            raise
        return self

    def start_operator(self) -> None:
        from tests.e2e.operator_harness import free_port

        probe = self.workdir / "opbench_probe.py"
        probe.write_text(PROBE)
        env = {
            **os.environ,
            "KUBECONFIG": self.cluster.kubeconfig,
            "ORCHESTRATOR_WORKDIR": str(self.workdir),
            "ORCHESTRATOR_RUNNER_IMAGE": self.cluster.image,
            "ORCHESTRATOR_IMAGE_PULL_POLICY": self.cluster.pull_policy,
            "ORCHESTRATOR_NAMESPACE": self.ns,
            "ORCHESTRATOR_RESYNC_SECONDS": str(self.resync),
            "OPBENCH_STATS": str(self.stats_path),
        }
        # runner pods reach the evidence server on the node address (as the e2e harness does:
        # 127.0.0.1 is the pod's own), on a port of this operator's own: two benchmark
        # operators on one machine must not meet on 8081
        evidence = f"{os.environ.get('ORCHESTRATOR_E2E_EVIDENCE_HOST', '10.213.0.1')}:{free_port()}"
        env["ORCHESTRATOR_EVIDENCE_LISTEN"] = evidence
        env["ORCHESTRATOR_EVIDENCE_URL"] = f"http://{evidence}"
        if self.db_url:
            env["ORCHESTRATOR_DATABASE_URL"] = self.db_url
        if self.profile:
            env["OPBENCH_PYINSTRUMENT"] = str(self.workdir / "pyinstrument.txt")
        if self.tracemalloc:
            (self.workdir / "tracemalloc").mkdir(exist_ok=True)
            env["OPBENCH_TRACEMALLOC"] = str(self.workdir / "tracemalloc")
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", self.ns]
        cmd += [str(ROOT / "operator/handlers.py"), str(probe)]
        log_path = self.workdir / "operator.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

        def ready() -> bool:
            with open(log_path, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
            return "controller ready" in text or self.proc.poll() is not None

        wait_until(
            ready,
            120,
            "operator start",
            0.2,
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited:\n{self.log_tail()}")
        wait_until(lambda: self.jobs.ready.is_set() and self.tes.ready.is_set(), 30, "watches")
        wait_until(self.stats, 30, "probe stats")
        time.sleep(2.0)  # kopf's watch streams open after the startup handlers

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.jobs.stop.set()
        self.tes.stop.set()
        self.cluster.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)

    def stop_operator(self) -> str:
        """Stop the operator gracefully; the pyinstrument text when profiling."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            self.proc = None
        path = self.workdir / "pyinstrument.txt"
        return path.read_text() if path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "operator.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def rss(self) -> dict[str, int]:
        return rss_kib(self.proc.pid) if self.proc else {}

    def heap(self, label: str, timeout: float = 300) -> dict[str, Any] | None:
        """A tracemalloc snapshot of the operator (the first one is the baseline of the
        diffs of the later ones); None unless the session traces."""
        if not self.tracemalloc:
            return None
        folder = self.workdir / "tracemalloc"
        (folder / f"{label}.req").touch()
        out = folder / f"{label}.json"
        wait_until(out.exists, timeout, f"tracemalloc snapshot {label}", 0.5)
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    # -- driving
    def te_body(self, name: str, adapter: str = "patch") -> dict[str, Any]:
        from tests.e2e.operator_harness import task_execution

        body = task_execution(
            name, self.repo, adapter, task={"prompt": "bench", "patch": self.patch}
        )
        body["spec"]["runId"] = self.run_id
        return body

    def create_te(self, name: str, adapter: str = "patch") -> None:
        body = self.te_body(name, adapter)
        t0 = time.monotonic()
        resp = self.cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, TE, body, _preload_content=False
        )
        t1 = time.monotonic()
        resp.data  # noqa: B018 - drain the body: the pooled connection is reused
        resp.release_conn()
        self.created[name] = {"post": t0, "posted": t1}

    def bulk_create(self, names: list[str], threads: int = 4, adapter: str = "patch") -> float:
        t0 = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda n: self.create_te(n, adapter), names))
        return time.monotonic() - t0

    def job_latencies(self, names: Iterable[str]) -> tuple[list[float], list[float]]:
        jobs = self.jobs.by_te("adapter")
        from_post, from_posted = [], []
        for n in names:
            if n in jobs and n in self.created:
                from_post.append(jobs[n]["added"] - self.created[n]["post"])
                from_posted.append(jobs[n]["added"] - self.created[n]["posted"])
        return from_post, from_posted

    def terminal_or_state(self, name: str) -> set[str]:
        with self.tes.lock:
            return set(self.tes.tes.get(name, {}).get("states", {}))

    def terminal(self, names: Iterable[str]) -> dict[str, str]:
        out = {}
        with self.tes.lock:
            for n in names:
                states = self.tes.tes.get(n, {}).get("states", {})
                done = [s for s in states if s in TERMINAL]
                if done:
                    out[n] = done[0]
        return out

    def finish_latencies(self, names: Iterable[str]) -> dict[str, Any]:
        """adapter Job finished -> gate Job created; gate Job finished -> TE terminal."""
        adapters, gates = self.jobs.by_te("adapter"), self.jobs.by_te("gate")
        to_gate, to_done = [], []
        with self.tes.lock:
            tes = {n: dict(self.tes.tes.get(n, {}).get("states", {})) for n in names}
        for n, states in tes.items():
            a, g = adapters.get(n, {}), gates.get(n, {})
            if "finished" in a and "added" in g:
                to_gate.append(g["added"] - a["finished"])
            if "finished" in g and "COMPLETED" in states:
                to_done.append(states["COMPLETED"] - g["finished"])
        return {
            "adapter_job_finished_to_gate_job_created_ms": summary(to_gate),
            "gate_job_finished_to_completed_ms": summary(to_done),
        }

    def delete_all_tes(self) -> None:
        self.cluster.kubectl("delete", TE, "--all", "-n", self.ns, "--wait=false", check=False)

    def db_rows(self) -> dict[str, Any]:
        """execution_log / patch_history rows of this run and the span they were written in."""
        from sqlalchemy import func, select

        from core.db.database import default_url, make_engine
        from core.db.tables import ExecutionLog, PatchHistory

        engine = make_engine(self.db_url or default_url(self.workdir))
        out: dict[str, Any] = {}
        try:
            with engine.connect() as conn:
                for label, table, col in (
                    ("execution_log", ExecutionLog, ExecutionLog.created_at),
                    ("patch_history", PatchHistory, PatchHistory.recorded_at),
                ):
                    n, lo, hi = conn.execute(
                        select(func.count(), func.min(col), func.max(col)).where(
                            table.run_id == self.run_id
                        )
                    ).one()
                    span = (hi - lo).total_seconds() if lo and hi else None
                    out[label] = {"rows": n, "span_s": span, "rows_per_s": rate(n, span)}
        finally:
            engine.dispose()
        return out


# ---------------------------------------------------------------------------- measurements


def api_window(session: Session) -> dict[str, Any]:
    procs = {"operator": session.proc.pid if session.proc else -1}
    procs |= pids_named("kube-apiserver", "etcd")
    return {
        "cpu": {k: cpu_seconds(v) for k, v in procs.items()},
        "metrics": session.cluster.metrics(),
        "probe": session.stats(),
        "t": time.monotonic(),
        "load": loadavg(),
    }


OPERATOR_WRITE_RESOURCES = (
    "batch/jobs",
    "configmaps",
    "events",
    "orchestrator.dev/taskexecutions/status",
    "orchestrator.dev/taskexecutions",
    "orchestrator.dev/adapters/status",
)


def api_cost(
    before: dict[str, Any], after: dict[str, Any], tasks: int, bench_te_posts: int
) -> dict[str, Any]:
    table = request_table(metric_delta(before["metrics"], after["metrics"]))
    all_writes = count_requests(table, WRITE_VERBS)
    op_writes = count_requests(table, WRITE_VERBS, OPERATOR_WRITE_RESOURCES) - bench_te_posts
    te_status = count_requests(table, WRITE_VERBS, ["orchestrator.dev/taskexecutions/status"])
    job_posts = count_requests(table, frozenset({"POST"}), ["batch/jobs"])
    pb, pa = before["probe"], after["probe"]
    probe_calls = {
        k: v["n"] - pb.get("api", {}).get(k, {}).get("n", 0) for k, v in pa.get("api", {}).items()
    }
    probe_writes = (pa.get("writes") or 0) - (pb.get("writes") or 0)
    seconds = after["t"] - before["t"]
    cpu = {
        k: round(after["cpu"][k] - v, 2)
        for k, v in before.get("cpu", {}).items()
        if v is not None and after.get("cpu", {}).get(k) is not None
    }
    return {
        "cpu_seconds": cpu,
        "cpu_ms_per_task": {k: round(1000 * v / tasks, 1) for k, v in cpu.items()} if tasks else {},
        "tasks": tasks,
        "window_s": round(seconds, 1),
        "bench_te_posts_subtracted": bench_te_posts,
        "apiserver": {
            "all_writes_cluster_wide": all_writes,
            "writes_on_operator_resources": op_writes,
            "writes_on_operator_resources_per_task": round(op_writes / tasks, 2) if tasks else None,
            "te_status_patches_per_task": round(te_status / tasks, 2) if tasks else None,
            "job_posts_per_task": round(job_posts / tasks, 2) if tasks else None,
            "reads_cluster_wide": count_requests(table, READ_VERBS),
            "watches_started": count_requests(table, frozenset({"WATCH"})),
            "by_request": table,
            "note": "cluster-wide counters: Events and ConfigMaps include kube components and "
            "any concurrent test session (no per-client label without an audit log)",
        },
        "operator_counters": {
            "writes": probe_writes,
            "writes_per_task": round(probe_writes / tasks, 2) if tasks else None,
            "calls": probe_calls,
            "calls_per_task": {k: round(v / tasks, 2) for k, v in probe_calls.items()}
            if tasks
            else {},
        },
        "load_before_after": [before["load"], after["load"]],
    }


def probe_profile(stats: dict[str, Any]) -> dict[str, Any]:
    """Where the operator's time went: per API / DB call, count, mean and max ms."""

    def table(entries: dict[str, Any]) -> dict[str, Any]:
        rows = sorted(entries.items(), key=lambda kv: -kv[1]["s"])
        return {
            k: {
                "n": v["n"],
                "total_s": round(v["s"], 3),
                "mean_ms": round(1000 * v["s"] / v["n"], 2) if v["n"] else None,
                "max_ms": round(1000 * v["max"], 1),
            }
            for k, v in rows
        }

    rec = stats.get("reconcile", {})
    return {
        "api": table(stats.get("api", {})),
        "api_errors": stats.get("api_errors", {}),
        "db": table(stats.get("db", {})),
        "reconcile": {
            "n": rec.get("n"),
            "total_s": round(rec.get("s", 0.0), 3),
            "mean_ms": round(1000 * rec["s"] / rec["n"], 2) if rec.get("n") else None,
            "max_ms": round(1000 * rec.get("max", 0.0), 1),
        },
        "event_loop_lag_max_s": stats.get("loop_lag_max_s"),
        "asyncio_tasks": stats.get("tasks"),
        "queue_depth": stats.get("queue"),
    }


def raw_job_rate(
    session: Session, n: int, threads: int, *, suspend: bool = True, tag: str = ""
) -> dict[str, Any]:
    """The limit: this client POSTs n copies of an operator Job manifest (suspended unless
    told: then the Job controller reacts to them as it does to the operator's)."""
    c = session.cluster
    template = _job_template(session)
    label = f"raw{threads}{tag}"

    def body(i: int) -> dict[str, Any]:
        b = json.loads(json.dumps(template))
        b["metadata"] = {"name": f"raw-{threads}{tag}-{i}", "labels": {"opbench": label}}
        b["spec"]["suspend"] = suspend
        return b

    bodies = [body(i) for i in range(n)]
    done: list[float] = []

    def post(b: dict[str, Any]) -> None:
        resp = c.batch.create_namespaced_job(session.ns, b, _preload_content=False)
        resp.data  # noqa: B018 - drain the body: the pooled connection is reused
        resp.release_conn()
        done.append(time.monotonic())

    procs = pids_named("kube-apiserver", "etcd", "kube-controller")
    cpu0 = {k: cpu_seconds(v) for k, v in procs.items()}
    self0 = _self_cpu()
    load0 = loadavg()
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, bodies))
    dt = time.monotonic() - t0
    cpu = {k: _delta(cpu_seconds(v), cpu0[k]) for k, v in procs.items()}
    cpu["bench_client"] = round(_self_cpu() - self0, 2)
    c.kubectl("delete", "jobs", "-n", session.ns, "-l", f"opbench={label}", "--wait=false")
    return {
        "jobs": n,
        "threads": threads,
        "suspended": suspend,
        "seconds": round(dt, 3),
        "jobs_per_s": rate(n, dt),
        "cpu_seconds": cpu,
        "load_before_after": [load0, loadavg()],
        "jobs_created_s": [round(t - t0, 4) for t in sorted(done)],
    }


def raw_te_rate(session: Session, n: int, threads: int) -> dict[str, Any]:
    """What the TaskExecutions alone cost: this client POSTs the burst's n TaskExecution
    bodies with the same threads into a namespace of their own that no operator serves and
    nothing watches. The operator cannot create Jobs faster than TaskExecutions arrive, so
    this rate, measured with nothing else to do, bounds the burst's Job rate from above."""
    c = session.cluster
    ns = f"{session.ns}-te"
    c.kubectl("create", "namespace", ns)
    bodies = [session.te_body(f"te-{i:05d}") for i in range(n)]

    def post(b: dict[str, Any]) -> None:
        resp = c.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, TE, b, _preload_content=False
        )
        resp.data  # noqa: B018 - drain the body: the pooled connection is reused
        resp.release_conn()

    procs = pids_named("kube-apiserver", "etcd", "kube-controller")
    cpu0 = {k: cpu_seconds(v) for k, v in procs.items()}
    self0 = _self_cpu()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(post, bodies))
        dt = time.monotonic() - t0
        cpu = {k: _delta(cpu_seconds(v), cpu0[k]) for k, v in procs.items()}
        cpu["bench_client"] = round(_self_cpu() - self0, 2)
    finally:
        c.kubectl("delete", "namespace", ns, "--wait=false")
    return {
        "task_executions": n,
        "threads": threads,
        "seconds": round(dt, 3),
        "per_s": rate(n, dt),
        "cpu_seconds": cpu,
    }


def _self_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _delta(after: float | None, before: float | None) -> float | None:
    return round(after - before, 2) if after is not None and before is not None else None


def _job_template(session: Session) -> dict[str, Any]:
    """An operator-made adapter Job without identity and status (same body size)."""
    c = session.cluster
    jobs = c.batch.list_namespaced_job(
        session.ns,
        label_selector="orchestrator.dev/role=adapter",
        limit=1,
        _preload_content=False,
    )
    items = json.loads(jobs.data)["items"]
    if not items:
        raise RuntimeError("no operator Job to copy yet")
    job = items[0]
    job.pop("status", None)
    spec = job["spec"]
    for key in ("selector",):
        spec.pop(key, None)
    tmpl_labels = spec["template"]["metadata"].get("labels", {})
    for key in list(tmpl_labels):
        if key.startswith(("controller-uid", "batch.kubernetes.io", "job-name")):
            tmpl_labels.pop(key)
    return job


# ---------------------------------------------------------------------------- benchmarks


def bench_latency(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    with Session(cluster, "lat", resync=args.resync) as s:
        load0 = loadavg()
        before = api_window(s)
        names = [f"lat-{i:04d}" for i in range(args.n)]
        for name in names:
            s.create_te(name)
            wait_until(lambda n=name: n in s.jobs.by_te("adapter"), 60, f"Job of {name}", 0.002)
            time.sleep(args.gap)
        load1 = loadavg()
        from_post, from_posted = s.job_latencies(names)
        posts = [s.created[n]["posted"] - s.created[n]["post"] for n in names]
        done = _wait_terminal(s, names, args.complete_timeout)
        time.sleep(3.0)
        after = api_window(s)
        return {
            "benchmark": "latency",
            "tasks": args.n,
            "gap_between_tasks_s": args.gap,
            "apply_to_adapter_job_ms": summary(from_post),
            "posted_to_adapter_job_ms": summary(from_posted),
            "te_post_roundtrip_ms": summary(posts),
            "limit_note": "te_post_roundtrip_ms is the API server's own create latency for one "
            "object seen from this client: the floor of an apply -> Job path that needs "
            ">= 1 more create",
            "load_during_creates": [load0, load1],
            **s.finish_latencies(names),
            "outcomes": dict(Counter(done.values())),
            "completed_in_s": round(after["t"] - before["t"], 1),
            "api_cost": api_cost(before, after, len(done), args.n),
            "operator_rss_kib": s.rss(),
            "profile": probe_profile(after["probe"]),
        }


def _wait_terminal(s: Session, names: list[str], timeout: float) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = s.terminal(names)
        if len(done) == len(names):
            return done
        time.sleep(0.5)
    return s.terminal(names)


def bench_throughput(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    db_url = _db_url(args)
    try:
        return _throughput(cluster, args, db_url)
    finally:
        _drop_db(args)


def _throughput(cluster: Cluster, args: argparse.Namespace, db_url: str | None) -> dict[str, Any]:
    with Session(cluster, f"tp-{args.db}", resync=args.resync, db_url=db_url) as s:
        # one warm-up task so a Job manifest exists to copy for the raw rate
        s.create_te("warmup")
        wait_until(lambda: "warmup" in s.jobs.by_te("adapter"), 60, "warm-up Job", 0.01)
        raw = [raw_job_rate(s, args.raw, 1), raw_job_rate(s, args.raw, args.threads)]
        time.sleep(2.0)
        before = api_window(s)
        names = [f"tp-{i:05d}" for i in range(args.n)]
        t0 = time.monotonic()
        post_s = s.bulk_create(names, args.threads)
        wait_until(
            lambda: all(n in s.jobs.by_te("adapter") for n in names),
            args.job_timeout,
            "all adapter Jobs",
            0.1,
        )
        jobs = s.jobs.by_te("adapter")
        job_span = max(jobs[n]["added"] for n in names) - t0
        load_jobs = loadavg()
        rss_jobs = s.rss()
        done = _wait_terminal(s, names, args.complete_timeout)
        with s.tes.lock:
            ends = [s.tes.tes[n]["states"][st] for n, st in done.items()]
        done_span = (max(ends) - t0) if ends else None
        time.sleep(3.0)
        after = api_window(s)
        from_post, _ = s.job_latencies(names)
        job_rate = rate(args.n, job_span)
        result = {
            "benchmark": "throughput",
            "db": args.db,
            "tasks": args.n,
            "client_threads": args.threads,
            "te_bulk_post_s": round(post_s, 3),
            "te_post_rate_per_s": rate(args.n, post_s),
            "to_adapter_job_created": {"seconds": round(job_span, 3), "per_s": job_rate},
            "to_terminal": {
                "tasks": len(done),
                "outcomes": dict(Counter(done.values())),
                "seconds": round(done_span, 1) if done_span else None,
                "per_s": rate(len(done), done_span),
            },
            "raw_job_create_limit": raw,
            "ratio_job_created_vs_raw": {
                f"threads={r['threads']}": round(job_rate / r["jobs_per_s"], 3)
                for r in raw
                if job_rate and r["jobs_per_s"]
            },
            "apply_to_adapter_job_ms_under_bulk": summary(from_post),
            **s.finish_latencies(names),
            "load_at_jobs_created": load_jobs,
            "operator_rss_kib_at_jobs_created": rss_jobs,
            "operator_rss_kib_end": s.rss(),
            "api_cost": api_cost(before, after, len(done), args.n),
            "db_rows": s.db_rows(),
            "profile": probe_profile(after["probe"]),
        }
    return result


def bench_queued(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """N TaskExecutions whose pods can never start: the operator-bound part alone."""
    with Session(
        cluster, "q", git=False, quota_pods=0, resync=args.resync, profile=args.profile
    ) as s:
        s.create_te("warmup")
        wait_until(lambda: "warmup" in s.jobs.by_te("adapter"), 60, "warm-up Job", 0.01)
        raw = [raw_job_rate(s, args.raw, 1), raw_job_rate(s, args.raw, args.threads)]
        time.sleep(2.0)
        rss0 = s.rss()
        before = api_window(s)
        names = [f"q-{i:05d}" for i in range(args.n)]
        t0 = time.monotonic()
        post_s = s.bulk_create(names, args.threads)
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: all(n in s.jobs.by_te("adapter") for n in names),
                args.job_timeout,
                "all adapter Jobs",
                0.2,
            )
        jobs = s.jobs.by_te("adapter")
        made = [n for n in names if n in jobs]
        job_span = max(jobs[n]["added"] for n in made) - t0 if made else None
        from_post, _ = s.job_latencies(names)
        time.sleep(3.0)
        after = api_window(s)
        load_bulk = loadavg()
        # then a few sequential ones on top of the backlog
        extra = [f"qx-{i:03d}" for i in range(args.extra)]
        for name in extra:
            s.create_te(name)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda n=name: n in s.jobs.by_te("adapter"), 60, name, 0.002)
            time.sleep(args.gap)
        on_top, _ = s.job_latencies(extra)
        job_rate = rate(len(made), job_span)
        stats, rss1 = s.stats(), s.rss()
        profile_text = s.stop_operator() if args.profile else ""
        return {
            "benchmark": "queued",
            "pyinstrument_enabled": args.profile,
            "pyinstrument_top": profile_text.splitlines()[:120],
            "tasks": args.n,
            "jobs_created": len(made),
            "pods": "ResourceQuota pods=0: Jobs exist, no pod ever starts (queued for the node)",
            "te_post_rate_per_s": rate(args.n, post_s),
            "to_adapter_job_created": {
                "seconds": round(job_span, 3) if job_span else None,
                "per_s": job_rate,
            },
            "raw_job_create_limit": raw,
            "ratio_job_created_vs_raw": {
                f"threads={r['threads']}": round(job_rate / r["jobs_per_s"], 3)
                for r in raw
                if job_rate and r["jobs_per_s"]
            },
            "apply_to_adapter_job_ms_bulk": summary(from_post),
            "apply_to_adapter_job_ms_sequential_with_backlog": summary(on_top),
            "backlog_for_sequential": len(made),
            "operator_rss_kib": {"before": rss0, "after": rss1},
            "load": {"bulk_end": load_bulk, "end": loadavg()},
            "api_cost_bulk": api_cost(before, after, len(made), args.n),
            "profile": probe_profile(stats),
        }


def _cpu_now(session: Session) -> dict[str, float | None]:
    procs = {"operator": session.proc.pid if session.proc else -1}
    procs |= pids_named("kube-apiserver", "etcd", "kube-controller")
    out = {k: cpu_seconds(v) for k, v in procs.items()}
    out["bench_client"] = _self_cpu()
    return out


def _cpu_delta(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    return {k: _delta(b.get(k), v) for k, v in a.items()}


def _events_named(cluster: Cluster, ns: str, reason: str) -> int:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"reason={reason}", "-o", "name"
    )
    return len(out.stdout.split())


def _db_events(session: Session, event: str) -> int:
    from sqlalchemy import func, select

    from core.db.database import default_url, make_engine
    from core.db.tables import ExecutionLog

    engine = make_engine(session.db_url or default_url(session.workdir))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        ExecutionLog.run_id == session.run_id, ExecutionLog.event == event
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def bench_burst(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """N TaskExecutions applied at once (issue 17): Jobs created against the raw limit.

    Pods never start (ResourceQuota pods=0), so this is the operator-bound part alone. The
    limit: this client creates the same number of copies of an operator Job with the same
    threads, once before and once after the burst (the mean is the limit); each round and the
    burst start once the machine is quiet (``wait_quiet``: the previous round's deletions
    done), and the waits are in the result. Then everything
    the contract promises for a start is counted once it has followed: IN_PROGRESS status
    (the watch), TASK_STARTED Events (the namespace) and execution_log rows (the database).
    """
    with Session(
        cluster, "burst", git=False, quota_pods=0, resync=args.resync, profile=args.profile
    ) as s:
        s.create_te("warmup")
        wait_until(lambda: "warmup" in s.jobs.by_te("adapter"), 120, "warm-up Job", 0.01)
        wait_until(lambda: "IN_PROGRESS" in s.terminal_or_state("warmup"), 120, "warm-up")
        quiet = {"raw_before": wait_quiet()}
        raw_before = raw_job_rate(s, args.raw, args.threads, suspend=not args.raw_unsuspended)
        quiet["raw_te"] = wait_quiet()
        raw_te = raw_te_rate(s, args.n, args.threads)
        quiet["burst"] = wait_quiet()
        before = api_window(s)
        cpu0, load0, rss0 = _cpu_now(s), loadavg(), s.rss()
        names = [f"b-{i:05d}" for i in range(args.n)]
        t0 = time.monotonic()
        post_s = s.bulk_create(names, args.threads)
        cpu_posted = _cpu_now(s)
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: all(n in s.jobs.by_te("adapter") for n in names),
                args.job_timeout,
                "all adapter Jobs",
                0.05,
            )
        t_jobs = time.monotonic()
        cpu_jobs, load_jobs = _cpu_now(s), loadavg()
        jobs = s.jobs.by_te("adapter")
        made = [n for n in names if n in jobs]
        job_span = max(jobs[n]["added"] for n in made) - t0 if made else None
        from_post, from_posted = s.job_latencies(names)

        def started() -> int:
            with s.tes.lock:
                return sum(
                    1 for n in names if "IN_PROGRESS" in s.tes.tes.get(n, {}).get("states", {})
                )

        with contextlib.suppress(TimeoutError):
            wait_until(lambda: started() == len(names), args.job_timeout, "all IN_PROGRESS", 0.1)
        with s.tes.lock:
            progress = [
                s.tes.tes[n]["states"]["IN_PROGRESS"]
                for n in names
                if "IN_PROGRESS" in s.tes.tes.get(n, {}).get("states", {})
            ]
            status_lag = [
                s.tes.tes[n]["states"]["IN_PROGRESS"] - jobs[n]["added"]
                for n in made
                if "IN_PROGRESS" in s.tes.tes.get(n, {}).get("states", {})
            ]
        t_status = time.monotonic()
        cpu_status = _cpu_now(s)
        events_expected = len(names) + 1  # and the warm-up's

        def events_done() -> bool:
            return _events_named(cluster, s.ns, "TASK_STARTED") >= events_expected

        with contextlib.suppress(TimeoutError):
            wait_until(events_done, 120, "TASK_STARTED Events", 1.0)
        time.sleep(2.0)
        after = api_window(s)
        k8s_events = _events_named(cluster, s.ns, "TASK_STARTED")
        db_started = _db_events(s, "TASK_STARTED")
        stats, rss1 = s.stats(), s.rss()
        quiet["raw_after"] = wait_quiet()
        raw_after = raw_job_rate(
            s, args.raw, args.threads, suspend=not args.raw_unsuspended, tag="b"
        )
        profile_text = s.stop_operator() if args.profile else ""
        raws = [raw_before, raw_after]
        raw_rate = sum(r["jobs_per_s"] for r in raws) / 2
        raw_seconds = sum(r["seconds"] for r in raws) / 2
        job_rate = rate(len(made), job_span)
        p95 = (summary(from_post).get("p95") or 0) / 1000
        burst_cpu = _cpu_delta(cpu0, cpu_jobs)
        return {
            "benchmark": "burst",
            "pyinstrument_enabled": args.profile,
            "pyinstrument_top": profile_text.splitlines()[:150],
            "tasks": args.n,
            "jobs_created": len(made),
            "pods": "ResourceQuota pods=0: Jobs exist, no pod ever starts",
            "client_threads": args.threads,
            "quiet_before": quiet,
            "te_bulk_post_s": round(post_s, 3),
            "te_post_rate_per_s": rate(args.n, post_s),
            "to_adapter_job_created": {
                "seconds": round(job_span, 3) if job_span else None,
                "per_s": job_rate,
            },
            "raw_job_create_limit": {
                "before": {k: v for k, v in raw_before.items() if k != "jobs_created_s"},
                "after": {k: v for k, v in raw_after.items() if k != "jobs_created_s"},
                "jobs_per_s": round(raw_rate, 2),
                "seconds": round(raw_seconds, 3),
            },
            "raw_te_post_limit": {
                **raw_te,
                "note": "the same TaskExecutions POSTed with nothing serving or watching "
                "them: an upper bound of the burst's Job rate (a Job per TaskExecution)",
                "ratio_bound": round(raw_te["per_s"] / raw_rate, 3) if raw_te["per_s"] else None,
            },
            "targets": {
                "job_rate_ratio": round(job_rate / raw_rate, 3) if job_rate else None,
                "job_rate_ratio_target": 0.6,
                "apply_to_job_p95_s": round(p95, 3),
                "apply_to_job_p95_limit_s": round(1.25 * raw_seconds, 3),
                "apply_to_job_p95_vs_raw_seconds": round(p95 / raw_seconds, 3),
                "apply_to_job_p95_vs_raw_target": 1.25,
            },
            "apply_to_adapter_job_ms": summary(from_post),
            "posted_to_adapter_job_ms": summary(from_posted),
            "followed": {
                "in_progress_status": len(progress),
                "task_started_events": k8s_events,
                "task_started_db_rows": db_started,
                "expected": len(names) + 1,
                "all_in_progress_after_s": round(max(progress) - t0, 3) if progress else None,
                "job_to_status_lag_ms": summary(status_lag),
            },
            "cpu_seconds": {
                "te_posts": _cpu_delta(cpu0, cpu_posted),
                "burst_to_last_job": burst_cpu,
                "follow_up": _cpu_delta(cpu_jobs, cpu_status),
            },
            "cpu_ms_per_task_burst": {
                k: round(1000 * v / args.n, 2) for k, v in burst_cpu.items() if v is not None
            },
            "windows_s": {
                "burst_to_last_job": round(t_jobs - t0, 3),
                "follow_up": round(t_status - t_jobs, 3),
            },
            "timeline": {
                "note": "seconds from the first TaskExecution POST (operator) or the first "
                "Job POST (raw); one entry per object, sorted",
                "te_posts_s": sorted(round(s.created[n]["posted"] - t0, 4) for n in names),
                "operator_jobs_s": sorted(round(jobs[n]["added"] - t0, 4) for n in made),
                "operator_status_in_progress_s": sorted(round(t - t0, 4) for t in progress),
                "raw_jobs_s_before": raw_before["jobs_created_s"],
                "raw_jobs_s_after": raw_after["jobs_created_s"],
            },
            "operator_rss_kib": {"before": rss0, "after": rss1},
            "load": {"start": load0, "at_jobs": load_jobs, "end": loadavg()},
            "api_cost": api_cost(before, after, len(made), args.n),
            "profile": probe_profile(stats),
        }


def bench_api_cost(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    with Session(cluster, "api", resync=args.resync) as s:
        time.sleep(5.0)
        idle0 = api_window(s)
        time.sleep(args.idle)
        idle1 = api_window(s)  # background: other clients and kube components, no tasks
        names = [f"api-{i:03d}" for i in range(args.n)]
        before = api_window(s)
        s.bulk_create(names, 1)
        done = _wait_terminal(s, names, args.complete_timeout)
        time.sleep(3.0)
        after = api_window(s)
        ns_events = json.loads(cluster.kubectl("get", "events", "-n", s.ns, "-o", "json").stdout)[
            "items"
        ]
        by_source: Counter[str] = Counter(
            (e.get("reportingComponent") or (e.get("source") or {}).get("component") or "?")
            for e in ns_events
        )
        with s.tes.lock:
            te_versions = [s.tes.tes[n]["events"] - 1 for n in names if n in s.tes.tes]
        return {
            "benchmark": "api-cost",
            "tasks": args.n,
            "outcomes": dict(Counter(done.values())),
            "background_idle": {
                "seconds": round(idle1["t"] - idle0["t"], 1),
                "by_request": request_table(metric_delta(idle0["metrics"], idle1["metrics"])),
            },
            "run": api_cost(before, after, len(done), args.n),
            "namespace_ground_truth": {
                "events_by_reporter": dict(by_source),
                "te_status_changes_seen_by_watch_per_task": round(
                    sum(te_versions) / len(te_versions), 2
                )
                if te_versions
                else None,
                "jobs": len(s.jobs.jobs),
            },
            "profile": probe_profile(after["probe"]),
        }


def _api_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    calls = {
        k: v["n"] - before.get("api", {}).get(k, {}).get("n", 0)
        for k, v in after.get("api", {}).items()
    }
    return {k: v for k, v in calls.items() if v}


LEASE_CALLS = frozenset({"get:leases", "update:leases", "create:leases"})


def _idle(s: Session, seconds: float, resync: float) -> dict[str, Any]:
    """API calls, reconciles and CPU of the operator while nothing changes."""
    pid = s.proc.pid if s.proc else -1
    stats0, cpu0, t0, load0 = s.stats(), cpu_seconds(pid), time.monotonic(), loadavg()
    time.sleep(seconds)
    stats1, cpu1, t1 = s.stats(), cpu_seconds(pid), time.monotonic()
    calls = _api_delta(stats0, stats1)
    periods = (t1 - t0) / resync
    objects = {k: v for k, v in calls.items() if k not in LEASE_CALLS}
    cpu = (cpu1 or 0.0) - (cpu0 or 0.0)
    return {
        "seconds": round(t1 - t0, 1),
        "resync_periods": round(periods, 2),
        "api_calls": calls,
        "api_calls_per_resync_period": round(sum(calls.values()) / periods, 2),
        "api_calls_per_resync_period_without_lease": round(sum(objects.values()) / periods, 2),
        "lease_calls_per_resync_period": round(
            sum(v for k, v in calls.items() if k in LEASE_CALLS) / periods, 2
        ),
        "reconciles": (stats1.get("reconcile", {}).get("n") or 0)
        - (stats0.get("reconcile", {}).get("n") or 0),
        "cpu_seconds": round(cpu, 3),
        "cpu_percent_of_one_core": round(100 * cpu / (t1 - t0), 3),
        "load": [load0, loadavg()],
    }


class SoakDriver(threading.Thread):
    """Steady arrivals and completions: a real task (adapter Job + gate Job) every
    ``interval`` seconds; a finished one is deleted (its Jobs and ConfigMap follow)."""

    def __init__(self, s: Session, interval: float) -> None:
        super().__init__(daemon=True, name="soak")
        self.s, self.interval = s, interval
        self.stop = threading.Event()
        self.created: list[str] = []
        self.deleted: dict[str, str] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        i = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            try:
                if time.monotonic() >= next_at:
                    name = f"soak-{i:05d}"
                    self.s.create_te(name)
                    self.created.append(name)
                    i += 1
                    next_at += self.interval
                pending = [n for n in self.created if n not in self.deleted]
                for name, state in self.s.terminal(pending).items():
                    self.s.cluster.custom.delete_namespaced_custom_object(
                        GROUP, VERSION, self.s.ns, TE, name
                    )
                    self.deleted[name] = state
            except Exception as exc:  # recorded, the soak goes on
                self.errors.append(repr(exc)[:300])
            self.stop.wait(0.5)


def bench_memory(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """TaskExecutions on a missing Adapter (each parks: one status write), then idle, then a
    soak with steady arrivals and completions of real tasks next to them."""
    soak_tasks = args.soak_interval > 0
    with Session(
        cluster,
        "mem",
        git=soak_tasks,
        adapter=soak_tasks,
        resync=args.resync,
        tracemalloc=args.tracemalloc,
        adapter_cpu=args.adapter_cpu,
    ) as s:
        time.sleep(3.0)
        heaps: dict[str, Any] = {"base": s.heap("base")}
        points = [{"present": 0, "rss_kib": s.rss(), "load": loadavg()}]
        made = 0
        for target in args.sizes:
            names = [f"m-{i:05d}" for i in range(made, target)]
            t0 = time.monotonic()
            s.bulk_create(names, args.threads, adapter="absent")
            made = target
            try:
                wait_until(
                    lambda ns=names: all(
                        "AdapterNotFound" in s.tes.tes.get(n, {}).get("reasons", {}) for n in ns
                    ),
                    args.park_timeout,
                    f"{target} parked",
                    0.5,
                )
                parked = True
            except TimeoutError:
                parked = False
            time.sleep(5.0)
            points.append(
                {
                    "present": target,
                    "all_parked": parked,
                    "create_and_park_s": round(time.monotonic() - t0, 1),
                    "rss_kib": s.rss(),
                    "load": loadavg(),
                }
            )
            heaps[f"present_{target}"] = s.heap(f"present_{target}")
            print(json.dumps(points[-1]["rss_kib"]), target, file=sys.stderr)
        idle = _idle(s, args.idle_periods * args.resync, args.resync) if args.idle_periods else {}
        print("idle", json.dumps(idle), file=sys.stderr)
        soak: list[dict[str, Any]] = []
        driver = SoakDriver(s, args.soak_interval) if soak_tasks else None
        if driver is not None:
            driver.start()
        t0 = time.monotonic()
        pid = s.proc.pid if s.proc else -1
        cpu0 = cpu_seconds(pid)
        while time.monotonic() - t0 < args.soak:
            soak.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "rss_kib": s.rss().get("VmRSS"),
                    "arrived": len(driver.created) if driver else 0,
                    "completed": len(driver.deleted) if driver else 0,
                    "load1": loadavg()[0],
                }
            )
            time.sleep(args.soak_step)
        if driver is not None:
            driver.stop.set()
            driver.join(timeout=30)
        soak.append(
            {
                "t_s": round(time.monotonic() - t0, 1),
                "rss_kib": s.rss().get("VmRSS"),
                "arrived": len(driver.created) if driver else 0,
                "completed": len(driver.deleted) if driver else 0,
                "load1": loadavg()[0],
            }
        )
        soak_cpu = (cpu_seconds(pid) or 0.0) - (cpu0 or 0.0)
        heaps["soak_end"] = s.heap("soak_end")
        stats = s.stats()
        restart = []
        if args.restart_wait > 0:  # a fresh operator with everything already present
            s.stop_operator()
            t0 = time.monotonic()
            s.start_operator()
            while time.monotonic() - t0 < args.restart_wait:
                restart.append({"t_s": round(time.monotonic() - t0, 1), "rss_kib": s.rss()})
                time.sleep(args.soak_step)
            restart.append({"t_s": round(time.monotonic() - t0, 1), "rss_kib": s.rss()})
        rss = [p["rss_kib"] for p in soak if p["rss_kib"]]
        settled = [p["rss_kib"] for p in soak if p["rss_kib"] and p["t_s"] >= args.soak_warmup]
        return {
            "benchmark": "memory",
            "resync_seconds": args.resync,
            "tracemalloc_enabled": args.tracemalloc,
            "points": points,
            "idle": idle,
            "soak": {
                "seconds": args.soak,
                "present_parked": made,
                "task_interval_s": args.soak_interval,
                "arrived": len(driver.created) if driver else 0,
                "completed": dict(Counter(driver.deleted.values())) if driver else {},
                "driver_errors": driver.errors[:20] if driver else [],
                "operator_cpu_percent_of_one_core": round(100 * soak_cpu / max(args.soak, 1), 2),
                "rss_first_last_kib": [rss[0], rss[-1]] if rss else None,
                "rss_min_max_kib": [min(rss), max(rss)] if rss else None,
                "settled_after_s": args.soak_warmup,
                "rss_settled_min_max_kib": [min(settled), max(settled)] if settled else None,
                "rss_settled_spread_percent": round(100 * (max(settled) / min(settled) - 1), 2)
                if settled
                else None,
                "samples": soak,
            },
            "targets": {
                "rss_mib_with_10000": round(
                    max(
                        [p["rss_kib"].get("VmRSS", 0) for p in points if p["present"] >= 10000]
                        + ([max(rss)] if rss else [0])
                    )
                    / 1024,
                    1,
                ),
                "rss_mib_target": 200,
                "soak_spread_percent": round(100 * (max(settled) / min(settled) - 1), 2)
                if settled
                else None,
                "soak_spread_target_percent": 5,
                "soak_minutes": round(args.soak / 60, 1),
                "idle_api_calls_per_resync_period": idle.get("api_calls_per_resync_period"),
                "idle_api_calls_per_resync_period_without_lease": idle.get(
                    "api_calls_per_resync_period_without_lease"
                ),
                "idle_api_calls_target": 1,
                "idle_cpu_percent": idle.get("cpu_percent_of_one_core"),
                "idle_cpu_target_percent": 2,
            },
            "tracemalloc": heaps,
            "profile_end": probe_profile(stats),
            "after_restart": {"present": made, "samples": restart},
        }


# ---------------------------------------------------------------------------- PostgreSQL


def _db_url(args: argparse.Namespace) -> str | None:
    if args.db != "postgres":
        return None
    base = (
        subprocess.run(
            [str(ROOT / "hack/postgres/up")],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    from sqlalchemy import create_engine, text

    args.pg_name = f"opbench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"CREATE DATABASE {args.pg_name}"))
    admin.dispose()
    args.pg_base = base
    return base.rsplit("/", 1)[0] + f"/{args.pg_name}"


def _drop_db(args: argparse.Namespace) -> None:
    if getattr(args, "pg_name", None):
        from sqlalchemy import create_engine, text

        admin = create_engine(args.pg_base.replace("postgresql://", "postgresql+psycopg://", 1))
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {args.pg_name} WITH (FORCE)"))
        admin.dispose()


# ---------------------------------------------------------------------------- CLI


BENCHES: dict[str, Callable[[Cluster, argparse.Namespace], dict[str, Any]]] = {
    "latency": bench_latency,
    "throughput": bench_throughput,
    "db": bench_throughput,
    "queued": bench_queued,
    "burst": bench_burst,
    "api-cost": bench_api_cost,
    "memory": bench_memory,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        sp = sub.add_parser(name)
        sp.add_argument(
            "--n",
            type=int,
            default={"latency": 50, "queued": 1000, "burst": 1000, "api-cost": 20}.get(name, 100),
        )
        sp.add_argument("--resync", type=float, default=30.0, help="ORCHESTRATOR_RESYNC_SECONDS")
        sp.add_argument("--threads", type=int, default=4, help="client threads for bulk creates")
        sp.add_argument(
            "--raw",
            type=int,
            default=1000 if name == "burst" else 200,
            help="Jobs for the raw create rate",
        )
        sp.add_argument(
            "--raw-unsuspended",
            action="store_true",
            help="burst: the raw Jobs are not suspended (the Job controller reacts to them)",
        )
        sp.add_argument("--gap", type=float, default=0.3, help="pause between sequential creates")
        sp.add_argument("--extra", type=int, default=20, help="queued: sequential TEs on top")
        sp.add_argument("--idle", type=float, default=20.0, help="api-cost: background window")
        sp.add_argument("--job-timeout", type=float, default=900.0)
        sp.add_argument("--complete-timeout", type=float, default=1200.0)
        sp.add_argument("--park-timeout", type=float, default=900.0)
        sp.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
        sp.add_argument("--soak", type=float, default=300.0, help="memory: soak seconds")
        sp.add_argument(
            "--soak-interval",
            type=float,
            default=0.0,
            help="memory: a real task every N seconds during the soak (0: none)",
        )
        sp.add_argument(
            "--soak-warmup", type=float, default=120.0, help="memory: flatness counted after"
        )
        sp.add_argument(
            "--idle-periods", type=int, default=0, help="memory: resync periods measured idle"
        )
        sp.add_argument("--tracemalloc", action="store_true", help="memory: heap snapshots")
        sp.add_argument("--soak-step", type=float, default=10.0)
        sp.add_argument(
            "--adapter-cpu",
            default="500m",
            help="memory: the soak tasks' CPU request and limit (a patch needs far less than 500m)",
        )
        sp.add_argument("--restart-wait", type=float, default=0.0, help="memory: RSS after restart")
        sp.add_argument(
            "--db", choices=["sqlite", "postgres"], default="postgres" if name == "db" else "sqlite"
        )
        sp.add_argument("--profile", action="store_true", help="queued: pyinstrument operator")
        sp.add_argument("--out", type=Path, default=None)
    return p


def _git_state() -> dict[str, str]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "uncommitted_in_operator_code": git("diff", "--stat", "--", "core/kube", "operator")
        .splitlines()[-1:]
        .__str__(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sys.path.insert(0, str(ROOT))
    cluster = Cluster()
    started = datetime.now(UTC)
    load = loadavg()
    result = BENCHES[args.bench](cluster, args)
    out = (
        args.out
        or RESULTS
        / f"operator-{args.bench}{'-' + args.db if args.bench in ('throughput', 'db') else ''}.json"
    )
    report = {
        **result,
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "load_avg_start_end": [load, loadavg()],
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
        "versions": cluster.versions(),
        "image": cluster.image,
        "git": _git_state(),
        "args": {
            k: v for k, v in vars(args).items() if k not in ("out",) and not k.startswith("pg_")
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Smoke test of bench/operator_bench.py's pure parts: no cluster, no timing thresholds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "operator_bench", ROOT / "bench/operator_bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["operator_bench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("operator_bench", None)


SAMPLE_BEFORE = """\
# HELP apiserver_request_total [STABLE] Counter of apiserver requests.
# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",dry_run="",group="batch",resource="jobs",scope="resource",subresource="",verb="POST",version="v1"} 10
apiserver_request_total{code="200",component="apiserver",dry_run="",group="orchestrator.dev",resource="taskexecutions",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 4
apiserver_request_total{code="200",component="apiserver",dry_run="",group="orchestrator.dev",resource="taskexecutions",scope="resource",subresource="",verb="GET",version="v1alpha1"} 7
apiserver_request_total_other{code="200"} 99
apiserver_request_duration_seconds_bucket{le="0.1",verb="GET"} 5
"""

SAMPLE_AFTER = """\
apiserver_request_total{code="201",component="apiserver",dry_run="",group="batch",resource="jobs",scope="resource",subresource="",verb="POST",version="v1"} 14
apiserver_request_total{code="200",component="apiserver",dry_run="",group="orchestrator.dev",resource="taskexecutions",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 10
apiserver_request_total{code="200",component="apiserver",dry_run="",group="orchestrator.dev",resource="taskexecutions",scope="resource",subresource="",verb="GET",version="v1alpha1"} 7
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 3
apiserver_request_total{code="201",component="apiserver",dry_run="",group="orchestrator.dev",resource="taskexecutions",scope="resource",subresource="",verb="POST",version="v1alpha1"} 2
"""


def test_parse_metrics_reads_only_the_named_counter(bench) -> None:
    parsed = bench.parse_metrics(SAMPLE_BEFORE)
    assert len(parsed) == 3
    jobs = next(k for k in parsed if dict(k)["resource"] == "jobs")
    assert dict(jobs)["verb"] == "POST" and parsed[jobs] == 10.0


def test_delta_table_and_counts(bench) -> None:
    delta = bench.metric_delta(
        bench.parse_metrics(SAMPLE_BEFORE), bench.parse_metrics(SAMPLE_AFTER)
    )
    table = bench.request_table(delta)
    assert table == {
        "PATCH orchestrator.dev/taskexecutions/status 200": 6,
        "POST batch/jobs 201": 4,
        "POST events 201": 3,
        "POST orchestrator.dev/taskexecutions 201": 2,
    }  # the unchanged GET series is dropped
    assert bench.count_requests(table, bench.WRITE_VERBS) == 15
    assert bench.count_requests(table, frozenset({"POST"}), ["batch/jobs"]) == 4
    assert bench.count_requests(table, bench.READ_VERBS) == 0


def test_api_cost_subtracts_the_bench_posts(bench) -> None:
    before = {"metrics": bench.parse_metrics(SAMPLE_BEFORE), "probe": {"writes": 1}, "t": 0.0}
    after = {"metrics": bench.parse_metrics(SAMPLE_AFTER), "probe": {"writes": 17}, "t": 1.0}
    before["load"] = after["load"] = [0.0, 0.0, 0.0]
    cost = bench.api_cost(before, after, tasks=2, bench_te_posts=2)
    assert cost["apiserver"]["writes_on_operator_resources"] == 13
    assert cost["apiserver"]["job_posts_per_task"] == 2.0
    assert cost["operator_counters"]["writes_per_task"] == 8.0


def test_percentiles(bench) -> None:
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 99) == 3.0
    data = [float(x) for x in range(1, 101)]  # 1..100
    assert bench.percentile(data, 50) == pytest.approx(50.5)
    assert bench.percentile(data, 95) == pytest.approx(95.05)
    assert bench.percentile(data, 0) == 1.0 and bench.percentile(data, 100) == 100.0
    s = bench.summary([0.010, 0.020, 0.030])
    assert s["n"] == 3 and s["p50"] == pytest.approx(20.0) and s["max"] == pytest.approx(30.0)
    assert bench.summary([]) == {"n": 0}
    assert bench.rate(10, 2.0) == 5.0 and bench.rate(10, 0.0) is None


def test_cli_knows_every_benchmark(bench) -> None:
    for name in ("latency", "throughput", "queued", "api-cost", "memory", "db"):
        args = bench.parser().parse_args([name])
        assert args.bench == name
    assert bench.parser().parse_args(["db"]).db == "postgres"

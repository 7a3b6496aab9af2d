"""bench/summarize.py --plots: the burst and soak pictures drawn from recorded JSON (synthetic
results here), holding exactly the recorded points; results without the data are skipped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def summarize() -> ModuleType:
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "bench/summarize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


BURST = {
    "benchmark": "burst",
    "tasks": 3,
    "client_threads": 4,
    "targets": {"job_rate_ratio": 0.5},
    "timeline": {
        "te_posts_s": [0.0, 0.1, 0.2],
        "operator_jobs_s": [0.5, 0.3, 0.9],
        "raw_jobs_s_before": [0.0, 0.05, 0.1],
        "raw_jobs_s_after": [0.0, 0.06, 0.12],
    },
}
MEMORY = {
    "benchmark": "memory",
    "targets": {"rss_mib_target": 200},
    "soak": {
        "present_parked": 10000,
        "task_interval_s": 2.0,
        "samples": [
            {"t_s": 0.0, "rss_kib": 150 * 1024},
            {"t_s": 60.0, "rss_kib": None},  # the operator was being sampled as it restarted
            {"t_s": 120.0, "rss_kib": 153 * 1024},
        ],
    },
}


def test_burst_plot_steps_through_every_recorded_job(summarize: ModuleType, tmp_path: Path) -> None:
    fig = summarize.burst_plot(BURST, tmp_path / "burst.png")
    assert (tmp_path / "burst.png").read_bytes().startswith(PNG)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    operator = lines["Jobs created by the operator"]
    assert list(operator.get_xdata()) == [0.0, 0.3, 0.5, 0.9]
    assert list(operator.get_ydata()) == [0, 1, 2, 3]
    assert "raw client, before" in lines and "raw client, after" in lines


def test_soak_plot_draws_rss_in_mib_and_the_target(summarize: ModuleType, tmp_path: Path) -> None:
    fig = summarize.soak_plot(MEMORY, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes().startswith(PNG)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    rss = lines["operator RSS"]
    assert list(rss.get_xdata()) == [0.0, 2.0] and list(rss.get_ydata()) == [150.0, 153.0]
    assert list(lines["target 200 MiB"].get_ydata()) == [200, 200]


def test_draw_plots_skips_what_is_not_recorded(summarize: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "operator-burst.json").write_text(json.dumps(BURST))
    # an older memory result (parked objects only, no steady arrivals): no soak picture
    (results / "operator-memory.json").write_text(json.dumps({"soak": {"samples": []}}))
    assert summarize.draw_plots(results, tmp_path) == [tmp_path / "burst.png"]
    assert not (tmp_path / "soak.png").exists()

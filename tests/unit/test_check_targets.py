"""bench/check_targets.py: each target met, missed or not measured from recorded JSON, and
the exit code says whether all are met. Synthetic result files, no timing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ct() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_targets", ROOT / "bench/check_targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write(results: Path, name: str, doc: object) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / name).write_text(json.dumps(doc), encoding="utf-8")


def statuses(ct: ModuleType, results: Path) -> dict[str, str]:
    return {v.target.name: v.status for v in ct.check(results)}


def all_met(results: Path) -> None:
    write(
        results,
        "engine_overhead-sqlite-issue17.json",
        {"runs": [{"overhead_share_of_bare": 0.2, "overhead_per_task_ms": 9.0}]},
    )
    burst = {
        "job_rate_ratio": 0.7,
        "job_rate_ratio_target": 0.6,
        "apply_to_job_p95_s": 6.0,
        "apply_to_job_p95_limit_s": 8.5,
    }
    write(results, "operator-burst.json", {"targets": burst})
    memory = {
        "rss_mib_with_10000": 150.0,
        "rss_mib_target": 200,
        "soak_spread_percent": 3.0,
        "soak_spread_target_percent": 5,
        "soak_minutes": 30.0,
        "idle_api_calls_per_resync_period": 16,
        "idle_api_calls_per_resync_period_without_lease": 1,
        "idle_api_calls_target": 1,
        "idle_cpu_percent": 0.5,
        "idle_cpu_target_percent": 2,
    }
    write(results, "operator-memory.json", {"targets": memory})
    idle = {"lease_calls_per_resync_period": 15}
    write(results, "operator-idle.json", {"targets": memory, "idle": idle})


def test_every_target_met_exits_zero(
    ct: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    all_met(tmp_path)
    assert set(statuses(ct, tmp_path).values()) == {"met"}
    assert ct.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(ct.TARGETS)} of {len(ct.TARGETS)} targets met" in out


def test_a_missing_result_is_not_measured_and_fails(ct: ModuleType, tmp_path: Path) -> None:
    all_met(tmp_path)
    (tmp_path / "operator-burst.json").unlink()
    got = statuses(ct, tmp_path)
    assert [s for n, s in got.items() if n.startswith("burst")] == ["not measured"] * 2
    assert ct.main(["--results", str(tmp_path)]) == 1


def test_every_repeat_must_meet_and_limits_come_from_the_same_run(
    ct: ModuleType, tmp_path: Path
) -> None:
    all_met(tmp_path)
    write(
        tmp_path,
        "engine_overhead-sqlite-issue17.json",
        {
            "runs": [
                {"overhead_share_of_bare": 0.2, "overhead_per_task_ms": 9.0},
                {"overhead_share_of_bare": 0.31, "overhead_per_task_ms": 10.0},
            ]
        },
    )
    burst = json.loads((tmp_path / "operator-burst.json").read_text())
    burst["targets"]["apply_to_job_p95_limit_s"] = 5.0  # the raw client was faster this time
    write(tmp_path, "operator-burst.json", burst)
    got = statuses(ct, tmp_path)
    assert got["embedded: overhead per task <= 30% of the bare limit (SQLite)"] == ("missed")
    assert got["embedded: overhead per task < 50 ms (SQLite, issue 2)"] == "met"
    p95 = "burst: p95 apply->Job <= 1.25x the raw client's time for the same Jobs"
    assert got[p95] == "missed"
    assert ct.main(["--results", str(tmp_path)]) == 1


def test_a_short_soak_does_not_count(ct: ModuleType, tmp_path: Path) -> None:
    all_met(tmp_path)
    memory = json.loads((tmp_path / "operator-memory.json").read_text())
    memory["targets"]["soak_minutes"] = 3.0  # flat, but over 3 minutes, not 30
    write(tmp_path, "operator-memory.json", memory)
    verdict = {v.target.name: v for v in ct.check(tmp_path)}[
        "memory: flat within 5% over a 30-minute soak"
    ]
    assert verdict.status == "missed" and "soak_minutes" in verdict.detail


def test_a_value_that_is_not_a_number_is_not_measured(ct: ModuleType, tmp_path: Path) -> None:
    all_met(tmp_path)
    idle = json.loads((tmp_path / "operator-idle.json").read_text())
    idle["targets"]["idle_cpu_percent"] = None
    write(tmp_path, "operator-idle.json", idle)
    assert statuses(ct, tmp_path)["idle: under 2% of one core with 10,000 parked"] == (
        "not measured"
    )


def test_idle_judges_the_objects_calls_and_shows_the_lease_beside(
    ct: ModuleType, tmp_path: Path
) -> None:
    name = "idle: at most one object API call per resync period with 10,000 parked"
    all_met(tmp_path)
    verdict = {v.target.name: v for v in ct.check(tmp_path)}[name]
    assert verdict.status == "met" and "Lease renewals per period: 15" in verdict.detail
    idle = json.loads((tmp_path / "operator-idle.json").read_text())
    idle["targets"]["idle_api_calls_per_resync_period_without_lease"] = 2  # an O(N) resync
    write(tmp_path, "operator-idle.json", idle)
    assert statuses(ct, tmp_path)[name] == "missed"

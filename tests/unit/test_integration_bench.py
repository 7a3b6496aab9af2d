"""Smoke test of bench/integration_batching.py (simulated part): it runs and its report is sane.

No timings: counts only, which hold on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_simulated_batching_report(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/integration_batching.py"), "--n", "16",
         "--seeds", "5", "--p", "0", "0.25", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    clean, dirty = report["simulated"]
    # no culprit: one gate run per batch; one-by-one needs one per change
    assert clean["one_by_one_gate_runs_per_merge"] == 1.0
    assert clean["gate_runs_per_merge"]["fixed K=4"] == 0.25
    assert clean["gate_runs_per_merge"]["one-by-one (K=1)"] == 1.0
    # with culprits, one-by-one still needs one run per change that applies (>= 1 per merge)
    assert dirty["one_by_one_gate_runs_per_merge"] >= 1.0
    assert (
        dirty["gate_runs_per_merge"]["one-by-one (K=1)"] == dirty["one_by_one_gate_runs_per_merge"]
    )

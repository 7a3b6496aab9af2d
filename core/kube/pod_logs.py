"""An attempt's pod log: read through the API, split into records and the runner's report,
and saved in the task's log file (once per attempt and role, also across restarts).

Only a confirmed 404 (the pod is gone) means there is no log; any other failure of the read
raises (the work queue retries), so a kubelet blip never throws away a good diff.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from core.identity import TaskKey
from core.kube.api import KubeApi
from core.runner.protocol import RunnerResult, parse_pod_log


@dataclass(frozen=True)
class PodReport:
    records: list[dict[str, Any]]
    result: RunnerResult | None
    #: The runner's own words when it failed before reporting (a clone that failed, say).
    runner_error: str | None


async def read_report(api: KubeApi, namespace: str, job: str) -> PodReport | None:
    """The newest pod's log of ``job``; None when there is no pod or it is gone."""
    pods = await api.job_pods(namespace, job)
    text = await api.pod_log(namespace, pods[-1]["metadata"]["name"]) if pods else None
    if text is None:
        return None
    parsed = parse_pod_log(text)
    failed = [r.get("error") for r in parsed.records if r.get("event") == "runner_failed"]
    error = str(failed[-1]) if failed and failed[-1] else None
    return PodReport(parsed.records, parsed.result, error)


def save_log(
    workdir: Path,
    key: TaskKey,
    attempt: int,
    role: str,
    records: list[dict[str, Any]],
    now: Callable[[], datetime],
) -> None:
    """Append ``records`` to the task's log file unless this attempt's ``role`` log is there."""
    path = workdir / "logs" / "execution" / f"{key.log_name}.jsonl"
    marker = {"event": f"{role}_log_saved", "attempt": attempt}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == marker["event"] and rec.get("attempt") == attempt:
                return  # saved before a restart
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps({**rec, "task_id": key.task_id, "attempt": attempt}) + "\n")
        fh.write(json.dumps({"ts": now().isoformat(), "task_id": key.task_id, **marker}) + "\n")

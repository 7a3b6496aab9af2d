#!/usr/bin/env python3
"""Writes the phase-4 state files of the circuit-breaker demo (outputs are committed).

Five tasks are routed to ``broken-cli`` with ``fake-ai`` as fallback. ``broken-cli`` crashes
on every task: each of the first two tasks fails there once and completes on the fallback;
then the breaker of ``broken-cli`` is open (threshold 2) and the remaining tasks go straight to
the fallback. ``orchestrator status --run fallback`` shows it.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = "d143d8712a637d59f8cf0c2dc6a5dee0e71fa9cd"  # examples/demo/repos/calc.bundle
GATE = [{"name": "import", "command": ["{python}", "-c", "import calc"]}]


def main() -> None:
    tasks = [
        {
            "task_id": f"doc-{name}",
            "title": f"Document {name}",
            "prompt": f"Write docs/{name}.md.\nfake-ai: write docs/{name}.md :: # {name}",
            "repo": "repos/calc.bundle",
            "base_commit": BASE,
        }
        for name in ("add", "sub", "errors", "usage", "faq")
    ]
    adapters = [
        {
            "id": "broken-cli",
            "kind": "process",
            "description": "An AI CLI whose service is down.",
            "command": ["{python}", "{workdir}/tools/broken_cli.py", "{prompt_file}"],
            "gate": GATE,
            "retry": {"max_attempts": 2, "backoff_initial_seconds": 0.2, "jitter_seconds": 0.1},
            "breaker": {"failure_threshold": 2, "cooldown_seconds": 600},
        },
        {
            "id": "fake-ai",
            "kind": "process",
            "description": "The fallback (a scripted stand-in for an AI CLI).",
            "command": ["{python}", "-m", "core.testing.fake_ai", "--prompt-file", "{prompt_file}"],
            "gate": GATE,
        },
    ]
    decisions = [
        {"task_id": t["task_id"], "adapter_id": "broken-cli", "fallback_adapter_ids": ["fake-ai"]}
        for t in tasks
    ]
    state = HERE / ".state"
    state.mkdir(exist_ok=True)
    dump = lambda name, data: (state / name).write_text(json.dumps(data, indent=2) + "\n")  # noqa: E731
    dump("task_queue.json", {"run_id": "fallback", "tasks": tasks})
    dump(
        "routing_decisions.json",
        {"run_id": "fallback", "adapters": adapters, "decisions": decisions},
    )
    dump("ROUTING_COMPLETE", {"run_id": "fallback", "completed_at": "2026-01-01T00:00:00Z"})


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Rebuilds the demo work dir's inputs: ``repos/calc.bundle`` and the phase-4 ``.state/`` files.

The repository is made with fixed dates and identities, so its commit ids (and so the
``base_commit`` of every task) are the same on every machine. Run it only to change the demo:
``python examples/demo/build.py``. The outputs are committed.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Demo Author",
    "GIT_AUTHOR_EMAIL": "demo@example.invalid",
    "GIT_COMMITTER_NAME": "Demo Author",
    "GIT_COMMITTER_EMAIL": "demo@example.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00+00:00",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+00:00",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True
    ).stdout


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + bytes(color) * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


FILES = {
    "calc/__init__.py": '"""A tiny calculator package."""\n\nfrom calc.ops import add, sub\n\n'
    '__all__ = ["add", "sub"]\n',
    "calc/ops.py": '"""Arithmetic helpers."""\n\n\ndef add(a, b):\n    return a + b\n\n\n'
    "def sub(a, b):\n    return a - b\n",
    "tests/__init__.py": "",
    "tests/test_ops.py": "import unittest\n\nfrom calc.ops import add, sub\n\n\n"
    "class OpsTest(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
    "    def test_sub(self):\n        self.assertEqual(sub(5, 3), 2)\n",
    "docs/README.md": "# calc\n\nTODO: write the documentation.\n",
}


def make_repo(root: Path) -> str:
    root.mkdir()
    git("init", "-q", "-b", "main", cwd=root)
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "assets").mkdir()
    (root / "assets/logo.png").write_bytes(png((200, 30, 30)))
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "calc: add and sub", cwd=root)
    return git("rev-parse", "HEAD", cwd=root).strip()


def patch_of(repo: Path, base: str, change) -> str:  # type: ignore[no-untyped-def]
    change(repo)
    git("add", "-A", cwd=repo)
    diff = git("diff", "--cached", "--binary", "--full-index", base, cwd=repo)
    git("reset", "-q", "--hard", base, cwd=repo)
    git("clean", "-qfdx", cwd=repo)
    return diff


def add_multiply(repo: Path) -> None:
    ops = repo / "calc/ops.py"
    ops.write_text(ops.read_text() + "\n\ndef mul(a, b):\n    return a * b\n")
    tests = repo / "tests/test_ops.py"
    tests.write_text(
        tests.read_text().replace("import add, sub", "import add, mul, sub")
        + "\n    def test_mul(self):\n        self.assertEqual(mul(4, 3), 12)\n"
    )


def break_sub(repo: Path) -> None:
    ops = repo / "calc/ops.py"
    ops.write_text(ops.read_text().replace("return a - b", "return b - a  # 'simplified'"))


def new_logo(repo: Path) -> None:
    (repo / "assets/logo.png").write_bytes(png((30, 30, 200), size=16))


GATE = [
    {"name": "compile", "command": ["{python}", "-m", "compileall", "-q", "calc", "tests"]},
    {"name": "import", "command": ["{python}", "-c", "import calc"], "timeout_seconds": 30},
    {
        "name": "unit-tests",
        "command": ["{python}", "-m", "unittest", "discover", "-s", "tests", "-t", "."],
        "timeout_seconds": 120,
    },
]
DOCS_LINT = {
    "name": "docs-no-todo",
    "command": [
        "{python}",
        "-c",
        "import pathlib, sys; sys.exit('TODO' in pathlib.Path('docs/README.md').read_text())",
    ],
}


def main() -> None:
    state = HERE / ".state"
    state.mkdir(exist_ok=True)
    (HERE / "repos").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "calc"
        base = make_repo(repo)
        bundle = HERE / "repos/calc.bundle"
        bundle.unlink(missing_ok=True)
        git("bundle", "create", "-q", str(bundle), "main", cwd=repo)
        patches = {
            "add-multiply": patch_of(repo, base, add_multiply),
            "break-subtract": patch_of(repo, base, break_sub),
            "update-logo": patch_of(repo, base, new_logo),
        }

    def task(task_id: str, title: str, prompt: str, **extra: object) -> dict[str, object]:
        return {
            "task_id": task_id,
            "title": title,
            "prompt": prompt,
            "repo": "repos/calc.bundle",
            "base_commit": base,
            **extra,
        }

    tasks = [
        task(
            "add-multiply",
            "Add multiplication",
            "Add calc.ops.mul(a, b) with a unit test.",
            target_paths=["calc/ops.py", "tests/test_ops.py"],
            patch=patches["add-multiply"],
            gate=[*GATE, DOCS_LINT],
            gate_baseline=True,
        ),
        task(
            "break-subtract",
            "Simplify subtraction",
            "Simplify calc.ops.sub.",
            patch=patches["break-subtract"],
        ),
        task(
            "tool-crash",
            "Refactor with a tool that crashes",
            "Refactor calc.\nfake-ai: say looking at the code\nfake-ai: exit 3",
        ),
        task(
            "slow-tool",
            "A tool that overruns its budget",
            "Write the docs.\nfake-ai: write docs/draft.md :: first draft\nfake-ai: sleep 30",
            timeout_seconds=3,
        ),
        task(
            "no-change",
            "A tool that changes nothing",
            "Check the code.\nfake-ai: say all looks fine to me",
        ),
        task(
            "update-logo",
            "New logo",
            "Replace assets/logo.png with the blue logo.",
            patch=patches["update-logo"],
        ),
        task(
            "split-module",
            "Split the module, add notes",
            "Move the helpers to calc/arith.py and keep calc.ops importable; add notes.\n"
            "fake-ai: rename calc/ops.py calc/arith.py\n"
            "fake-ai: write calc/ops.py :: from calc.arith import add, sub  # noqa: F401\n"
            # sent back by the integration worker (its calc/ops.py conflicts with add-multiply's
            # mul), the next attempt starts from the integration branch, where mul exists
            "fake-ai: on-feedback write calc/ops.py :: from calc.arith import add, mul, sub  # noqa: F401\n"
            "fake-ai: rename docs/README.md 'docs/Über die Module.md'",
        ),
        task(
            "human-docs",
            "Document calc by hand",
            "Replace the TODO in docs/README.md with real documentation.",
        ),
    ]
    adapters = [
        {
            "id": "patch",
            "kind": "patch",
            "description": "Applies the diff the task carries.",
            "gate": GATE,
            "retry": {"max_attempts": 1},
        },
        {
            "id": "fake-ai",
            "kind": "process",
            "description": "A scripted stand-in for an AI coding CLI (python -m core.testing.fake_ai).",
            "command": ["{python}", "-m", "core.testing.fake_ai", "--prompt-file", "{prompt_file}"],
            "timeout_seconds": 60,
            "gate": GATE,
            # only platform failures are retried: the demo shows each outcome once; and a
            # merge conflict found by `orchestrator integrate` sends the task back once
            "retry": {"max_attempts": 3, "retry_on": ["infrastructure", "merge_conflict"]},
        },
        {
            "id": "human",
            "kind": "manual",
            "description": "A person makes the change.",
            "gate": GATE,
        },
    ]
    route = {
        "add-multiply": "patch",
        "break-subtract": "patch",
        "update-logo": "patch",
        "human-docs": "human",
    }
    decisions = [
        {
            "task_id": t["task_id"],
            "adapter_id": route.get(str(t["task_id"]), "fake-ai"),
            "rationale": "demo routing",
        }
        for t in tasks
    ]
    write = lambda name, data: (state / name).write_text(json.dumps(data, indent=2) + "\n")  # noqa: E731
    write("task_queue.json", {"schema_version": 1, "run_id": "demo", "tasks": tasks})
    write(
        "routing_decisions.json",
        {"schema_version": 1, "run_id": "demo", "adapters": adapters, "decisions": decisions},
    )
    write("ROUTING_COMPLETE", {"run_id": "demo", "completed_at": "2026-01-01T00:00:00Z"})
    print(f"demo rebuilt: base commit {base}")


if __name__ == "__main__":
    main()

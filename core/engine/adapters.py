"""Adapter invocation: what runs for each adapter kind, with what argv, stdin and environment.

``process`` adapters run a command (a built-in template for an AI CLI, or the adapter's own)
in the attempt's worktree. The prompt is written to a file outside the worktree and reaches
the tool as ``{prompt_file}`` or on stdin; task text is never put into a command. The
environment is built from scratch: nothing from the executor's environment reaches the
adapter unless the adapter lists the name in ``pass_env`` (its own API key, typically).

Task fields never become options: the only template that names target paths (aider) puts
``--`` before them, so a path like ``--openai-api-base=https://elsewhere/v1`` stays a file
name. Claude Code, Codex and OpenCode take no target paths on their command lines (the paths
reach them in the prompt); a custom ``command`` that uses ``{target_paths}`` should put
``--`` before it too, and the entry contract refuses target paths that start with ``-``.

On the embedded backend the process runs in the sandbox (:mod:`core.engine.sandbox`): only
its tree and its HOME writable, the prompt and the mirror's objects readable, the work dir's
state hidden, the network as ``sandbox.network`` says.

``patch`` applies the diff carried by the task (deterministic: tests and the demo), and
``manual`` writes instructions for a human and waits for a patch submitted with
``orchestrator manual submit``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.engine.command_line import base_path, expand_argv
from core.engine.process_group import LineSink, ProcessResult, run_process_group
from core.engine.sandbox import Confinement, Sandbox
from core.engine.workspace import shared_object_dirs
from core.models import AdapterKind, AdapterSpec, CommandTemplate, TaskSpec


@dataclass(frozen=True)
class Template:
    argv: tuple[str, ...]
    stdin: str
    doc: str


#: Ready-made commands. Each was written against the tool's documented non-interactive mode;
#: none can be exercised here without network, so tests drive them with fake executables.
TEMPLATES: dict[CommandTemplate, Template] = {
    CommandTemplate.AIDER: Template(
        (
            "aider",
            "--yes-always",
            "--no-auto-commits",
            "--no-check-update",
            "--no-pretty",
            "--no-stream",
            "--message-file",
            "{prompt_file}",
            # argparse: everything after `--` is a file, whatever it starts with
            "--",
            "{target_paths}",
        ),
        "none",
        "aider reads the prompt with --message-file and edits the target paths in place",
    ),
    CommandTemplate.CLAUDE_CODE: Template(
        (
            "claude",
            "--print",
            "--permission-mode",
            "acceptEdits",
            "--output-format",
            "text",
        ),
        "prompt",
        "Claude Code in print mode reads the prompt on stdin and may edit files",
    ),
    CommandTemplate.CODEX: Template(
        ("codex", "exec", "--full-auto", "--skip-git-repo-check", "-"),
        "prompt",
        "Codex CLI `exec -` reads the prompt on stdin and runs sandboxed with workspace write",
    ),
    CommandTemplate.OPENCODE: Template(
        ("opencode", "run", "Carry out the task described on standard input."),
        "prompt",
        "OpenCode `run` appends piped stdin (the prompt) to its fixed message",
    ),
}


@dataclass(frozen=True)
class Invocation:
    argv: list[str]
    env: dict[str, str]
    stdin_file: Path | None


def prompt_text(task: TaskSpec, extra: str | None = None) -> str:
    parts = [
        f"# Task {task.task_id}: {task.title}".rstrip(": "),
        "",
        task.prompt.strip(),
    ]
    if task.target_paths:
        parts += ["", "Files to change:", *(f"- {p}" for p in task.target_paths)]
    if extra:
        parts += ["", "## Feedback from the previous attempt", "", extra.strip()]
    return "\n".join(parts) + "\n"


def adapter_environment(
    adapter: AdapterSpec,
    *,
    home: Path,
    task_id: str,
    attempt: int,
    prompt_file: Path,
    workspace: Path,
    parent_env: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    env = {
        "PATH": base_path(),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "ORCHESTRATOR_TASK_ID": task_id,
        "ORCHESTRATOR_ATTEMPT": str(attempt),
        "ORCHESTRATOR_PROMPT_FILE": str(prompt_file),
        "ORCHESTRATOR_WORKSPACE": str(workspace),
    }
    env.update({name: parent_env[name] for name in adapter.pass_env if name in parent_env})
    env.update(adapter.env)
    return env


def process_invocation(
    adapter: AdapterSpec,
    task: TaskSpec,
    *,
    attempt: int,
    workspace: Path,
    prompt_file: Path,
    home: Path,
    workdir: Path,
    python: str,
    parent_env: Mapping[str, str] = os.environ,
) -> Invocation:
    assert adapter.kind is AdapterKind.PROCESS
    if adapter.template is not None:
        template = TEMPLATES[adapter.template]
        argv_t: list[str] = list(template.argv)
        stdin = template.stdin if adapter.stdin == "none" else adapter.stdin
    else:
        assert adapter.command is not None
        argv_t, stdin = adapter.command, adapter.stdin
    argv = expand_argv(
        argv_t,
        {
            "prompt_file": str(prompt_file),
            "workspace": str(workspace),
            "task_id": task.task_id,
            "attempt": str(attempt),
            "python": python,
            "workdir": str(workdir),
            "target_paths": list(task.target_paths),
        },
    )
    env = adapter_environment(
        adapter,
        home=home,
        task_id=task.task_id,
        attempt=attempt,
        prompt_file=prompt_file,
        workspace=workspace,
        parent_env=parent_env,
    )
    return Invocation(argv=argv, env=env, stdin_file=prompt_file if stdin == "prompt" else None)


def run_process_adapter(
    adapter: AdapterSpec,
    task: TaskSpec,
    *,
    attempt: int,
    extra_input: str | None,
    tree: Path,
    attempt_dir: Path,
    workdir: Path,
    python: str,
    timeout: float,
    log: LineSink,
    note: Callable[..., None],
    grace_seconds: float,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sandbox: Sandbox | None = None,
) -> ProcessResult:
    """Write the prompt next to the tree, build the invocation, run it as a process group.

    Shared by the embedded backend (with its ``sandbox``) and the runner in adapter pods.
    """
    prompt = attempt_dir / "prompt.md"
    prompt.write_text(prompt_text(task, extra_input), encoding="utf-8")
    home = attempt_dir / "home"
    home.mkdir(exist_ok=True)
    inv = process_invocation(
        adapter,
        task,
        attempt=attempt,
        workspace=tree,
        prompt_file=prompt,
        home=home,
        workdir=workdir,
        python=python,
    )
    note("adapter_command", argv=inv.argv)
    return run_process_group(
        inv.argv,
        cwd=tree,
        env=inv.env,
        timeout=timeout,
        sink=log,
        stdin_file=inv.stdin_file,
        grace_seconds=grace_seconds,
        stop=stop,
        on_start=on_start,
        clock=clock,
        sandbox=sandbox,
        confinement=Confinement(
            writable=(tree, home),
            readable=(prompt, *shared_object_dirs(tree)),
            network=adapter.sandbox.network,
        ),
    )


MANUAL_DIR = "manual"


def manual_paths(workdir: Path, run_id: str, task_id: str) -> tuple[Path, Path]:
    """(instructions file for the human, where a submitted patch is stored)."""
    base = workdir / MANUAL_DIR / run_id / task_id
    return base / "INSTRUCTIONS.md", base / "submitted.diff"


def manual_instructions(task: TaskSpec, run_id: str, repo_url: str) -> str:
    return (
        prompt_text(task)
        + f"""
## How to hand in the change

1. Check out `{repo_url}` at commit `{task.base_commit}`.
2. Make the change and save it as a patch: `git diff --binary {task.base_commit} > change.diff`
   (stage new files first with `git add -A`).
3. Submit it: `orchestrator manual submit --run {run_id} {task.task_id} change.diff`
4. Run `orchestrator execute --run {run_id}` again: the patch is applied and tested.
"""
    )

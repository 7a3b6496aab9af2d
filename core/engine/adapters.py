"""Adapter invocation: what runs for each adapter kind, with what argv, stdin and environment.

``process`` adapters run a command (a built-in template for an AI CLI, or the adapter's own)
in the attempt's worktree. The prompt is written to a file outside the worktree and reaches
the tool as ``{prompt_file}`` or on stdin, byte for byte as the task carries it (no header,
nothing stripped); task text is never put into a command. On a retry with feedback (the
previous attempt's gate failure, a merge conflict) the feedback follows the prompt after the
line :data:`FEEDBACK_MARKER`, so every tool sees it -- the AI CLIs' built-in templates pass
nothing else -- and it is also alone in ``$ORCHESTRATOR_FEEDBACK_FILE``. What else we know
(the task's id and title, its target paths) goes to ``$ORCHESTRATOR_CONTEXT_FILE``. The
environment is built from scratch: nothing from the executor's environment reaches the
adapter unless the adapter lists the name in ``pass_env`` (its own API key, typically).

Task fields never become options: the only template that names target paths (aider) puts
``--`` before them, so a path like ``--openai-api-base=https://elsewhere/v1`` stays a file
name. Claude Code, Codex and OpenCode take no target paths on their command lines (the paths
reach them in the prompt); a custom ``command`` that uses ``{target_paths}`` should put
``--`` before it too, and the entry contract refuses target paths that start with ``-``.

On the embedded backend the process runs in the sandbox (:mod:`core.engine.sandbox`): only
its tree and its HOME writable, the prompt, context and feedback files and the mirror's
objects readable, the work dir's
state hidden, the network as ``sandbox.network`` says.

``api`` sends the task to an HTTP endpoint and applies the diff it answers with
(:mod:`core.engine.api_adapter`); ``patch`` applies the diff carried by the task
(deterministic: tests and the demo), and ``manual`` writes instructions for a human and waits
for a patch submitted with ``orchestrator manual submit``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.engine.api_adapter import ApiCaller, ApiOutcome
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


#: The line between the task's prompt and the feedback of the previous attempt.
FEEDBACK_MARKER = "--- feedback from the previous attempt ---"


def prompt_bytes(prompt: str, feedback: str | None) -> bytes:
    """What the tool reads: the prompt byte for byte, then the feedback on a retry."""
    if not feedback:
        return prompt.encode("utf-8")
    return f"{prompt}\n\n{FEEDBACK_MARKER}\n{feedback}\n".encode()


def task_context(task: TaskSpec, extra: str | None = None) -> str:
    """What we know about the task besides its prompt (``$ORCHESTRATOR_CONTEXT_FILE``)."""
    parts = [f"# Task {task.task_id}: {task.title}".rstrip(": ")]
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
    context_file: Path | None = None,
    feedback_file: Path | None = None,
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
    if context_file is not None:
        env["ORCHESTRATOR_CONTEXT_FILE"] = str(context_file)
    if feedback_file is not None:
        env["ORCHESTRATOR_FEEDBACK_FILE"] = str(feedback_file)
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
    context_file: Path | None = None,
    feedback_file: Path | None = None,
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
        context_file=context_file,
        feedback_file=feedback_file,
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
    prompt.write_bytes(prompt_bytes(task.prompt, extra_input))
    context = attempt_dir / "context.md"
    context.write_text(task_context(task, extra_input), encoding="utf-8")
    feedback: Path | None = None
    if extra_input:
        feedback = attempt_dir / "feedback.md"
        feedback.write_text(extra_input, encoding="utf-8")
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
        context_file=context,
        feedback_file=feedback,
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
            readable=(
                prompt,
                context,
                *((feedback,) if feedback is not None else ()),
                *shared_object_dirs(tree),
            ),
            network=adapter.sandbox.network,
        ),
    )


def run_api_adapter(
    adapter: AdapterSpec,
    task: TaskSpec,
    *,
    run_id: str,
    attempt: int,
    extra_input: str | None,
    tree: Path,
    timeout: float,
    log: LineSink,
    note: Callable[..., None],
    stop: threading.Event | None = None,
    env: Mapping[str, str] = os.environ,
    clock: Callable[[], float] = time.monotonic,
) -> ApiOutcome:
    """Send the task to the adapter's endpoint and apply its diff to ``tree``.

    Shared by the embedded backend (the call is made by the executor) and the runner in
    adapter pods (made from the pod, through the Adapter's egress policy). ``env`` holds the
    API key variable (``api.api_key_env``); nothing else of it is used.
    """
    assert adapter.kind is AdapterKind.API and adapter.api is not None
    return ApiCaller(adapter.api, log=log, note=note, env=env, stop=stop, clock=clock).run(
        task,
        tree,
        prompt=prompt_bytes(task.prompt, extra_input).decode("utf-8"),
        run_id=run_id,
        attempt=attempt,
        feedback=extra_input,
        timeout=timeout,
        fuzzy=task.gate_policy.fuzzy_apply,
    )


MANUAL_DIR = "manual"


def manual_paths(workdir: Path, run_id: str, task_id: str) -> tuple[Path, Path]:
    """(instructions file for the human, where a submitted patch is stored)."""
    base = workdir / MANUAL_DIR / run_id / task_id
    return base / "INSTRUCTIONS.md", base / "submitted.diff"


def manual_instructions(task: TaskSpec, run_id: str, repo_url: str) -> str:
    return (
        task_context(task)
        + "\n"
        + task.prompt
        + ("" if task.prompt.endswith("\n") else "\n")
        + f"""
## How to hand in the change

1. Check out `{repo_url}` at commit `{task.base_commit}`.
2. Make the change and save it as a patch: `git diff --binary {task.base_commit} > change.diff`
   (stage new files first with `git add -A`).
3. Submit it: `orchestrator manual submit --run {run_id} {task.task_id} change.diff`
4. Run `orchestrator execute --run {run_id}` again: the patch is applied and tested.
"""
    )

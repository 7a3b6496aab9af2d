"""core.engine.adapters: built-in CLI templates, prompt never in argv, a scrubbed environment.

The AI CLIs cannot run here (no network), so the end-to-end tests put fake executables named
``aider``/``claude``/``codex``/``opencode`` first on PATH; they record argv, stdin and
environment, edit files like the real tool would, and run through the real local backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from core.engine.adapters import (
    TEMPLATES,
    adapter_environment,
    manual_instructions,
    manual_paths,
    process_invocation,
    task_context,
)
from core.engine.backend import AttemptRequest
from core.engine.command_line import base_path
from core.engine.evidence import read_all
from core.engine.process_spawner import LocalBackend, task_log_path
from core.engine.task_log import read_records
from core.identity import TaskKey
from core.models import AdapterSpec, CommandTemplate, DiffSummary, GateCheck, TaskSpec

COMMIT = "c" * 40
SECRET_VALUE = "sk-live-do-not-leak-0123456789"
# Task text full of shell syntax: if it ever reached argv or a shell, it would show.
NASTY_PROMPT = "Fix the bug; $(touch /tmp/pwned) `id` && echo \"quoted\" 'single' | cat > x"
TITLE = "Make it better"

BASE_ENV_NAMES = {
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "GIT_TERMINAL_PROMPT",
    "GIT_CONFIG_NOSYSTEM",
    "ORCHESTRATOR_TASK_ID",
    "ORCHESTRATOR_ATTEMPT",
    "ORCHESTRATOR_PROMPT_FILE",
    "ORCHESTRATOR_WORKSPACE",
}

TOOL_BINARY = {
    CommandTemplate.AIDER: "aider",
    CommandTemplate.CLAUDE_CODE: "claude",
    CommandTemplate.CODEX: "codex",
    CommandTemplate.OPENCODE: "opencode",
}
VIA_STDIN = {
    CommandTemplate.AIDER: False,
    CommandTemplate.CLAUDE_CODE: True,
    CommandTemplate.CODEX: True,
    CommandTemplate.OPENCODE: True,
}


def make_task(**over: Any) -> TaskSpec:
    data: dict[str, Any] = {
        "task_id": "t1",
        "title": TITLE,
        "prompt": NASTY_PROMPT,
        "repo": "repo",
        "base_commit": COMMIT,
        "target_paths": ["src/a.py", "docs/read me.md"],
    }
    data.update(over)
    return TaskSpec.model_validate(data)


def invoke(adapter: AdapterSpec, task: TaskSpec, tmp_path: Path, **kw: Any) -> Any:
    kw.setdefault("parent_env", os.environ)
    return process_invocation(
        adapter,
        task,
        attempt=3,
        workspace=tmp_path / "tree",
        prompt_file=tmp_path / "prompt.md",
        home=tmp_path / "home",
        workdir=tmp_path / "work",
        python="/opt/py/bin/python",
        **kw,
    )


def assert_no_prompt_in_argv(argv: list[str], task: TaskSpec) -> None:
    joined = "\0".join(argv)
    for fragment in (task.prompt, "Fix the bug", "$(touch", "`id`", TITLE):
        assert fragment not in joined, f"task text {fragment!r} leaked into argv {argv}"
    for arg in argv:
        assert task.prompt not in arg


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FAKE_API_SECRET", SECRET_VALUE)
    monkeypatch.setenv("TOOL_API_KEY", "tool-key-123")
    return SECRET_VALUE


# --------------------------------------------------------------------------- invocations


def test_aider_template(tmp_path: Path, secret: str) -> None:
    inv = invoke(AdapterSpec(id="ai", kind="process", template="aider"), make_task(), tmp_path)
    assert inv.argv == [
        "aider",
        "--yes-always",
        "--no-auto-commits",
        "--no-check-update",
        "--no-pretty",
        "--no-stream",
        "--message-file",
        str(tmp_path / "prompt.md"),
        "--",
        "src/a.py",
        "docs/read me.md",
    ]
    assert inv.stdin_file is None
    assert_no_prompt_in_argv(inv.argv, make_task())


def test_aider_without_target_paths(tmp_path: Path) -> None:
    inv = invoke(
        AdapterSpec(id="ai", kind="process", template="aider"), make_task(target_paths=[]), tmp_path
    )
    assert inv.argv[-3:] == ["--message-file", str(tmp_path / "prompt.md"), "--"]


@pytest.mark.parametrize(
    ("template", "argv"),
    [
        (
            "claude-code",
            ["claude", "--print", "--permission-mode", "acceptEdits", "--output-format", "text"],
        ),
        ("codex", ["codex", "exec", "--full-auto", "--skip-git-repo-check", "-"]),
        ("opencode", ["opencode", "run", "Carry out the task described on standard input."]),
    ],
)
def test_stdin_templates(tmp_path: Path, template: str, argv: list[str], secret: str) -> None:
    task = make_task()
    inv = invoke(AdapterSpec(id="ai", kind="process", template=template), task, tmp_path)
    assert inv.argv == argv
    assert inv.stdin_file == tmp_path / "prompt.md"
    assert_no_prompt_in_argv(inv.argv, task)


@pytest.mark.parametrize("template", list(CommandTemplate))
def test_every_template_keeps_task_text_out_of_argv(tmp_path: Path, template: str) -> None:
    task = make_task()
    inv = invoke(AdapterSpec(id="ai", kind="process", template=template), task, tmp_path)
    assert_no_prompt_in_argv(inv.argv, task)
    assert inv.argv[0] == TOOL_BINARY[CommandTemplate(template)]
    # The prompt reaches the tool: as a file named in argv, or on stdin.
    prompt_file = str(tmp_path / "prompt.md")
    assert (prompt_file in inv.argv) or inv.stdin_file == tmp_path / "prompt.md"
    assert (inv.stdin_file is not None) == VIA_STDIN[CommandTemplate(template)]


def test_templates_are_documented() -> None:
    assert set(TEMPLATES) == set(CommandTemplate)
    for template in TEMPLATES.values():
        assert template.doc and template.stdin in ("none", "prompt")


def test_adapter_stdin_prompt_overrides_template(tmp_path: Path) -> None:
    adapter = AdapterSpec(id="ai", kind="process", template="aider", stdin="prompt")
    assert invoke(adapter, make_task(), tmp_path).stdin_file == tmp_path / "prompt.md"


def test_custom_command_placeholders(tmp_path: Path) -> None:
    adapter = AdapterSpec(
        id="custom",
        kind="process",
        command=[
            "{python}",
            "tool.py",
            "--task={task_id}",
            "--attempt",
            "{attempt}",
            "--ws={workspace}",
            "--wd={workdir}",
            "--prompt={prompt_file}",
            "{target_paths}",
            "--end",
        ],
    )
    inv = invoke(adapter, make_task(), tmp_path)
    assert inv.argv == [
        "/opt/py/bin/python",
        "tool.py",
        "--task=t1",
        "--attempt",
        "3",
        f"--ws={tmp_path / 'tree'}",
        f"--wd={tmp_path / 'work'}",
        f"--prompt={tmp_path / 'prompt.md'}",
        "src/a.py",
        "docs/read me.md",
        "--end",
    ]
    assert inv.stdin_file is None
    custom_stdin = AdapterSpec(id="c", kind="process", command=["cat"], stdin="prompt")
    assert invoke(custom_stdin, make_task(), tmp_path).stdin_file == tmp_path / "prompt.md"


def test_environment_is_built_from_scratch(tmp_path: Path, secret: str) -> None:
    adapter = AdapterSpec(id="ai", kind="process", template="codex", env={"TOOL_MODE": "ci"})
    inv = invoke(adapter, make_task(), tmp_path)
    env = inv.env
    assert set(env) == BASE_ENV_NAMES | {"TOOL_MODE"}
    assert "FAKE_API_SECRET" not in env
    assert SECRET_VALUE not in json.dumps(env)
    assert "TOOL_API_KEY" not in env
    assert env["HOME"] == str(tmp_path / "home")
    assert env["PATH"] == base_path()
    assert env["ORCHESTRATOR_TASK_ID"] == "t1"
    assert env["ORCHESTRATOR_ATTEMPT"] == "3"
    assert env["ORCHESTRATOR_PROMPT_FILE"] == str(tmp_path / "prompt.md")
    assert env["ORCHESTRATOR_WORKSPACE"] == str(tmp_path / "tree")
    assert env["TOOL_MODE"] == "ci"
    assert env["LANG"] == "C.UTF-8" and env["TZ"] == "UTC"
    assert NASTY_PROMPT not in json.dumps(env)


def test_pass_env_lets_named_variables_through(tmp_path: Path, secret: str) -> None:
    adapter = AdapterSpec(
        id="ai",
        kind="process",
        template="claude-code",
        pass_env=["TOOL_API_KEY", "NOT_SET_ANYWHERE_XYZ"],
    )
    env = invoke(adapter, make_task(), tmp_path).env
    assert env["TOOL_API_KEY"] == "tool-key-123"
    assert "NOT_SET_ANYWHERE_XYZ" not in env
    assert "FAKE_API_SECRET" not in env
    assert set(env) == BASE_ENV_NAMES | {"TOOL_API_KEY"}


def test_explicit_parent_env_and_adapter_env_precedence(tmp_path: Path) -> None:
    adapter = AdapterSpec(
        id="ai",
        kind="process",
        command=["x"],
        pass_env=["KEY"],
        env={"KEY": "from-adapter", "PATH": "/custom/bin"},
    )
    env = adapter_environment(
        adapter,
        home=tmp_path,
        task_id="t",
        attempt=1,
        prompt_file=tmp_path / "p",
        workspace=tmp_path / "w",
        parent_env={"KEY": "from-parent", "OTHER": "x"},
    )
    assert env["KEY"] == "from-adapter"
    assert env["PATH"] == "/custom/bin"
    assert "OTHER" not in env


def test_task_context_contents() -> None:
    """What we add to a task goes to the context file; the prompt is not in it."""
    text = task_context(make_task(), extra="gate failed: test_x")
    assert text.startswith(f"# Task t1: {TITLE}\n\n")
    assert NASTY_PROMPT not in text
    assert "- src/a.py\n- docs/read me.md" in text
    assert "## Feedback from the previous attempt\n\ngate failed: test_x\n" in text
    assert task_context(make_task(title="", target_paths=[])) == "# Task t1\n"


def test_manual_instructions(tmp_path: Path) -> None:
    instructions, submitted = manual_paths(tmp_path, "run1", "t1")
    assert instructions == tmp_path / "manual" / "run1" / "t1" / "INSTRUCTIONS.md"
    assert submitted.parent == instructions.parent
    text = manual_instructions(make_task(), "run1", "/src/repo")
    assert NASTY_PROMPT in text
    assert COMMIT in text and "/src/repo" in text
    assert "orchestrator manual submit --run run1 t1" in text


# --------------------------------------------------------------------------- end to end

FAKE_TOOL = r'''#!{python}
"""A stand-in for an AI coding CLI: records how it was called and edits the tree."""
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
stdin = sys.stdin.read()
prompt = stdin
if "--message-file" in argv:
    prompt = Path(argv[argv.index("--message-file") + 1]).read_text()
    targets = argv[argv.index("--message-file") + 2:]
    if targets[:1] == ["--"]:  # argparse: the end of the options
        targets = targets[1:]
else:
    targets = ["a.txt"]
tool = Path(sys.argv[0]).name
for target in targets:
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(f"touched by {{tool}}\n")
Path(f"made by {{tool}}.bin").write_bytes(b"\x00\x01" + tool.encode())
record = {{
    "argv": sys.argv,
    "stdin": stdin,
    "prompt": prompt,
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "prompt_file_env": Path(os.environ["ORCHESTRATOR_PROMPT_FILE"]).read_text(),
}}
Path(os.environ["FAKE_RECORD"]).write_text(json.dumps(record))
print(f"fake {{tool}} done")
print("a warning", file=sys.stderr)
'''


class Hooks:
    """AttemptHooks that remember what the backend reported."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, Path | None]] = []
        self.validated: list[DiffSummary] = []

    def started(self, pgid: int | None, workspace: Path | None) -> None:
        self.calls.append((pgid, workspace))

    def validating(self, diff: DiffSummary) -> None:
        self.validated.append(diff)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bindir = tmp_path / "fake-bin"
    bindir.mkdir()
    for name in TOOL_BINARY.values():
        tool = bindir / name
        tool.write_text(FAKE_TOOL.format(python=sys.executable))
        tool.chmod(0o755)
    return bindir


@pytest.mark.parametrize("template", list(CommandTemplate))
def test_template_end_to_end_with_fake_tool(
    template: CommandTemplate,
    fake_bin: Path,
    tmp_path: Path,
    git_repo: Any,
    secret: str,
    make_sandbox: Any,
) -> None:
    repo = git_repo({"a.txt": "base\n", "src/a.py": "x = 1\n", "docs/read me.md": "doc\n"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    # in the sandbox the tool may write only its tree and its HOME: it records itself there
    record_path = workdir / ".work" / "run1" / "t1" / "1" / "home" / "record.json"
    tool = TOOL_BINARY[template]
    adapter = AdapterSpec(
        id="ai",
        kind="process",
        template=template,
        pass_env=["TOOL_API_KEY"],
        env={"PATH": f"{fake_bin}{os.pathsep}{base_path()}", "FAKE_RECORD": str(record_path)},
    )
    task = TaskSpec(
        task_id="t1",
        title=TITLE,
        prompt=NASTY_PROMPT,
        repo=str(repo.path),
        base_commit=repo.base,
        target_paths=["src/a.py", "docs/read me.md"],
    )
    check = GateCheck(
        name="edited",
        command=["/bin/sh", "-c", f"grep -rq --exclude-dir=.git 'touched by {tool}' ."],
    )
    request = AttemptRequest(
        key=TaskKey("run1", "t1"),
        task=task,
        adapter=adapter,
        attempt=1,
        repo_url=str(repo.path),
        timeout_seconds=30,
        gate_checks=(check,),
        gate_baseline=False,
        max_log_bytes=1_000_000,
        max_diff_bytes=1_000_000,
    )
    hooks = Hooks()
    backend = LocalBackend(
        workdir, sandbox=make_sandbox(workdir), grace_seconds=1, keep_worktrees=True
    )
    run = backend.run_adapter(request, hooks)
    outcome = run.outcome
    gate = backend.run_gate(request, run)
    log = backend.release(run)
    assert log.bytes > 0 and not log.truncated

    assert outcome.start_error is None, outcome
    assert outcome.exit_code == 0 and not outcome.timed_out
    rec = json.loads(record_path.read_text())

    # argv: the template, never the task text.
    assert rec["argv"][0].endswith(f"fake-bin/{tool}")
    assert_no_prompt_in_argv(rec["argv"][1:], task)
    expected_prompt = task.prompt  # byte for byte: no header, nothing stripped
    assert rec["prompt"] == expected_prompt
    assert Path(rec["env"]["ORCHESTRATOR_CONTEXT_FILE"]).name == "context.md"
    assert "ORCHESTRATOR_FEEDBACK_FILE" not in rec["env"]  # first attempt: no feedback
    assert rec["prompt_file_env"] == expected_prompt
    if VIA_STDIN[template]:
        assert rec["stdin"] == expected_prompt
    else:
        assert rec["stdin"] == ""
        prompt_arg = rec["argv"][rec["argv"].index("--message-file") + 1]
        assert prompt_arg == rec["env"]["ORCHESTRATOR_PROMPT_FILE"]
        # The prompt file lives outside the worktree (so it is not part of the diff).
        assert not prompt_arg.startswith(rec["cwd"] + os.sep)

    # Environment: scrubbed, except pass_env and the adapter's own.
    env = rec["env"]
    assert "FAKE_API_SECRET" not in env
    assert SECRET_VALUE not in json.dumps(env)
    assert env["TOOL_API_KEY"] == "tool-key-123"
    assert env["HOME"] != os.environ.get("HOME")
    assert env["ORCHESTRATOR_TASK_ID"] == "t1"
    assert set(env) <= BASE_ENV_NAMES | {
        "TOOL_API_KEY",
        "FAKE_RECORD",
        "PWD",
        "_",
        "SHLVL",
        "ORCHESTRATOR_CONTEXT_FILE",
    }

    # The diff: what the fake tool did, against the base commit.
    assert outcome.diff is not None
    summary = outcome.diff.summary
    changed = {f.path: f for f in summary.files}
    touched = ["src/a.py", "docs/read me.md"] if template is CommandTemplate.AIDER else ["a.txt"]
    assert set(changed) == {*touched, f"made by {tool}.bin"}
    assert changed[f"made by {tool}.bin"].binary
    for path in touched:
        assert changed[path].status == "modified" and changed[path].insertions == 1
    # the spool went with the attempt dir: the full diff is in the evidence store
    assert summary.patch_ref is not None and summary.patch_stored_bytes
    patch = read_all(backend.evidence, summary.patch_ref)
    assert hashlib.sha256(patch).hexdigest() == summary.sha256
    assert f"+touched by {tool}".encode() in patch
    assert b"prompt.md" not in patch
    assert NASTY_PROMPT.encode() not in patch

    # The gate ran on a fresh checkout with the patch applied.
    assert gate.passed and gate.applied, gate
    pgids = [p for p, _ in hooks.calls if p is not None]
    assert len(pgids) == 1 and pgids[0] > 1

    # Output was streamed into the task log.
    recs = list(read_records(task_log_path(workdir, TaskKey("run1", "t1"))))
    lines = [(r["stream"], r["line"]) for r in recs if "line" in r]
    assert ("stdout", f"fake {tool} done") in lines
    assert ("stderr", "a warning") in lines
    argv_note = next(r for r in recs if r.get("event") == "adapter_command")
    assert argv_note["argv"][0] == tool
    assert all(NASTY_PROMPT not in json.dumps(r) for r in recs)


def test_missing_tool_is_a_start_error(
    tmp_path: Path, git_repo: Any, make_sandbox: Any
) -> None:
    repo = git_repo({"a.txt": "a\n"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    adapter = AdapterSpec(
        id="ai", kind="process", template="opencode", env={"PATH": str(tmp_path / "empty-bin")}
    )
    task = TaskSpec(task_id="t1", prompt="p", repo=str(repo.path), base_commit=repo.base)
    request = AttemptRequest(
        key=TaskKey("run1", "t1"),
        task=task,
        adapter=adapter,
        attempt=1,
        repo_url=str(repo.path),
        timeout_seconds=10,
        gate_checks=(),
        gate_baseline=False,
        max_log_bytes=10_000,
        max_diff_bytes=10_000,
    )
    backend = LocalBackend(workdir, sandbox=make_sandbox(workdir))
    run = backend.run_adapter(request, Hooks())
    backend.release(run)
    outcome = run.outcome
    assert outcome.start_error is not None and "opencode" in outcome.start_error
    assert outcome.diff is not None and outcome.diff.summary.empty


# --------------------------------------------------------------------------- argument safety

#: A target path that would be an option if it reached a command line as one: aider would
#: send its API key to that host.
HOSTILE_PATH = "--openai-api-base=https://elsewhere.invalid/v1"


def aider_like_parser() -> Any:
    """aider's own parser shape (configargparse is argparse): options, then files."""
    import argparse

    parser = argparse.ArgumentParser(prog="aider")
    for flag in ("--yes-always", "--no-auto-commits", "--no-check-update"):
        parser.add_argument(flag, action="store_true")
    for flag in ("--no-pretty", "--no-stream"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--message-file")
    parser.add_argument("--openai-api-base")
    parser.add_argument("files", metavar="FILE", nargs="*")
    return parser


@pytest.mark.parametrize("template", list(CommandTemplate))
def test_a_target_path_starting_with_dashes_cannot_become_an_option(
    tmp_path: Path, template: CommandTemplate
) -> None:
    # Built without validation: the entry contract refuses such a path, this checks the
    # templates do not depend on that.
    task = make_task().model_copy(update={"target_paths": [HOSTILE_PATH, "-rf", "ok.py"]})
    assert task.target_paths == [HOSTILE_PATH, "-rf", "ok.py"]
    argv = invoke(AdapterSpec(id="ai", kind="process", template=template), task, tmp_path).argv
    if template is CommandTemplate.AIDER:
        end = argv.index("--")
        assert argv[end + 1 :] == [HOSTILE_PATH, "-rf", "ok.py"]
        assert not any(arg.startswith("--openai") for arg in argv[:end])
        parsed = aider_like_parser().parse_args(argv[1:])
        assert parsed.openai_api_base is None
        assert parsed.files == [HOSTILE_PATH, "-rf", "ok.py"]
        # ... where the same argv without `--` would have taken the option
        unsafe = [arg for arg in argv[1:] if arg != "--"]
        assert aider_like_parser().parse_known_args(unsafe)[0].openai_api_base is not None
    else:
        # Claude Code, Codex and OpenCode take no paths on the command line at all
        assert not any(p in arg for arg in argv for p in (HOSTILE_PATH, "-rf", "ok.py"))

"""A stand-in for an AI coding CLI (aider, Claude Code, Codex, OpenCode).

Run it as `python -m core.testing.fake_ai`.

It behaves like those tools from the executor's point of view: it reads its prompt (from
``--prompt-file``/``--message-file`` or stdin), prints progress as it works, edits files in its
working directory, and exits. What it does is scripted by ``fake-ai:`` lines in the prompt:

    fake-ai: write <path> :: <text>       create/overwrite a file (\\n in text is a newline)
    fake-ai: append <path> :: <text>      append a line
    fake-ai: rename <old> <new>           move a file
    fake-ai: delete <path>                remove a file
    fake-ai: say <text...>                print a line
    fake-ai: sleep <seconds>              sleep, printing a line each second
    fake-ai: wait-file <path> <seconds>   wait until <path> exists (exit 1 after <seconds>)
    fake-ai: spawn-sleeper <seconds>      start a grandchild that sleeps (for group-kill tests)
    fake-ai: flood <lines>                print many lines
    fake-ai: fail-times <n> <statefile>   exit 1 the first n times (counted in statefile; in the
                                          sandbox only the tree and HOME are writable, and both
                                          are new for every attempt: use fail-until-attempt)
    fake-ai: fail-until-attempt <n>       exit 1 while $ORCHESTRATOR_ATTEMPT is below n
    fake-ai: exit <code>                  stop with that exit code
    fake-ai: on-feedback write <path> :: <text>   only on a retry with gate feedback
                                          (``$ORCHESTRATOR_FEEDBACK_FILE``)
    fake-ai: echo-feedback                print the retry's feedback, line by line
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from core.engine.adapters import FEEDBACK_MARKER


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-file", "--message-file", dest="prompt_file")
    parser.add_argument("paths", nargs="*")
    args, _ = parser.parse_known_args()
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    elif os.environ.get("ORCHESTRATOR_PROMPT_FILE") and sys.stdin.isatty():
        prompt = Path(os.environ["ORCHESTRATOR_PROMPT_FILE"]).read_text(encoding="utf-8")
    else:
        prompt = sys.stdin.read()
    print(f"fake-ai: read a prompt of {len(prompt)} characters", flush=True)
    prompt, _, _ = prompt.partition(FEEDBACK_MARKER)  # the ops are the task's, not feedback
    for raw in prompt.splitlines():
        if not raw.startswith("fake-ai:"):
            continue
        words, _, text = raw.removeprefix("fake-ai:").partition(" :: ")
        op, *rest = shlex.split(words)
        if op == "on-feedback":
            feedback = os.environ.get("ORCHESTRATOR_FEEDBACK_FILE")
            if not feedback or not Path(feedback).read_text(encoding="utf-8").strip():
                continue
            op, *rest = rest
        text = text.replace("\\n", "\n")
        if op == "write":
            path = Path(rest[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
            print(f"fake-ai: wrote {path}", flush=True)
        elif op == "append":
            with open(rest[0], "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
            print(f"fake-ai: appended to {rest[0]}", flush=True)
        elif op == "rename":
            Path(rest[1]).parent.mkdir(parents=True, exist_ok=True)
            Path(rest[0]).rename(rest[1])
            print(f"fake-ai: renamed {rest[0]} -> {rest[1]}", flush=True)
        elif op == "delete":
            Path(rest[0]).unlink()
        elif op == "echo-feedback":
            given = os.environ.get("ORCHESTRATOR_FEEDBACK_FILE")
            feedback = Path(given).read_text(encoding="utf-8") if given else ""
            for line in feedback.strip().splitlines():
                print(f"feedback: {line}", flush=True)
        elif op == "say":
            print(" ".join(rest), flush=True)
        elif op == "sleep":
            for i in range(int(float(rest[0]))):
                print(f"fake-ai: thinking ({i + 1}s)", flush=True)
                time.sleep(1)
        elif op == "wait-file":
            print(f"fake-ai: waiting for {rest[0]}", flush=True)
            deadline = time.monotonic() + float(rest[1])
            while not Path(rest[0]).exists():
                if time.monotonic() > deadline:
                    print(f"fake-ai: {rest[0]} never appeared", flush=True)
                    return 1
                time.sleep(0.1)
        elif op == "spawn-sleeper":
            child = subprocess.Popen(["sleep", rest[0]])
            Path("sleeper.pid").write_text(str(child.pid))
            print(f"fake-ai: started helper process {child.pid}", flush=True)
        elif op == "flood":
            for i in range(int(rest[0])):
                print(f"fake-ai: line {i} " + "x" * 100)
            sys.stdout.flush()
        elif op == "fail-times":
            state = Path(rest[1])
            seen = int(state.read_text()) if state.exists() else 0
            state.write_text(str(seen + 1))
            if seen < int(rest[0]):
                print(f"fake-ai: simulated crash {seen + 1} of {rest[0]}", file=sys.stderr)
                return 1
        elif op == "fail-until-attempt":
            attempt = int(os.environ.get("ORCHESTRATOR_ATTEMPT", "1"))
            if attempt < int(rest[0]):
                print(f"fake-ai: simulated crash on attempt {attempt}", file=sys.stderr)
                return 1
        elif op == "exit":
            print(f"fake-ai: giving up with exit code {rest[0]}", file=sys.stderr, flush=True)
            return int(rest[0])
    print("fake-ai: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

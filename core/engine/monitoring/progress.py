"""What a person watching ``orchestrator execute`` sees.

On a terminal: a rich progress bar plus one coloured line per finished task. Elsewhere (CI,
pipes, log collectors): the same lines in plain text, no control sequences.
"""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from core.models import TaskResult, TaskState

STYLE = {
    TaskState.COMPLETED: "green",
    TaskState.FAILED: "red",
    TaskState.TIMEOUT: "yellow",
    TaskState.CANCELLED: "magenta",
    TaskState.PENDING: "cyan",
}


class ProgressReporter(Protocol):
    def start(self, run_id: str, total: int, done: int) -> None: ...
    def task_started(self, task_id: str, attempt: int, adapter_id: str) -> None: ...
    def task_done(self, result: TaskResult) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


def outcome_line(result: TaskResult) -> str:
    last = result.last
    bits = [f"{result.task_id:<24} {result.state.value:<10}"]
    if result.failure_class:
        bits.append(f"[{result.failure_class.value}]")
    if last is not None:
        bits.append(f"adapter={last.adapter_id} attempts={len(result.attempts)}")
        if last.diff is not None and not last.diff.empty:
            d = last.diff
            binary = f" ({d.binary_files} binary)" if d.binary_files else ""
            bits.append(f"files={d.files_changed} +{d.insertions}/-{d.deletions}{binary}")
        if last.gate is not None and last.gate.failed_checks:
            bits.append("failed checks: " + ", ".join(last.gate.failed_checks))
        if last.gate is not None:
            flaky = sum(c.flaky.count for c in last.gate.checks)
            bits += [f"flaky tests: {flaky}"] if flaky else []
            bits += ["tamper flagged"] if last.gate.tamper.flagged else []
    if result.wait_reason:
        bits.append(f"waiting: {result.wait_reason}")
    elif result.failure_message:
        bits.append(f"- {result.failure_message.splitlines()[0][:120]}")
    return " ".join(bits)


class ConsoleProgress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(soft_wrap=True)
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def start(self, run_id: str, total: int, done: int) -> None:
        self.console.print(f"run {run_id}: {total} tasks, {done} already finished", markup=False)
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(run_id, total=total, completed=done)

    def task_started(self, task_id: str, attempt: int, adapter_id: str) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=f"{task_id} (attempt {attempt}, {adapter_id})")
        else:
            self.console.print(
                f"{task_id:<24} started attempt {attempt} on {adapter_id}", markup=False
            )

    def task_done(self, result: TaskResult) -> None:
        line = outcome_line(result)
        if self.console.is_terminal:
            style = STYLE.get(result.state, "white")
            self.console.print(line, style=style, markup=False, highlight=False)
        else:
            self.console.print(line, markup=False, highlight=False)
        if self._bar is not None and self._task is not None and result.state.terminal:
            self._bar.advance(self._task)

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class SilentProgress:
    def start(self, run_id: str, total: int, done: int) -> None:
        pass

    def task_started(self, task_id: str, attempt: int, adapter_id: str) -> None:
        pass

    def task_done(self, result: TaskResult) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def stop(self) -> None:
        pass

"""What the integration worker writes for people and adapters: commit messages, reasons, and
the feedback a sent-back task's next attempt gets in its prompt.

Apart from the worker so the wording can be read (and changed) in one place; everything here
is a pure function of the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.engine.integration_repo import MergeConflict
from core.engine.resilience.retry import gate_feedback
from core.integration_models import MAX_FEEDBACK_CHARS
from core.models import GateResult, LedgerEntry, TaskSpec

SUBJECT_CHARS = 72


def subject(spec: TaskSpec) -> str:
    """``<task>: <title>`` (the title, else the prompt's first line), one line."""
    title = spec.title.strip() or spec.prompt.strip().splitlines()[0]
    line = f"{spec.task_id}: {title}"
    return line if len(line) <= SUBJECT_CHARS else line[: SUBJECT_CHARS - 3] + "..."


def commit_message(spec: TaskSpec, entry: LedgerEntry, run_id: str) -> str:
    """One commit per task: a subject ``git log --oneline`` reads well, then trailers naming
    the task, its adapter and attempt, and the sha256 of the diff recorded in the ledger."""
    lines = [
        subject(spec),
        "",
        f"Task: {spec.task_id}",
        f"Run: {run_id}",
        f"Adapter: {entry.adapter_id}",
        f"Attempt: {entry.attempt}",
        f"Diff-SHA256: {entry.diff_sha256}",
        f"Base-Commit: {entry.base_commit}",
        f"Ledger-Seq: {entry.seq}",
    ]
    return "\n".join(lines) + "\n"


def change_message(spec: TaskSpec, entry: LedgerEntry) -> str:
    """The message of the change's commit on its own base (not on the branch)."""
    return f"change of {spec.task_id}, attempt {entry.attempt}\n"


def conflict_reason(conflict: MergeConflict) -> str:
    files = ", ".join(conflict.files[:10]) or "(no file named)"
    more = f" and {len(conflict.files) - 10} more" if len(conflict.files) > 10 else ""
    return f"conflicts with the changes merged before it in {files}{more}"


def gate_reason(gate: GateResult) -> str:
    blamed = "; ".join(gate.blamed) or "the diff did not apply"
    return f"fails the gate on the merged tree: {blamed}"


def _bounded(text: str) -> str:
    if len(text) <= MAX_FEEDBACK_CHARS:
        return text
    return text[: MAX_FEEDBACK_CHARS - 4] + "\n..."


def conflict_feedback(
    *,
    attempt: int,
    branch: str,
    head: str,
    conflict: MergeConflict,
    touching: Sequence[str],
) -> str:
    parts = [
        f"Your change (attempt {attempt}) passed its own test gate but does not apply onto "
        f"the integration branch {branch}: it conflicts with changes merged before it.",
        "",
        "Conflicting files:",
        *(f"- {f}" for f in conflict.files),
    ]
    if touching:
        parts += ["", "Changes on the branch that touch them:", *(f"- {t}" for t in touching)]
    if conflict.excerpt:
        parts += ["", "Conflicting regions:", conflict.excerpt]
    ending = (
        f"\n\nThis attempt starts from the branch's head {head[:12]}, which holds those "
        "changes: make your change on top of them and keep what they do."
    )
    return _bounded("\n".join(parts))[: MAX_FEEDBACK_CHARS - len(ending)] + ending


def gate_failure_feedback(
    *, attempt: int, branch: str, head: str, gate: GateResult, merged: Sequence[str]
) -> str:
    ahead = f" ({', '.join(merged[:5])}{' ...' if len(merged) > 5 else ''})" if merged else ""
    intro = (
        f"Your change (attempt {attempt}) passed its own test gate, but on the integration "
        f"branch {branch}, together with the changes merged before it{ahead}, the gate fails."
    )
    ending = (
        f"\n\nThis attempt starts from the branch's head {head[:12]}: make your change work "
        "together with what is there."
    )
    body = gate_feedback(gate, max_chars=MAX_FEEDBACK_CHARS - len(intro) - len(ending) - 2)
    return _bounded(f"{intro}\n\n{body}{ending}")

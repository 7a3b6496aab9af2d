"""Entry contracts: the phase-4 inputs a run needs, checked before any work starts.

Every problem stops the run with one :class:`EntryContractError` that names the file, the
field and the fix; nothing is executed or recorded before all inputs are known to be good:
a prompt over the size limit, a repository URL with credentials in it, a base commit that is
not in its repository (:func:`check_base_commits`) are refused here, not retried later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.engine.state_files import (
    ROUTING_COMPLETE,
    ROUTING_DECISIONS,
    STATE_DIR,
    TASK_QUEUE,
    read_model,
)
from core.engine.workspace import ensure_mirror
from core.errors import EntryContractError, InfrastructureError, MissingCommitError
from core.models import (
    AdapterKind,
    AdapterSpec,
    RoutingCompleteFlag,
    RoutingDecision,
    RoutingDecisions,
    TaskQueue,
    TaskSpec,
)


@dataclass(frozen=True)
class RoutedTask:
    seq: int
    spec: TaskSpec
    decision: RoutingDecision

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def adapter_chain(self) -> list[str]:
        return [self.decision.adapter_id, *self.decision.fallback_adapter_ids]


@dataclass(frozen=True)
class RunInputs:
    run_id: str
    workdir: Path
    tasks: list[RoutedTask]
    adapters: dict[str, AdapterSpec]

    def repo_url(self, spec: TaskSpec) -> str:
        return resolve_repo(self.workdir, spec.repo)

    def task(self, task_id: str) -> RoutedTask:
        for task in self.tasks:
            if task.task_id == task_id:
                return task
        raise KeyError(task_id)


def resolve_repo(workdir: Path, repo: str) -> str:
    if "://" in repo or repo.startswith("git@"):
        return repo
    path = Path(repo)
    return str(path if path.is_absolute() else (workdir / path).resolve())


DEFAULT_MAX_PROMPT_BYTES = 1024 * 1024


def load_inputs(
    workdir: Path,
    run_id: str,
    *,
    env: Mapping[str, str] = os.environ,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
) -> RunInputs:
    """The run's inputs, checked; ``env``: where ``api`` adapters' key variables must be set."""
    if not workdir.is_dir():
        raise EntryContractError(
            str(workdir), "work dir does not exist", "pass --workdir <phase-4 work dir>"
        )
    state = workdir / STATE_DIR
    flag = read_model(state / ROUTING_COMPLETE, RoutingCompleteFlag)
    queue = read_model(state / TASK_QUEUE, TaskQueue)
    routing = read_model(state / ROUTING_DECISIONS, RoutingDecisions)
    for name, found in (
        (ROUTING_COMPLETE, flag.run_id),
        (TASK_QUEUE, queue.run_id),
        (ROUTING_DECISIONS, routing.run_id),
    ):
        if found != run_id:
            raise EntryContractError(
                f"{state / name}: field `run_id`",
                f"is {found!r}, but this execution is for run {run_id!r}",
                f"pass --run {found} or point --workdir at run {run_id}'s work dir",
            )

    adapters = {a.id: a for a in routing.adapters}
    decisions = {d.task_id: d for d in routing.decisions}
    where = state / ROUTING_DECISIONS
    for i, decision in enumerate(routing.decisions):
        for field, adapter_id in [
            ("adapter_id", decision.adapter_id),
            *(
                (f"fallback_adapter_ids.{j}", a)
                for j, a in enumerate(decision.fallback_adapter_ids)
            ),
        ]:
            if adapter_id not in adapters:
                raise EntryContractError(
                    f"{where}: field `decisions.{i}.{field}`",
                    f"task {decision.task_id!r} names unknown adapter {adapter_id!r} "
                    f"(known: {', '.join(sorted(adapters))})",
                    "add the adapter to `adapters` or route the task to a known one",
                )

    used = {a for d in routing.decisions for a in [d.adapter_id, *d.fallback_adapter_ids]}
    for i, adapter in enumerate(routing.adapters):
        key_env = adapter.api.api_key_env if adapter.api is not None else None
        if adapter.id in used and key_env and not env.get(key_env):
            raise EntryContractError(
                f"{where}: field `adapters.{i}.api.api_key_env`",
                f"adapter {adapter.id!r} reads its API key from ${key_env}, which is not set",
                f"export {key_env} in the executor's environment (its value is never logged)",
            )

    tasks = []
    for i, spec in enumerate(queue.tasks):
        found_decision = decisions.get(spec.task_id)
        if found_decision is None:
            raise EntryContractError(
                f"{where}: field `decisions`",
                f"no routing decision for queued task {spec.task_id!r}",
                "route every task of task_queue.json in phase 4",
            )
        decision = found_decision
        qwhere = f"{state / TASK_QUEUE}: field `tasks.{i}"
        kinds = {adapters[a].kind for a in [decision.adapter_id, *decision.fallback_adapter_ids]}
        if AdapterKind.PATCH in kinds and spec.patch is None:
            raise EntryContractError(
                f"{qwhere}.patch`",
                f"task {spec.task_id!r} is routed to a `patch` adapter but carries no patch",
                "add the unified diff to `patch` or route the task to another adapter",
            )
        size = len(spec.prompt.encode("utf-8"))
        if size > max_prompt_bytes:
            raise EntryContractError(
                f"{qwhere}.prompt`",
                f"task {spec.task_id!r} has a prompt of {size} bytes, over the limit of "
                f"{max_prompt_bytes} bytes",
                "shorten the prompt (put long material in the repository and name it), or "
                "raise the limit with --max-prompt-bytes",
            )
        repo = resolve_repo(workdir, spec.repo)
        if "://" not in repo and not Path(repo).exists():
            raise EntryContractError(
                f"{qwhere}.repo`",
                f"repository {spec.repo!r} not found (looked at {repo})",
                "use a path relative to the work dir, an absolute path, or a URL",
            )
        tasks.append(RoutedTask(seq=i, spec=spec, decision=decision))
    return RunInputs(run_id=run_id, workdir=workdir, tasks=tasks, adapters=adapters)


def check_base_commits(inputs: RunInputs, mirrors: Path) -> None:
    """Refuse a task whose ``base_commit`` is not in its repository, before any work.

    Fetches each repository once into ``mirrors`` (the cache the attempts use). A repository
    that cannot be reached is not refused here: that is a platform failure its attempts
    record and retry.
    """
    queue = inputs.workdir / STATE_DIR / TASK_QUEUE
    checked: set[tuple[str, str]] = set()  # tasks mostly share a base: one lookup each
    for task in inputs.tasks:
        source = (inputs.repo_url(task.spec), task.spec.base_commit)
        if source in checked:
            continue
        checked.add(source)
        try:
            ensure_mirror(mirrors, *source)
        except MissingCommitError as exc:
            raise EntryContractError(
                f"{queue}: field `tasks.{task.seq}.base_commit`",
                f"task {task.task_id!r}: {exc}",
                "pin a commit that exists in the repository (`git rev-parse <branch>` there)",
            ) from exc
        except InfrastructureError:
            continue

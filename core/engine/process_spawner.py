"""The embedded backend: each attempt is a local process group in a throwaway git worktree.

Layout under the work dir (all disposable, rebuilt as needed)::

    .work/mirrors/<repo>-<hash>.git            bare mirror, fetched once per repository
    .work/<run>/<task>/<attempt>/tree           the adapter's checkout at the base commit
    .work/<run>/<task>/<attempt>/tree.git       the executor's private repository for it
    .work/<run>/<task>/<attempt>/prompt.md      the prompt, outside the tree (not in the diff)
    .work/<run>/<task>/<attempt>/diff.patch     the captured diff, spooled (then in the store)
    .work/<run>/<task>/<attempt>/home           $HOME of the adapter (not the user's)
    .work/<run>/<task>/<attempt>/gate-<n>       fresh checkouts for the test gate (+ .git)
    .work/trash/<id>                            released attempt dirs and gate checkouts,
                                                deleted in the background (core.engine.janitor)

Every adapter process and gate check runs in the backend's sandbox
(:mod:`core.engine.sandbox`): there it can write only its tree and its HOME (or the check's
scratch dir) and sees nothing of ``.state``, ``.ledger``, ``logs``, the database or
``.work`` besides its own tree. The diff is captured even after a timeout, so partial work
is recorded as evidence, and put in the evidence store (content-addressed, compressed)
before the attempt is recorded: the records carry its key, never the bytes. A diff over the
hard limit is not kept at all. An ``api`` adapter's call is made from this process
(``core.engine.api_adapter``); its reply's diff is applied to the worktree and captured like
any other change.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from core.engine.adapters import manual_paths, run_api_adapter, run_process_adapter
from core.engine.api_adapter import ApiOutcome
from core.engine.backend import (
    AdapterRun,
    AttemptHooks,
    AttemptOutcome,
    AttemptRequest,
    LogCounts,
)
from core.engine.evidence import EvidenceStore, local_store
from core.engine.janitor import Janitor
from core.engine.process_group import ProcessResult
from core.engine.sandbox import Sandbox
from core.engine.task_log import TaskLog
from core.engine.test_gate import run_gate
from core.engine.workspace import (
    CapturedDiff,
    add_worktree,
    apply_patch,
    capture_diff,
    checkout_index,
    ensure_mirror,
    mirror_path,
    private_git_dir,
)
from core.errors import InfrastructureError, MissingCommitError
from core.identity import TaskKey
from core.models import AdapterKind, AdapterSpec, GateResult, IsolationLevel

WORK_DIR = ".work"


def task_log_path(workdir: Path, key: TaskKey) -> Path:
    return workdir / "logs" / "execution" / f"{key.log_name}.jsonl"


@dataclass
class _Handle:
    mirror: Path | None
    tree: Path | None
    adir: Path
    log: TaskLog
    base_commit: str
    #: the private index as the checkout left it (:func:`checkout_index`)
    checkout_index: str | None = None


class LocalBackend:
    name = "local"

    def __init__(
        self,
        workdir: Path,
        *,
        sandbox: Sandbox,
        python: str = sys.executable,
        keep_worktrees: bool = False,
        grace_seconds: float = 5.0,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] = os.environ,
        evidence: EvidenceStore | None = None,
    ) -> None:
        """``env``: where ``api`` adapters find their API key variable."""
        #: resolved, so the paths an adapter is given are the paths bound into its sandbox
        self.workdir = workdir.resolve()
        self.env = env
        self.evidence = evidence or local_store(self.workdir)
        self.sandbox = sandbox
        self.python = python
        self.keep_worktrees = keep_worktrees
        self.grace_seconds = grace_seconds
        self.stop = stop
        self.clock = clock
        self._mirrors = self.workdir / WORK_DIR / "mirrors"
        #: finished attempts' directories are deleted off the attempt's path
        self.janitor = Janitor(self.workdir / WORK_DIR / "trash")
        #: (repository, commit) pairs found in their mirror by this process.
        self._verified: set[tuple[str, str]] = set()

    def attempt_dir(self, key: TaskKey, attempt: int) -> Path:
        return self.workdir / WORK_DIR / key.run_id / key.log_name / str(attempt)

    def run_adapter(self, request: AttemptRequest, hooks: AttemptHooks) -> AdapterRun:
        task, adapter = request.task, request.adapter
        adir = self.attempt_dir(request.key, request.attempt)
        log = TaskLog(
            task_log_path(self.workdir, request.key),
            task_id=task.task_id,
            attempt=request.attempt,
            max_bytes=request.max_log_bytes,
            redactor=request.redactor,
            section_bytes=request.max_gate_log_bytes,
        )
        handle = _Handle(None, None, adir, log, task.base_commit)
        isolation = self.isolation(adapter)
        started = self.clock()
        try:
            handle.mirror, handle.tree = self._checkout(request.repo_url, task.base_commit, adir)
        except (InfrastructureError, MissingCommitError) as exc:
            log.note("attempt_not_started", error=str(exc))
            outcome = AttemptOutcome(
                start_error=str(exc),
                infrastructure_reason=str(exc),
                duration_seconds=self.clock() - started,
                log_path=log.path,
                isolation=isolation,
            )
            return AdapterRun(outcome, handle)
        tree = handle.tree
        handle.checkout_index = checkout_index(tree)
        if adapter.kind is not AdapterKind.PROCESS:
            # a process adapter's start writes its process group and checkout in one go
            # (recovery finds the checkout from the attempt number in any case)
            hooks.started(None, tree)
        log.note(
            "attempt_started",
            adapter=adapter.id,
            kind=adapter.kind.value,
            isolation=isolation.value,
        )
        api: ApiOutcome | None = None
        if adapter.kind is AdapterKind.API:
            api = run_api_adapter(
                adapter,
                task,
                run_id=request.key.run_id,
                attempt=request.attempt,
                extra_input=request.extra_input,
                tree=tree,
                timeout=request.timeout_seconds,
                log=log,
                note=log.note,
                stop=self.stop,
                env=self.env,
                clock=self.clock,
            )
            proc = ProcessResult(
                api.exit_code, None, api.timed_out, api.cancelled, None, api.duration_seconds, ""
            )
        else:
            proc = self._run_adapter(request, tree, adir, log, hooks)
        log.end_section()
        diff = self._keep(request, tree, adir, log, handle.checkout_index)
        outcome = AttemptOutcome(
            exit_code=proc.exit_code,
            signal=proc.signal,
            timed_out=proc.timed_out,
            cancelled=proc.cancelled,
            start_error=proc.start_error,
            duration_seconds=self.clock() - started,
            output_tail=api.tail if api else proc.tail,
            diff=diff,
            log_path=log.path,
            log_bytes=log.written,
            log_truncated=log.truncated,
            adapter_error=api.adapter_error if api else None,
            infrastructure_reason=api.infrastructure_reason if api else None,
            retry_after_seconds=api.retry_after_seconds if api else None,
            usage=api.usage if api else None,
            isolation=isolation,
        )
        return AdapterRun(outcome, handle)

    def _checkout(self, repo_url: str, commit: str, adir: Path) -> tuple[Path, Path]:
        """(mirror, the attempt's checkout of ``commit``). A commit this process found in the
        mirror before is not looked up again (one git process less per attempt): commits do
        not leave a mirror; should one have gone anyway, the checkout fails and the mirror
        is verified (and fetched) the long way."""
        mirror = mirror_path(self._mirrors, repo_url)
        if (repo_url, commit) in self._verified and mirror.exists():
            try:
                return mirror, add_worktree(mirror, adir / "tree", commit)
            except InfrastructureError:
                self._verified.discard((repo_url, commit))
        mirror = ensure_mirror(self._mirrors, repo_url, commit)
        tree = add_worktree(mirror, adir / "tree", commit)
        self._verified.add((repo_url, commit))
        return mirror, tree

    def _keep(
        self,
        request: AttemptRequest,
        tree: Path,
        adir: Path,
        log: TaskLog,
        checkout: str | None,
    ) -> CapturedDiff:
        """Capture the diff (up to the hard limit) and put it in the evidence store."""
        spool = adir / "diff.patch"
        diff = capture_diff(
            tree, request.task.base_commit, request.max_diff_bytes, spool, checkout=checkout
        )
        summary = diff.summary
        if diff.path is not None and not summary.empty:
            ref = self.evidence.put_file(diff.path, summary.sha256)
            summary = summary.model_copy(
                update={"patch_ref": ref.key, "patch_stored_bytes": ref.stored_bytes}
            )
            diff = CapturedDiff(diff.path, summary)
            if request.redactor.secret_count and request.redactor.contains_value(diff.patch):
                log.note("diff_contains_secret", hint="a secret the adapter was given is in it")
        log.note(
            "diff_captured",
            bytes=summary.bytes,
            files=summary.files_changed,
            sha256=summary.sha256,
            patch_ref=summary.patch_ref,
            stored_bytes=summary.patch_stored_bytes,
            over_limit=summary.truncated,
            limit=request.max_diff_bytes,
        )
        return diff

    def isolation(self, adapter: AdapterSpec) -> IsolationLevel:
        """The confinement of an attempt's untrusted processes: the adapter's own (process
        adapters), else the gate checks' (patch and manual adapters run no process)."""
        spec = adapter.sandbox
        network = spec.network if adapter.kind is AdapterKind.PROCESS else spec.checks_network
        return self.sandbox.isolation(network)

    def run_gate(self, request: AttemptRequest, run: AdapterRun) -> GateResult:
        handle: _Handle = run.handle
        assert handle.mirror is not None and run.outcome.diff is not None
        mirror, log = handle.mirror, handle.log
        assert run.outcome.diff.path is not None  # needs_gate: only a kept diff is judged
        gate = run_gate(
            request.gate_checks,
            patch=run.outcome.diff.path,
            checkout=lambda: self._gate_checkout(mirror, handle.base_commit, handle.adir),
            sinks=lambda name: log.section(f"gate:{name}"),
            baseline=request.gate_baseline,
            policy=request.task.gate_policy,
            python=self.python,
            clock=self.clock,
            sandbox=self.sandbox,
            network=request.adapter.sandbox.checks_network,
            # removed with the attempt dir (in the background), not on the gate's path
            scratch_dir=(
                None if self.keep_worktrees else handle.adir / f"gate-scratch-{next(_gate_counter)}"
            ),
        )
        log.note(
            "gate_finished",
            passed=gate.passed,
            applied=gate.applied,
            apply_method=gate.apply_method,
            blamed=gate.blamed,
            tamper=gate.tamper.flagged,
        )
        return gate

    def release(self, run: AdapterRun) -> LogCounts:
        handle: _Handle = run.handle
        handle.log.close()
        if not self.keep_worktrees:
            # the checkout and its private repository are in the attempt dir
            self._remove_attempt_dir(handle.adir)
        return LogCounts(handle.log.path, handle.log.written, handle.log.truncated)

    def drain(self) -> None:
        """Wait until the released attempts' directories are deleted."""
        self.janitor.drain()

    def _run_adapter(
        self,
        request: AttemptRequest,
        tree: Path,
        adir: Path,
        log: TaskLog,
        hooks: AttemptHooks,
    ) -> ProcessResult:
        task, adapter = request.task, request.adapter
        if adapter.kind is AdapterKind.PROCESS:
            return run_process_adapter(
                adapter,
                task,
                attempt=request.attempt,
                extra_input=request.extra_input,
                tree=tree,
                attempt_dir=adir,
                workdir=self.workdir,
                python=self.python,
                timeout=request.timeout_seconds,
                log=log,
                note=log.note,
                grace_seconds=self.grace_seconds,
                stop=self.stop,
                on_start=lambda pgid: hooks.started(pgid, tree),
                clock=self.clock,
                sandbox=self.sandbox,
            )
        if adapter.kind is AdapterKind.PATCH:
            assert task.patch is not None
            return self._apply(tree, task.patch.encode(), log, "task patch")
        _, submitted = manual_paths(self.workdir, request.key.run_id, task.task_id)
        if not submitted.exists():
            raise InfrastructureError(f"manual task {task.task_id}: no submitted patch")
        return self._apply(tree, submitted, log, "submitted patch")

    def _apply(self, tree: Path, patch: bytes | Path, log: TaskLog, what: str) -> ProcessResult:
        started = self.clock()
        method = apply_patch(tree, patch)
        took = self.clock() - started
        if method is None:
            log.note("patch_failed", what=what)
            return ProcessResult(1, None, False, False, None, took, f"{what} does not apply")
        log.note("patch_applied", what=what, method=method)
        return _ok(took)

    @contextmanager
    def _gate_checkout(self, mirror: Path, commit: str, adir: Path) -> Iterator[Path]:
        path = adir / f"gate-{next(_gate_counter)}"
        tree = add_worktree(mirror, path, commit)
        try:
            yield tree
        finally:
            if not self.keep_worktrees:
                self.janitor.discard(tree)
                self.janitor.discard(private_git_dir(tree))

    def _remove_attempt_dir(self, adir: Path) -> None:
        """Remove the attempt dir (moved to the trash at once, deleted in the background) and
        the task/run dirs above it once they are empty."""
        self.janitor.discard(adir)
        for parent in (adir.parent, adir.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break

    def cleanup_attempt(self, key: TaskKey, attempt: int) -> None:
        self._remove_attempt_dir(self.attempt_dir(key, attempt))


_gate_counter = count(1)


def _ok(duration: float) -> ProcessResult:
    return ProcessResult(0, None, False, False, None, duration, "")

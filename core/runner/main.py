"""What runs inside an adapter or gate pod: ``python -m core.runner adapter|gate``.

The runner holds no Kubernetes or store credentials: its init container (``python -m
core.runner fetch``) downloads the request (and a patch to apply) through the pod's grant
into a read-only mount; the runner reads the request from that file, works in
``$ORCHESTRATOR_WORKDIR`` (an emptyDir), uploads its full log and diff through the grant's
upload URLs and reports on stdout (see :mod:`core.runner.protocol`). It reuses the embedded
engine's pieces, so a pod attempt and a local attempt produce the same evidence:

* adapter: bare clone of the repository (:func:`ensure_mirror`), a checkout at the pinned
  base commit, the adapter run as its own process group under the inner budget (SIGTERM,
  grace, SIGKILL) -- or, for an ``api`` adapter, the HTTP call made from the pod (through the
  Adapter's egress policy, the API key from the pod's environment, i.e. a Secret) and its
  diff applied -- then :func:`capture_diff` (also after a timeout: partial work is evidence);
* gate: :func:`run_gate` on fresh checkouts of the base commit with the mounted diff applied.

Layout of the work dir (nothing is written outside it; ``/tmp`` is left to the tools)::

    mirrors/<repo>-<hash>.git     bare clone, its ``origin`` remote removed
    attempt/tree                  the adapter's checkout (its own repository in tree/.git)
    attempt/tree.git              the runner's private repository for it (git hardening)
    attempt/prompt.md             the prompt, outside the tree (not in the diff)
    attempt/home                  $HOME of the adapter
    attempt/gate-<n>              the gate's checkouts
    attempt/log.jsonl             the full log (capped), uploaded at the end
    tmp/                          the runner's own temporary files

The pod is the sandbox here (no bubblewrap inside a restricted pod): the adapter shares the
runner's user and emptyDir. git is hardened as on the embedded backend
(:mod:`core.engine.workspace`: no hooks, fsmonitor or config-driven commands, restricted
transports, the runner's git on the tree only through its private repository).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from types import FrameType
from typing import IO

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from core import __version__
from core.engine.adapters import run_api_adapter, run_process_adapter
from core.engine.api_adapter import ApiOutcome
from core.engine.evidence_grants import GRANT_ENV, Grant, Upload
from core.engine.process_group import ProcessResult
from core.engine.redaction import adapter_redactor
from core.engine.task_log import PrefixedSink, TaskLog
from core.engine.test_gate import TAIL_CHARS, run_gate
from core.engine.workspace import (
    add_worktree,
    apply_patch,
    capture_diff,
    ensure_mirror,
    git,
)
from core.errors import InfrastructureError, MissingCommitError
from core.models import AdapterKind
from core.runner.protocol import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_INPUTS_DIR,
    DEFAULT_REQUEST_FILE,
    DEFAULT_WORKDIR,
    DIFF_SLOT,
    EXIT_BAD_REQUEST,
    EXIT_OK,
    EXIT_RUNNER_FAILED,
    GRACE_ENV,
    INPUTS_ENV,
    LOG_SLOT,
    REQUEST_FILE_ENV,
    WORKDIR_ENV,
    RunnerRequest,
    RunnerResult,
)
from core.runner.transfer import TransferError, download, upload

USAGE = (
    "usage: python -m core.runner fetch|adapter|gate  (request in the file "
    "$ORCHESTRATOR_REQUEST_FILE, grant in $ORCHESTRATOR_GRANT)"
)
#: Written by ``fetch`` instead of failing the init container: the runner reports it.
FETCH_ERROR = "fetch-error"


class BadRequest(Exception):
    """The request is missing or invalid: retrying the same pod cannot help."""


class RunnerFailure(Exception):
    """The runner could not do its job (clone, checkout, patch file): infrastructure."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["fetch"]:
        return fetch(os.environ)
    request_file = Path(os.environ.get(REQUEST_FILE_ENV) or DEFAULT_REQUEST_FILE)
    try:
        fetch_error = request_file.parent / FETCH_ERROR
        if fetch_error.is_file():
            message = fetch_error.read_text(errors="replace")[:2000]
            print(
                json.dumps({"stream": "orchestrator", "event": "runner_failed", "error": message})
            )
            print(f"orchestrator runner: infrastructure failure: {message}", file=sys.stderr)
            return EXIT_RUNNER_FAILED
        request = load_request(args, _read(request_file), request_file)
        grant = load_grant(os.environ.get(GRANT_ENV))
        workdir = Path(os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR)
        grace = _grace_seconds(os.environ.get(GRACE_ENV))
    except BadRequest as exc:
        print(f"orchestrator runner: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_REQUEST
    out = _stdout()
    stop = threading.Event()
    _install_signal_handlers(request, stop)
    try:
        result = run(request, workdir, out=out, stop=stop, grace_seconds=grace, grant=grant)
    except RunnerFailure as exc:
        print(f"orchestrator runner: infrastructure failure: {exc}", file=sys.stderr, flush=True)
        return EXIT_RUNNER_FAILED
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"orchestrator runner: internal error: {exc!r}", file=sys.stderr, flush=True)
        return EXIT_RUNNER_FAILED
    out.write(result.result_line() + "\n")
    out.flush()
    return EXIT_OK


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadRequest(f"cannot read the request file {path}: {exc}") from exc


def load_request(
    args: Sequence[str], raw: str | None, path: Path = Path(DEFAULT_REQUEST_FILE)
) -> RunnerRequest:
    """Parse and check the request; :class:`BadRequest` names what is wrong."""
    if len(args) != 1 or args[0] not in ("adapter", "gate"):
        raise BadRequest(
            f"expected one argument, 'fetch', 'adapter' or 'gate'; got {args!r}\n{USAGE}"
        )
    if not raw:
        raise BadRequest(
            f"the request file {path} is missing or empty (${REQUEST_FILE_ENV}: JSON of "
            "core.runner.protocol.RunnerRequest)"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request file {path} is not valid JSON: {exc}") from exc
    try:
        request = RunnerRequest.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  {_describe(err)}" for err in exc.errors(include_url=False))
        raise BadRequest(f"invalid request in {path}:\n{problems}") from exc
    if request.kind != args[0]:
        raise BadRequest(
            f"kind: the request is for '{request.kind}', the runner was started as '{args[0]}'"
        )
    return request


def load_grant(raw: str | None) -> Grant | None:
    """The pod's grant (None: a runner started by hand reports the diff on stdout)."""
    if not raw:
        return None
    try:
        return Grant.model_validate_json(raw)
    except ValidationError as exc:
        raise BadRequest(
            f"invalid ${GRANT_ENV}: {exc.errors(include_url=False)[0]['msg']}"
        ) from exc


def fetch(env: Mapping[str, str]) -> int:
    """The init container: download the grant's inputs into ``$ORCHESTRATOR_INPUTS``.

    A failure is written to ``fetch-error`` there and the container exits 0, so the runner
    container starts and reports it on its log like any runner failure (infrastructure).
    """
    target = Path(env.get(INPUTS_ENV) or DEFAULT_INPUTS_DIR)
    try:
        grant = load_grant(env.get(GRANT_ENV))
        if grant is None:
            raise BadRequest(f"${GRANT_ENV} is not set")
        for slot, item in grant.downloads.items():
            name = "request.json" if slot == "request" else slot
            download(item, target / name)
            print(json.dumps({"event": "input_fetched", "slot": slot, "bytes": item.size}))
    except (BadRequest, TransferError, OSError) as exc:
        (target / FETCH_ERROR).write_text(f"fetching the inputs failed: {exc}")
        print(f"orchestrator runner: fetching the inputs failed: {exc}", file=sys.stderr)
    return EXIT_OK


def _describe(err: ErrorDetails) -> str:
    where = ".".join(str(part) for part in err["loc"])
    if not where and err["type"] == "value_error":
        # a whole-request rule (RunnerRequest._kind_inputs): its message names the field
        return str(err.get("ctx", {}).get("error", err["msg"]))
    return f"{where or '(request)'}: {err['msg']}"


def run(
    request: RunnerRequest,
    workdir: Path,
    *,
    out: IO[str],
    stop: threading.Event | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    grant: Grant | None = None,
) -> RunnerResult:
    """Do what ``request`` asks in ``workdir``; log records go to ``out`` as they happen
    (with a log upload in ``grant``: only our notes; the full log is uploaded)."""
    uploads = grant.uploads if grant is not None else {}
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp)
    adir = workdir / "attempt"
    log = TaskLog(
        adir / "log.jsonl",
        task_id=request.task.task_id,
        attempt=request.attempt,
        max_bytes=request.max_log_bytes,
        mirror=out,
        redactor=adapter_redactor(request.adapter, os.environ, request.gate_checks),
        mirror_notes_only=LOG_SLOT in uploads,
    )
    try:
        if request.kind == "adapter":
            result, diff_path = _adapter(
                request, workdir, adir, log, stop, grace_seconds, inline=DIFF_SLOT not in uploads
            )
            if DIFF_SLOT in uploads:
                result = _upload_diff(result, diff_path, uploads[DIFF_SLOT], log)
        else:
            result = _gate(request, workdir, adir, log)
    except (RunnerFailure, InfrastructureError, OSError) as exc:
        log.note("runner_failed", error=str(exc))
        raise RunnerFailure(str(exc)) from exc
    finally:
        log.close()  # the output_dropped note, if any, precedes the result
    result = result.model_copy(update={"log_bytes": log.written, "log_truncated": log.truncated})
    if LOG_SLOT in uploads:
        try:
            result = result.model_copy(update={"log": upload(uploads[LOG_SLOT], log.path)})
        except (TransferError, OSError) as exc:
            result = _failed_upload(result, f"log: {exc}")
    # the report's words are masked too (the operator knows no Secret's value)
    texts = ("adapter_error", "infrastructure_reason", "start_error", "upload_error")
    return result.model_copy(
        update={k: log.redactor(v) for k in texts if isinstance(v := getattr(result, k), str)}
    )


def _upload_diff(
    result: RunnerResult, path: Path | None, grant: Upload, log: TaskLog
) -> RunnerResult:
    """Send the full diff through the grant; the report then names it instead of carrying it."""
    if result.diff is None or result.diff.truncated or path is None:
        return result.model_copy(update={"patch_b64": None})
    try:
        uploaded = upload(grant, path)
    except (TransferError, OSError) as exc:
        log.note("upload_failed", what="diff", error=str(exc))
        return _failed_upload(result.model_copy(update={"patch_b64": None}), f"diff: {exc}")
    log.note("diff_uploaded", key=uploaded.key, bytes=uploaded.size, stored=uploaded.stored_bytes)
    return result.model_copy(update={"patch_b64": None, "patch": uploaded})


def _failed_upload(result: RunnerResult, message: str) -> RunnerResult:
    previous = f"{result.upload_error}; " if result.upload_error else ""
    return result.model_copy(update={"upload_error": previous + message})


# --------------------------------------------------------------------------- adapter


def _adapter(
    request: RunnerRequest,
    workdir: Path,
    adir: Path,
    log: TaskLog,
    stop: threading.Event | None,
    grace_seconds: float,
    *,
    inline: bool = True,
) -> tuple[RunnerResult, Path | None]:
    started = time.monotonic()
    task, adapter = request.task, request.adapter
    mirror = _mirror(request, workdir, log)
    try:
        tree = add_worktree(mirror, adir / "tree", task.base_commit)
    except InfrastructureError as exc:
        raise RunnerFailure(f"checkout of {task.base_commit} failed: {exc}") from exc
    log.note(
        "attempt_started",
        adapter=adapter.id,
        kind=adapter.kind.value,
        runner_version=__version__,
        timeout_seconds=request.timeout_seconds,
    )
    api: ApiOutcome | None = None
    if adapter.kind is AdapterKind.PROCESS:
        proc = _run_process(request, workdir, adir, tree, log, stop, grace_seconds)
    elif adapter.kind is AdapterKind.API:
        api = run_api_adapter(
            adapter,
            task,
            run_id=request.run_id,
            attempt=request.attempt,
            extra_input=request.extra_input,
            tree=tree,
            timeout=request.timeout_seconds,
            log=log,
            note=log.note,
            stop=stop,
            env=os.environ,
        )
        proc = ProcessResult(
            api.exit_code, None, api.timed_out, api.cancelled, None, api.duration_seconds, api.tail
        )
    else:  # patch, and manual: the task's `patch`, or the file the request names
        if task.patch is not None:
            patch = task.patch.encode()
        else:
            assert request.patch_file is not None  # checked by RunnerRequest
            try:
                patch = Path(request.patch_file).read_bytes()
            except OSError as exc:
                raise RunnerFailure(
                    f"cannot read the patch file {request.patch_file}: {exc}"
                ) from exc
        proc = _apply(tree, patch, log)
    log.end_section()
    diff = capture_diff(tree, task.base_commit, request.max_diff_bytes)
    log.note(
        "diff_captured",
        bytes=diff.summary.bytes,
        files=diff.summary.files_changed,
        sha256=diff.summary.sha256,
        truncated=diff.summary.truncated,
    )
    if proc.timed_out:
        log.note("adapter_timed_out", timeout_seconds=request.timeout_seconds)
    log.note(
        "attempt_finished",
        exit_code=proc.exit_code,
        signal=proc.signal,
        timed_out=proc.timed_out,
        cancelled=proc.cancelled,
    )
    result = RunnerResult(
        kind="adapter",
        exit_code=proc.exit_code,
        signal=proc.signal,
        timed_out=proc.timed_out,
        cancelled=proc.cancelled,
        start_error=proc.start_error,
        duration_seconds=round(time.monotonic() - started, 3),
        output_tail=log.redactor(proc.tail[-TAIL_CHARS:]),
        diff=diff.summary,
        patch_b64=base64.b64encode(diff.patch).decode()
        if inline and not diff.summary.truncated
        else None,
        runner_version=__version__,
        adapter_error=api.adapter_error if api else None,
        infrastructure_reason=api.infrastructure_reason if api else None,
        retry_after_seconds=api.retry_after_seconds if api else None,
        usage=api.usage if api else None,
    )
    return result, diff.path


def _run_process(
    request: RunnerRequest,
    workdir: Path,
    adir: Path,
    tree: Path,
    log: TaskLog,
    stop: threading.Event | None,
    grace_seconds: float,
) -> ProcessResult:
    return run_process_adapter(
        request.adapter,
        request.task,
        attempt=request.attempt,
        extra_input=request.extra_input,
        tree=tree,
        attempt_dir=adir,
        workdir=workdir,
        python=sys.executable,
        timeout=request.timeout_seconds,
        log=log,
        note=log.note,
        grace_seconds=grace_seconds,
        stop=stop,
    )


def _apply(tree: Path, patch: bytes, log: TaskLog) -> ProcessResult:
    started = time.monotonic()
    method = apply_patch(tree, patch)
    took = time.monotonic() - started
    if method is None:
        log.note("patch_failed", what="task patch")
        return ProcessResult(1, None, False, False, None, took, "task patch does not apply")
    log.note("patch_applied", what="task patch", method=method)
    return ProcessResult(0, None, False, False, None, took, "")


# --------------------------------------------------------------------------- gate


def _gate(request: RunnerRequest, workdir: Path, adir: Path, log: TaskLog) -> RunnerResult:
    started = time.monotonic()
    assert request.patch_file is not None  # checked by RunnerRequest
    try:
        patch = Path(request.patch_file).read_bytes()
    except OSError as exc:
        raise RunnerFailure(f"cannot read the patch file {request.patch_file}: {exc}") from exc
    mirror = _mirror(request, workdir, log)
    base = request.task.base_commit
    log.note(
        "gate_started",
        checks=[c.name for c in request.gate_checks],
        baseline=request.gate_baseline,
        patch_bytes=len(patch),
        patch_sha256=hashlib.sha256(patch).hexdigest(),
        runner_version=__version__,
    )
    numbers = count(1)

    @contextmanager
    def checkout() -> Iterator[Path]:
        # a fresh tree each time (baseline, then patched); the pod is thrown away after
        yield add_worktree(mirror, adir / f"gate-{next(numbers)}", base)

    gate = run_gate(
        request.gate_checks,
        patch=patch,
        checkout=checkout,
        sinks=lambda name: PrefixedSink(log, f"gate:{name}"),
        baseline=request.gate_baseline,
        policy=request.task.gate_policy,
        python=sys.executable,
    )
    log.note(
        "gate_finished",
        passed=gate.passed,
        applied=gate.applied,
        apply_method=gate.apply_method,
        failed_checks=gate.failed_checks,
        blamed=gate.blamed,
        tamper=gate.tamper.flagged,
    )
    return RunnerResult(
        kind="gate",
        duration_seconds=round(time.monotonic() - started, 3),
        gate=gate,
        runner_version=__version__,
    )


# --------------------------------------------------------------------------- helpers


def _mirror(request: RunnerRequest, workdir: Path, log: TaskLog) -> Path:
    log.note("checkout_started", base_commit=request.task.base_commit)
    try:
        mirror = ensure_mirror(workdir / "mirrors", request.repo_url, request.task.base_commit)
        # nothing in the pod needs the remote; an adapter must not push to (or read a token
        # embedded in) the source URL through the worktree's git config
        if b"origin" in git("remote", git_dir=mirror).split():
            git("remote", "remove", "origin", git_dir=mirror)
    except (InfrastructureError, MissingCommitError) as exc:
        raise RunnerFailure(f"clone of the source failed: {exc}") from exc
    return mirror


def _grace_seconds(raw: str | None) -> float:
    if not raw:
        return DEFAULT_GRACE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise BadRequest(f"{GRACE_ENV}: expected seconds between 0 and 3600, got {raw!r}")
    return value


def _stdout() -> IO[str]:
    """stdout as UTF-8 whatever the locale; records are flushed one by one."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
    return sys.stdout


def _install_signal_handlers(request: RunnerRequest, stop: threading.Event) -> None:
    """SIGTERM (pod deletion) and SIGINT.

    Adapter: stop the adapter's group like a timeout does (reported ``cancelled``); its diff
    and the result are still printed. Gate: exit at once (128 + signal) without a result.
    As PID 1 of the container the runner would otherwise ignore SIGTERM altogether.
    """

    def adapter_handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def gate_handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    handler = adapter_handler if request.kind == "adapter" else gate_handler
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)

"""Continuous mode: wait for new runs in a work dir without busy polling.

Phase 4 hands a run over by writing ``.state/task_queue.json`` and
``.state/routing_decisions.json`` and then the ``.state/ROUTING_COMPLETE`` flag; a human hands
in a manual task's patch under ``manual/``. :class:`RunWatcher` sleeps until one of them
changes: file-system notifications through watchfiles (inotify on Linux), with watchfiles'
polling backend as the fallback where notifications cannot be had (no inotify, watch limit,
some network file systems) or when asked for. The executor compares a fingerprint of those
inputs (:func:`inputs_fingerprint`) before and after waiting, so a change that lands while a
run executes is seen at once afterwards, and a notification for a file that did not really
change starts nothing.

Why watchfiles' ``RustNotify`` and not its ``watch()`` generator: ``RustNotify`` starts
collecting changes when it is created and keeps them until they are read, so the watch is
armed *before* the fingerprint is taken; the generator arms itself only on its first
``next()``, and a flag written in between would be missed until the next unrelated change.
``watch()`` itself is a thin loop over the same class.

While waiting, the executor wakes every ``tick_seconds`` to call ``on_tick`` (its heartbeat
metric) and returns as soon as the stop event is set (SIGTERM): the notifier checks it, and
Python's signal handlers, between short sleeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from watchfiles._rust_notify import RustNotify

from core.engine.state_files import ROUTING_COMPLETE, ROUTING_DECISIONS, STATE_DIR, TASK_QUEUE
from core.errors import EntryContractError

logger = logging.getLogger(__name__)

#: The phase-4 inputs whose change means "maybe a new run or new tasks".
INPUT_FILES = (ROUTING_COMPLETE, TASK_QUEUE, ROUTING_DECISIONS)
MANUAL_DIR = "manual"
SUBMITTED_PATCH = "submitted.diff"
R = TypeVar("R")
#: How often the notifier looks at the stop event while it sleeps (not a file-system poll).
STEP_MS = 100


def inputs_fingerprint(workdir: Path) -> str:
    """A digest of the phase-4 inputs and the submitted manual patches (name, size, mtime)."""
    digest = hashlib.sha256()
    for name in INPUT_FILES:
        path = workdir / STATE_DIR / name
        digest.update(name.encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"\0missing\0")
    manual = workdir / MANUAL_DIR
    for patch in sorted(manual.rglob(SUBMITTED_PATCH)) if manual.is_dir() else []:
        try:
            stat = patch.stat()
        except OSError:
            continue
        digest.update(f"{patch.relative_to(manual)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def flagged_run(workdir: Path) -> str | None:
    """The run id ``ROUTING_COMPLETE`` names, or None while there is no readable flag."""
    try:
        data = json.loads((workdir / STATE_DIR / ROUTING_COMPLETE).read_bytes())
    except (OSError, ValueError):
        return None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def _relevant(path: str) -> bool:
    name = Path(path).name
    return name in INPUT_FILES or name == SUBMITTED_PATCH


class RunWatcher:
    """Wakes the executor when the inputs of ``workdir`` may have changed."""

    def __init__(
        self,
        workdir: Path,
        stop: threading.Event,
        *,
        force_polling: bool = False,
        poll_seconds: float = 1.0,
        debounce_seconds: float = 0.5,
        tick_seconds: float = 30.0,
        on_tick: Callable[[], object] | None = None,
    ) -> None:
        self.workdir = workdir
        self.stop = stop
        self.force_polling = force_polling
        self.poll_seconds = poll_seconds
        self.debounce_seconds = debounce_seconds
        self.tick_seconds = tick_seconds
        self.on_tick = on_tick
        self._notify: RustNotify | None = None

    @property
    def mode(self) -> str:
        return "polling" if self.force_polling else "notifications"

    def arm(self) -> None:
        """Start collecting changes (idempotent); creates ``.state/`` and ``manual/``."""
        if self._notify is not None:
            return
        paths = [self.workdir / STATE_DIR, self.workdir / MANUAL_DIR]
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
        try:
            self._notify = self._open(paths)
        except (OSError, RuntimeError) as exc:
            if self.force_polling:
                raise
            # e.g. the inotify watch limit: the polling backend needs no kernel watch
            logger.warning("file notifications unavailable (%s); polling instead", exc)
            self.force_polling = True
            self._notify = self._open(paths)

    def _open(self, paths: list[Path]) -> RustNotify:
        return RustNotify(
            [str(p) for p in paths],
            False,  # debug
            self.force_polling,
            int(self.poll_seconds * 1000),
            True,  # recursive: manual/<run>/<task>/submitted.diff
            True,  # ignore permission denied below the watched dirs
        )

    def wait(self, last: str | None) -> str | None:
        """Block until the inputs' fingerprint differs from ``last``; the new fingerprint,
        or None once the stop event is set."""
        self.arm()
        assert self._notify is not None
        while not self.stop.is_set():
            current = inputs_fingerprint(self.workdir)
            if current != last:
                return current
            while not self.stop.is_set():
                raw = self._notify.watch(
                    int(self.debounce_seconds * 1000),
                    STEP_MS,
                    int(self.tick_seconds * 1000),
                    self.stop,
                )
                if raw == "timeout":
                    if self.on_tick is not None:
                        self.on_tick()
                    continue
                if isinstance(raw, set) and not any(_relevant(path) for _, path in raw):
                    continue
                break  # a relevant change, or 'stop'/'signal': look again
        return None

    def close(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None


def serve_runs(
    watcher: RunWatcher,
    execute: Callable[[str], R],
    *,
    only_run: str | None = None,
    report: Callable[[str], object] = logger.info,
    heartbeat: Callable[[], object] | None = None,
) -> list[R]:
    """The executor loop: execute the run ``ROUTING_COMPLETE`` names whenever the inputs
    change (``only_run``: that run only), until the watcher's stop event is set.

    A run whose inputs are not valid yet (phase 4 still writing, a flag naming another run
    than the queue) is reported and waited for, not fatal; anything else ``execute`` raises
    (a database at the wrong migration) ends the loop. Returns what each execution returned.
    """
    done: list[R] = []
    last: str | None = None
    try:
        while not watcher.stop.is_set():
            if heartbeat is not None:
                heartbeat()
            fingerprint = watcher.wait(last)
            if fingerprint is None:
                break
            last = fingerprint
            run = flagged_run(watcher.workdir)
            if run is None or (only_run is not None and run != only_run):
                what = f"run {run}" if run else "no ROUTING_COMPLETE flag yet"
                report(f"waiting for {'run ' + only_run if only_run else 'a run'} ({what})")
                continue
            try:
                done.append(execute(run))
            except EntryContractError as exc:
                report(
                    f"the inputs of run {run} do not agree (phase 4 still writing?); "
                    f"waiting for them to change: {exc}"
                )
                continue
            if not watcher.stop.is_set():
                where = f"{watcher.workdir} ({watcher.mode})"
                report(f"run {run} done; waiting for new runs in {where}")
    finally:
        watcher.close()
    return done


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` (main thread only; the old handlers come back after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda _signum, _frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

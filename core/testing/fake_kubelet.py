"""A kubelet and Job controller for the fake API server: Jobs run as local processes.

With a :class:`FakeKubelet` started on a :class:`~core.testing.fake_apiserver.FakeApiServer`,
a created Job (as :func:`core.kube.jobs.job_manifest` builds it) gets what a cluster gives it:
a Pod (``<job>-xxxxx``, the template's labels, which include ``job-name``, and an owner
reference to the Job), whose container command runs as a local process group
(``python -m core.runner adapter|gate``, ``python`` being this interpreter) with the
container's environment and nothing else but ``PATH`` and what the test adds; stdout and
stderr, interleaved, are the pod log. Volumes are directories under the kubelet's work dir:
``emptyDir`` empty, ``configMap`` and ``secret`` one file per key (or per listed item,
``binaryData`` decoded). Init containers run first, one after the other, to completion (a
failing one fails the pod). Paths the container would see under a mount are rewritten to
those directories in environment values and in the ``patch_file`` of the runner request
file (``$ORCHESTRATOR_REQUEST_FILE``), the one path the operator puts into a request.

The statuses are the real ones (Kubernetes 1.35): the pod goes Pending -> Running ->
Succeeded/Failed with the container's exit code (128 + signal when killed); the Job gets
``startTime``/``active``, then ``SuccessCriteriaMet`` + ``Complete`` or ``FailureTarget`` +
``Failed`` (``BackoffLimitExceeded``, or ``DeadlineExceeded`` after
``activeDeadlineSeconds``, when the controller deletes the pod). A deleted pod gets SIGTERM,
``terminationGracePeriodSeconds``, then SIGKILL for the container's whole process tree (the
processes below it at SIGTERM: a container is its cgroup, this is the closest a local
process gets), and counts as a failure; ``backoffLimit`` failures are retried with a new
pod. An environment variable from a missing Secret or ConfigMap keeps the pod Pending in
``CreateContainerConfigError``; a missing ConfigMap volume keeps it in ``ContainerCreating``.

Not a security boundary: ``securityContext`` is not enforced and the process runs as the
test's user. Image, resources and NetworkPolicies are ignored. A suspended Job gets no pod
until it is resumed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConflictError, NotFoundError
from core.kube.api import Body
from core.testing.fake_apiserver import Change, FakeApiServer
from core.testing.kube_semantics import timestamp

log = logging.getLogger("orchestrator.testing.kubelet")
NODE_NAME = "fake-node"
#: core.runner.protocol.REQUEST_FILE_ENV (no import: no cycle)
REQUEST_FILE_ENV = "ORCHESTRATOR_REQUEST_FILE"


class PodNotStarted(Exception):
    """The pod cannot start (a missing Secret, ConfigMap or volume): it stays Pending."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass
class _Pod:
    namespace: str
    name: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class FakeKubelet:
    """Runs the Jobs of ``server`` (see the module docstring); ``async with`` or start/stop."""

    def __init__(
        self,
        server: FakeApiServer,
        workdir: Path,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.server = server
        self.workdir = workdir
        self.python = python
        self.env = dict(env or {})
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by Job uid
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._procs: set[asyncio.subprocess.Process] = set()
        self._confirms: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: what went wrong in the kubelet itself (a test should assert it stays empty)
        self.errors: list[Exception] = []

    async def __aenter__(self) -> FakeKubelet:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Run every Job created from now on (and those already there). Needs a running loop."""
        self._loop = asyncio.get_running_loop()
        self.server.listeners.append(self._on_change)
        for job in self.server.list_objects("jobs", None):
            if not job["spec"].get("suspend") and not (job.get("status") or {}).get("conditions"):
                self._start_job(job)

    async def stop(self) -> None:
        """Kill every container still running and forget the Jobs."""
        if self._on_change in self.server.listeners:
            self.server.listeners.remove(self._on_change)
        for task in (*self._tasks.values(), *self._confirms):
            task.cancel()  # a cancelled pod run kills its container's tree
        await asyncio.gather(*self._tasks.values(), *self._confirms, return_exceptions=True)
        self._tasks.clear()
        for proc in list(self._procs):
            await _kill_all([proc.pid, *_descendants(proc.pid)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)

    async def wait_idle(self) -> None:
        """Until every Job started so far has finished (or was deleted), and every pod
        deletion the kubelet owes has been confirmed."""
        while pending := [t for t in (*self._tasks.values(), *self._confirms) if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ events

    def _on_change(self, change: Change) -> None:
        meta = change.new["metadata"]
        key = (meta["namespace"], meta["name"])
        if change.plural == "jobs" and change.type != "DELETED":
            spec, status = change.new.get("spec") or {}, change.new.get("status") or {}
            if not spec.get("suspend") and not status.get("conditions"):
                self._start_job(change.new)  # created, or resumed (no pods while suspended)
        elif change.plural == "pods" and (
            change.type == "DELETED" or meta.get("deletionTimestamp")
        ):
            if key in self._pods:
                self._pods[key].stop.set()  # running: SIGTERM, grace, then confirmed
            elif change.type != "DELETED" and change.new["spec"].get("nodeName") == NODE_NAME:
                # its container already stopped: confirm at once, after the current write
                assert self._loop is not None
                task = self._loop.create_task(self._confirm_deletion(*key))
                self._confirms.add(task)
                task.add_done_callback(self._confirms.discard)

    async def _confirm_deletion(self, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            self.server.delete("pods", namespace, name, force=True)

    def _start_job(self, job: Body) -> None:
        assert self._loop is not None
        meta = job["metadata"]
        if meta["uid"] not in self._tasks:
            run = self._run_job(meta["namespace"], meta["name"], meta["uid"])
            self._tasks[meta["uid"]] = self._loop.create_task(run)

    # ------------------------------------------------------------------ the Job controller

    async def _run_job(self, namespace: str, name: str, uid: str) -> None:
        try:
            await self._job(namespace, name, uid)
        except (NotFoundError, ConflictError):
            return  # the Job (or its pod) was deleted (or replaced): nothing left to report
        except Exception as exc:
            log.exception("fake kubelet: Job %s/%s", namespace, name)
            self.errors.append(exc)

    async def _job(self, namespace: str, name: str, uid: str) -> None:
        job = self.server.get("jobs", namespace, name)
        if job["metadata"]["uid"] != uid:
            return  # replaced by a namesake before it started: that one has its own run
        spec = job["spec"]
        start = timestamp(self.server.now())
        self._job_status(job, {"startTime": start, "active": 1, "ready": 0})
        deadline = spec.get("activeDeadlineSeconds")
        loop = asyncio.get_running_loop()
        ends = None if deadline is None else loop.time() + float(deadline)
        failed = 0
        while True:
            pod = self._create_pod(job)
            outcome = await self._run_pod(job, pod, ends)
            if outcome == "deadline":  # the controller fails the Job and deletes its pods
                await self._delete_pod(namespace, pod["metadata"]["name"])
                self._finish_job(
                    job,
                    ok=False,
                    reason="DeadlineExceeded",
                    message="Job was active longer than specified deadline",
                    failed=failed + 1,
                )
                return
            if outcome == 0:
                self._finish_job(
                    job,
                    ok=True,
                    reason="CompletionsReached",
                    message="Reached expected number of succeeded pods",
                    failed=failed,
                )
                return
            failed += 1
            if failed > int(spec.get("backoffLimit", 6)):
                self._finish_job(
                    job,
                    ok=False,
                    reason="BackoffLimitExceeded",
                    message="Job has reached the specified backoff limit",
                    failed=failed,
                )
                return
            self._job_status(job, {"failed": failed, "active": 1, "ready": 0})

    def _job_status(self, job: Body, status: Body) -> None:
        """A status write for this Job only (uid precondition: not a namesake made since)."""
        meta = job["metadata"]
        patch = {"metadata": {"uid": meta["uid"]}, "status": status}
        self.server.patch("jobs", meta["namespace"], meta["name"], patch, status=True)

    def _finish_job(self, job: Body, *, ok: bool, reason: str, message: str, failed: int) -> None:
        now = timestamp(self.server.now())
        types = ("SuccessCriteriaMet", "Complete") if ok else ("FailureTarget", "Failed")
        conditions = [
            {
                "type": t,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
            for t in types
        ]
        status: Body = {"conditions": conditions, "active": None, "ready": 0, "terminating": 0}
        status |= {"succeeded": 1, "completionTime": now} if ok else {"failed": failed}
        self._job_status(job, status)

    # ------------------------------------------------------------------ the pod

    def _create_pod(self, job: Body) -> Body:
        meta, template = job["metadata"], job["spec"]["template"]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{meta['name']}-",
                "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {**template["spec"], "nodeName": NODE_NAME},
        }
        pod = self.server.create("pods", meta["namespace"], body)
        self._pod_status(pod, {"phase": "Pending", "qosClass": "Guaranteed"})
        return pod

    def _pod_status(self, pod: Body, status: Body) -> None:
        meta = pod["metadata"]
        self.server.patch("pods", meta["namespace"], meta["name"], {"status": status}, status=True)

    async def _run_pod(self, job: Body, pod: Body, ends: float | None) -> int | str:
        """The container's exit code, "deadline", or "deleted" (before it started)."""
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        handle = self._pods[(namespace, name)] = _Pod(namespace, name)
        container = pod["spec"]["containers"][0]
        try:
            try:
                failed = await self._init_containers(pod, handle)
                if failed is not None:
                    return failed
                argv, env, cwd, log = self._prepare(pod, container)
            except PodNotStarted as exc:
                waiting = {"waiting": {"reason": exc.reason, "message": str(exc)}}
                self._pod_status(pod, _container_status(container, waiting, ready=False))
                outcome = await self._wait(handle, None, ends, pod)
            else:
                outcome = await self._run_container(
                    job, pod, container, handle, ends, argv, env, cwd, log
                )
            if handle.stop.is_set():  # deleted: the kubelet confirms the container is gone
                with contextlib.suppress(NotFoundError):
                    self.server.delete("pods", namespace, name, force=True)
            return outcome
        finally:
            self._pods.pop((namespace, name), None)

    async def _init_containers(self, pod: Body, handle: _Pod) -> int | None:
        """Run the init containers to completion; the exit code of one that failed."""
        for init in pod["spec"].get("initContainers") or []:
            argv, env, cwd, log = self._prepare(pod, init)
            with open(log.with_name(f"init-{init['name']}.log"), "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
            self._procs.add(proc)
            try:
                code = _exit_code(await proc.wait())
            finally:
                self._procs.discard(proc)
            if code != 0 or handle.stop.is_set():
                state = {"terminated": {"exitCode": code, "reason": "Error"}}
                with contextlib.suppress(NotFoundError):
                    self._pod_status(
                        pod, {"phase": "Failed"} | _container_status(init, state, ready=False)
                    )
                return code or 1
        return None

    async def _run_container(
        self,
        job: Body,
        pod: Body,
        container: Body,
        handle: _Pod,
        ends: float | None,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        log: Path,
    ) -> int | str:
        namespace, name = handle.namespace, handle.name
        with open(log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self._procs.add(proc)
        try:
            self.server.pod_logs[(namespace, name)] = lambda: log.read_bytes().decode(
                "utf-8", "replace"
            )
            started = timestamp(self.server.now())
            running = {"running": {"startedAt": started}}
            self._pod_status(
                pod,
                {"phase": "Running", "startTime": started, "podIP": "127.0.0.1"}
                | _container_status(container, running, ready=True),
            )
            with contextlib.suppress(NotFoundError):  # the Job may be going already
                self._job_status(job, {"ready": 1})
            outcome = await self._wait(handle, proc, ends, pod)
        finally:
            self._procs.discard(proc)
            if proc.returncode is None:  # left early (an error, cancelled): never leak it
                await _kill_all([proc.pid, *_descendants(proc.pid)])
                await proc.wait()
        assert proc.returncode is not None
        code = _exit_code(proc.returncode)
        terminated = {
            "terminated": {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": started,
                "finishedAt": timestamp(self.server.now()),
            }
        }
        with contextlib.suppress(NotFoundError):
            self._pod_status(
                pod,
                {"phase": "Succeeded" if code == 0 else "Failed"}
                | _container_status(container, terminated, ready=False),
            )
        return outcome

    async def _wait(
        self,
        handle: _Pod,
        proc: asyncio.subprocess.Process | None,
        ends: float | None,
        pod: Body,
    ) -> int | str:
        """Until the container exits, the pod is deleted, or the Job's deadline passes."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Task[Any]] = [loop.create_task(handle.stop.wait())]
        if proc is not None:
            waits.append(loop.create_task(proc.wait()))
        timeout = None if ends is None else max(0.0, ends - loop.time())
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if proc is not None and proc.returncode is not None:
            return _exit_code(proc.returncode)
        deleted = handle.stop.is_set()
        if proc is None:
            return "deleted" if deleted else "deadline"
        code = await self._terminate(
            proc, float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        )
        return code if deleted else "deadline"

    async def _terminate(self, proc: asyncio.subprocess.Process, grace: float) -> int:
        """SIGTERM the container's process group; after ``grace``, SIGKILL what is left of the
        container (its processes as they were at SIGTERM, and any that are still below it),
        and return once they are all gone."""
        tree = _descendants(proc.pid)  # before SIGTERM: an exiting parent orphans its children
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
        await _kill_all([proc.pid, *tree, *_descendants(proc.pid)])
        await proc.wait()
        assert proc.returncode is not None
        return _exit_code(proc.returncode)

    async def _delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod whose container has stopped: graceful, then confirmed at once."""
        with contextlib.suppress(NotFoundError):
            self.server.delete("pods", namespace, name)
        with contextlib.suppress(NotFoundError):
            self.server.delete("pods", namespace, name, force=True)

    # ------------------------------------------------------------------ volumes, env, command

    def _prepare(self, pod: Body, container: Body) -> tuple[list[str], dict[str, str], str, Path]:
        meta = pod["metadata"]
        root = self.workdir / meta["namespace"] / meta["name"]
        volumes = self._volumes(pod, root / "volumes")
        mounts = sorted(
            ((m["mountPath"], volumes[m["name"]]) for m in container.get("volumeMounts") or []),
            key=lambda m: -len(m[0]),
        )

        def host_path(value: str) -> str:
            for mount, host in mounts:
                if value == mount or value.startswith(mount.rstrip("/") + "/"):
                    return str(host) + value[len(mount.rstrip("/")) :]
            return value

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env}
        for var in container.get("env") or []:
            env[var["name"]] = host_path(self._env_value(meta["namespace"], var))
        request_file = Path(env.get(REQUEST_FILE_ENV, "/nonexistent"))
        if request_file.is_file():  # written by the init container into a mounted volume
            request = json.loads(request_file.read_text(encoding="utf-8"))
            if isinstance(request.get("patch_file"), str):
                request["patch_file"] = host_path(request["patch_file"])
            request_file.write_text(json.dumps(request), encoding="utf-8")
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if not argv:
            raise PodNotStarted("CreateContainerError", "the fake kubelet needs a command")
        if argv[0] in ("python", "python3"):
            argv[0] = self.python
        cwd = root / "cwd"
        cwd.mkdir(parents=True, exist_ok=True)
        workdir = container.get("workingDir")
        return argv, env, host_path(workdir) if workdir else str(cwd), root / "log"

    def _volumes(self, pod: Body, base: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        out: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            path = base / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume or "secret" in volume:
                self._project(namespace, volume, path)
            elif "emptyDir" not in volume:
                raise PodNotStarted("ContainerCreating", f"volume {volume['name']}: unsupported")
            out[volume["name"]] = path
        return out

    def _project(self, namespace: str, volume: Body, path: Path) -> None:
        """A ``configMap`` or ``secret`` volume: its keys (or listed items) as files."""
        if "configMap" in volume:
            source, plural, what = volume["configMap"], "configmaps", "configmap"
            name = source["name"]
        else:
            source, plural, what = volume["secret"], "secrets", "secret"
            name = source["secretName"]
        try:
            obj = self.server.get(plural, namespace, name)
        except NotFoundError:
            raise PodNotStarted("ContainerCreating", f'{what} "{name}" not found') from None
        files: dict[str, bytes] = {}
        for key, text in (obj.get("data") or {}).items():
            files[key] = base64.b64decode(text) if plural == "secrets" else text.encode()
        for key, b64 in (obj.get("binaryData") or {}).items():
            files[key] = base64.b64decode(b64)
        items = source.get("items")
        if items:
            missing = [i["key"] for i in items if i["key"] not in files]
            if missing:
                raise PodNotStarted(
                    "ContainerCreating", f'{what} "{name}": no key {missing[0]}'
                )
            files = {i["path"]: files[i["key"]] for i in items}
        for key, data in files.items():
            (path / key).write_bytes(data)

    def _env_value(self, namespace: str, var: Body) -> str:
        if "valueFrom" not in var:
            return str(var.get("value", ""))
        source = var["valueFrom"]
        for kind, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if kind in source:
                ref = source[kind]
                try:
                    obj = self.server.get(plural, namespace, ref["name"])
                except NotFoundError:
                    obj = {}
                if plural == "secrets" and ref["key"] in (obj.get("data") or {}):
                    return base64.b64decode(obj["data"][ref["key"]]).decode()
                if plural == "configmaps" and ref["key"] in (obj.get("data") or {}):
                    return str(obj["data"][ref["key"]])
                what = "secret" if plural == "secrets" else "configmap"
                problem = "not found" if not obj else f"couldn't find key {ref['key']}"
                raise PodNotStarted(
                    "CreateContainerConfigError", f'{what} "{ref["name"]}" {problem}'
                )
        raise PodNotStarted("CreateContainerConfigError", f"env {var['name']}: unsupported source")


def _container_status(container: Body, state: Body, *, ready: bool) -> Body:
    return {
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container.get("image", ""),
                "ready": ready,
                "restartCount": 0,
                "started": "running" in state,
                "state": state,
            }
        ]
    }


def _exit_code(returncode: int) -> int:
    """A container's exit code: 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


async def _kill_all(pids: list[int], patience: float = 10.0) -> None:
    """SIGKILL ``pids`` and wait (bounded) until none is running any more."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    end = loop.time() + patience
    while any(_running(pid) for pid in pids) and loop.time() < end:
        await asyncio.sleep(0.01)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out

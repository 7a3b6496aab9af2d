"""The fake kubelet: Jobs of the fake API server run as real local processes, with the
statuses a cluster reports (asserted on the objects the server holds, and on the processes).

The runner itself on a fake-kubelet Job: tests/integration/test_fake_kubelet_runner.py."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core.kube.api import Body
from core.kube.jobs import job_finished
from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet

NS = "ns"


def job(name: str, code: str, *, env: list[Body] | None = None, **spec: Any) -> Body:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "t"}},
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"labels": {"role": "test"}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {
                            "name": "main",
                            "image": "unused",
                            "command": ["python", "-c", code],
                            "env": env or [],
                            "volumeMounts": [
                                {"name": "work", "mountPath": "/work"},
                                {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "work", "emptyDir": {}},
                        {"name": "cfg", "configMap": {"name": "cfg"}},
                    ],
                },
            },
        },
    }


def with_kubelet(
    tmp_path: Path, scenario: Callable[[FakeKubeApi, FakeKubelet], Awaitable[None]]
) -> None:
    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        await api.create_configmap(
            NS,
            {
                "metadata": {"name": "cfg"},
                "data": {"text": "hello"},
                "binaryData": {"blob": base64.b64encode(b"\x00\xff").decode()},
            },
        )
        async with FakeKubelet(api.server, tmp_path) as kubelet:
            await scenario(api, kubelet)
            assert kubelet.errors == []

    asyncio.run(main())


def condition_types(obj: Body) -> list[tuple[str, str]]:
    return [(c["type"], c["reason"]) for c in obj["status"].get("conditions", [])]


def test_a_successful_job(tmp_path: Path) -> None:
    code = (
        "import os, sys, pathlib\n"
        "print('out', os.environ['WHERE'], pathlib.Path('/etc/cfg/text'.replace('/etc/cfg', "
        "os.environ['CFG'])).read_text(), flush=True)\n"
        "print('err', file=sys.stderr)\n"
        # LC_CTYPE: set by the child interpreter itself (PEP 538 locale coercion)
        "print(sorted(k for k in os.environ if k != 'LC_CTYPE'))\n"
    )
    env = [{"name": "WHERE", "value": "/work/home"}, {"name": "CFG", "value": "/etc/cfg"}]

    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        made = await api.create_job(NS, job("ok", code, env=env))
        await kubelet.wait_idle()
        done = await api.get_job(NS, "ok")
        assert done is not None and job_finished(done) == "Complete"
        assert condition_types(done) == [
            ("SuccessCriteriaMet", "CompletionsReached"),
            ("Complete", "CompletionsReached"),
        ]
        assert done["status"]["succeeded"] == 1 and "active" not in done["status"]
        pods = await api.job_pods(NS, "ok")
        assert len(pods) == 1
        pod = pods[0]
        assert pod["metadata"]["name"].startswith("ok-")
        assert pod["metadata"]["labels"]["role"] == "test"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == made.object["metadata"]["uid"]
        assert pod["status"]["phase"] == "Succeeded"
        state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert state["exitCode"] == 0 and state["reason"] == "Completed"
        log = await api.pod_log(NS, pod["metadata"]["name"])
        assert log is not None
        lines = log.splitlines()
        work = tmp_path / NS / pod["metadata"]["name"] / "volumes" / "work"
        assert lines[0] == f"out {work}/home hello"  # mount paths mapped, ConfigMap mounted
        assert "err" in lines
        assert lines[-1] == str(sorted(["CFG", "PATH", "WHERE"]))  # nothing else leaks in

    with_kubelet(tmp_path, scenario)


def test_a_failing_job_and_its_retries(tmp_path: Path) -> None:
    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(
            NS, job("bad", "import sys; print('bye'); sys.exit(3)", backoffLimit=1)
        )
        await kubelet.wait_idle()
        done = await api.get_job(NS, "bad")
        assert done is not None and job_finished(done) == "Failed"
        assert condition_types(done) == [
            ("FailureTarget", "BackoffLimitExceeded"),
            ("Failed", "BackoffLimitExceeded"),
        ]
        assert done["status"]["failed"] == 2
        pods = await api.job_pods(NS, "bad")
        assert len(pods) == 2
        for pod in pods:
            assert pod["status"]["phase"] == "Failed"
            assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
            assert await api.pod_log(NS, pod["metadata"]["name"]) == "bye\n"

    with_kubelet(tmp_path, scenario)


def test_the_deadline_fails_the_job_and_removes_its_pod(tmp_path: Path) -> None:
    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(
            NS, job("slow", "import time; time.sleep(600)", activeDeadlineSeconds=1)
        )
        await kubelet.wait_idle()
        done = await api.get_job(NS, "slow")
        assert done is not None
        assert condition_types(done)[-1] == ("Failed", "DeadlineExceeded")
        assert await api.job_pods(NS, "slow") == []

    with_kubelet(tmp_path, scenario)


SURVIVOR = (
    "import os, signal, subprocess, sys, time, pathlib\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
    " start_new_session=True)\n"
    "pathlib.Path(os.environ['PIDS']).write_text(f'{os.getpid()} {child.pid}')\n"
    "signal.signal(signal.SIGTERM, lambda *a: print('got SIGTERM', flush=True))\n"
    "print('running', flush=True)\n"
    "time.sleep(600)\n"
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_deleted_pod_gets_sigterm_then_its_whole_tree_is_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(
            NS, job("victim", SURVIVOR, env=[{"name": "PIDS", "value": str(pids)}])
        )
        while not pids.exists() or not pids.read_text():
            await asyncio.sleep(0.05)
        pod = (await api.job_pods(NS, "victim"))[0]
        name = pod["metadata"]["name"]
        while "running" not in (await api.pod_log(NS, name) or ""):
            await asyncio.sleep(0.05)
        assert pod["status"]["phase"] == "Running"
        api.server.delete("pods", NS, name)
        terminating = api.server.get("pods", NS, name)
        assert terminating["metadata"]["deletionGracePeriodSeconds"] == 2
        await kubelet.wait_idle()
        assert await api.job_pods(NS, "victim") == []
        done = await api.get_job(NS, "victim")
        assert done is not None and condition_types(done)[-1] == ("Failed", "BackoffLimitExceeded")
        runner, child = (int(p) for p in pids.read_text().split())
        assert not alive(runner) and not alive(child)

    with_kubelet(tmp_path, scenario)


def test_deleting_the_job_stops_its_pod(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(
            NS, job("doomed", SURVIVOR, env=[{"name": "PIDS", "value": str(pids)}])
        )
        while not pids.exists() or not pids.read_text():
            await asyncio.sleep(0.05)
        assert await api.delete_job(NS, "doomed") is True
        await kubelet.wait_idle()
        assert await api.get_job(NS, "doomed") is None
        assert api.server.list_objects("pods", NS) == []
        runner, child = (int(p) for p in pids.read_text().split())
        assert not alive(runner) and not alive(child)

    with_kubelet(tmp_path, scenario)


def test_a_missing_secret_keeps_the_pod_pending(tmp_path: Path) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]

    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(NS, job("stuck", "print('never')", env=env, activeDeadlineSeconds=1))
        while (
            not (pods := await api.job_pods(NS, "stuck"))
            or "containerStatuses" not in pods[0]["status"]
        ):
            await asyncio.sleep(0.02)
        waiting = pods[0]["status"]["containerStatuses"][0]["state"]["waiting"]
        assert waiting == {
            "reason": "CreateContainerConfigError",
            "message": 'secret "absent" not found',
        }
        assert pods[0]["status"]["phase"] == "Pending"
        await kubelet.wait_idle()
        done = await api.get_job(NS, "stuck")
        assert done is not None and condition_types(done)[-1] == ("Failed", "DeadlineExceeded")

    with_kubelet(tmp_path, scenario)


def test_a_secret_reaches_the_environment(tmp_path: Path) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]

    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        api.server.create(
            "secrets",
            NS,
            {"metadata": {"name": "s"}, "data": {"k": base64.b64encode(b"tok").decode()}},
        )
        await api.create_job(NS, job("secret", "import os; print(os.environ['TOKEN'])", env=env))
        await kubelet.wait_idle()
        pod = (await api.job_pods(NS, "secret"))[0]
        assert await api.pod_log(NS, pod["metadata"]["name"]) == "tok\n"

    with_kubelet(tmp_path, scenario)


def test_the_watch_sees_the_job_finish(tmp_path: Path) -> None:
    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        made = await api.create_job(NS, job("watched", "pass"))
        since = made.object["metadata"]["resourceVersion"]
        async for event in api.watch("jobs", NS, resource_version=since, timeout_seconds=60):
            if job_finished(event.object):
                break
        else:
            raise AssertionError("the Job never finished")
        stored = await api.get_job(NS, "watched")
        assert stored is not None
        assert event.resource_version == stored["metadata"]["resourceVersion"]
        assert job_finished(stored) == "Complete"

    with_kubelet(tmp_path, scenario)


def test_the_python_of_the_container_is_this_interpreter(tmp_path: Path) -> None:
    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(NS, job("which", "import sys; print(sys.executable)"))
        await kubelet.wait_idle()
        pod = (await api.job_pods(NS, "which"))[0]
        assert await api.pod_log(NS, pod["metadata"]["name"]) == f"{sys.executable}\n"

    with_kubelet(tmp_path, scenario)


def test_a_suspended_job_gets_no_pod_until_resumed(tmp_path: Path) -> None:
    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(NS, job("later", "print('resumed', flush=True)", suspend=True))
        await kubelet.wait_idle()
        assert await api.job_pods(NS, "later") == []
        api.server.patch("jobs", NS, "later", {"spec": {"suspend": False}})
        await kubelet.wait_idle()
        done = await api.get_job(NS, "later")
        assert done is not None and job_finished(done) == "Complete"
        pod = (await api.job_pods(NS, "later"))[0]
        assert await api.pod_log(NS, pod["metadata"]["name"]) == "resumed\n"

    with_kubelet(tmp_path, scenario)


def test_a_job_recreated_under_its_name_runs_again(tmp_path: Path) -> None:
    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        first = await api.create_job(NS, job("again", "import sys; sys.exit(1)"))
        await kubelet.wait_idle()
        assert await api.delete_job(NS, "again", uid=first.object["metadata"]["uid"])
        await kubelet.wait_idle()
        assert api.server.list_objects("pods", NS) == []  # went with their Job
        second = await api.create_job(NS, job("again", "print('second', flush=True)"))
        await kubelet.wait_idle()
        done = await api.get_job(NS, "again")
        assert done is not None and done["metadata"]["uid"] == second.object["metadata"]["uid"]
        assert job_finished(done) == "Complete" and "failed" not in done["status"]
        pods = await api.job_pods(NS, "again")
        assert len(pods) == 1
        assert await api.pod_log(NS, pods[0]["metadata"]["name"]) == "second\n"

    with_kubelet(tmp_path, scenario)


def test_stopping_the_kubelet_leaves_no_process_behind(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        await api.create_configmap(NS, {"metadata": {"name": "cfg"}, "data": {}})
        kubelet = FakeKubelet(api.server, tmp_path / "kubelet")
        kubelet.start()
        await api.create_job(NS, job("left", SURVIVOR, env=[{"name": "PIDS", "value": str(pids)}]))
        while not pids.exists() or not pids.read_text():
            await asyncio.sleep(0.05)
        await kubelet.stop()
        runner, child = (int(p) for p in pids.read_text().split())
        assert not alive(runner) and not alive(child)
        assert kubelet.errors == []

    asyncio.run(main())


def test_what_a_terminated_container_leaves_behind_is_killed_too(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    quitter = SURVIVOR.replace(
        "lambda *a: print('got SIGTERM', flush=True)", "lambda *a: sys.exit(0)"
    )  # exits at SIGTERM, its child (own session) would live on as an orphan
    assert "sys.exit(0)" in quitter

    async def scenario(api: FakeKubeApi, kubelet: FakeKubelet) -> None:
        await api.create_job(
            NS, job("orphans", quitter, env=[{"name": "PIDS", "value": str(pids)}])
        )
        while not pids.exists() or not pids.read_text():
            await asyncio.sleep(0.05)
        pod = (await api.job_pods(NS, "orphans"))[0]
        api.server.delete("pods", NS, pod["metadata"]["name"])
        await kubelet.wait_idle()
        runner, child = (int(p) for p in pids.read_text().split())
        assert not alive(runner) and not alive(child)

    with_kubelet(tmp_path, scenario)

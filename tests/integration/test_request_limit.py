"""A task whose inputs can never reach a pod ends FAILED at once, naming the field and the fix:
a runner request over its limit (the prompt and an inline patch are in it). Before, the
evidence error went back to the work queue, which retried it forever with a ReconcileError
in the status and nothing in the database. The limit is lowered here: a TaskExecution that
large would be refused by etcd first, unless JSON escapes make its request grow past it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.kube import attempt_io
from core.models import TaskState
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import task_execution
from tests.fake_controller import NS, driven_controller


def test_a_request_over_its_limit_fails_the_task_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempt_io, "MAX_REQUEST_BYTES", 64 * 1024)

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))
        controller, task = await driven_controller(api, tmp_path)
        body = task_execution("big", "git://x/y.git", "patch", task={**task, "prompt": "\x01" * 12_000})
        made = await api.create_object("taskexecutions", NS, body)
        (key,) = controller.observe_task("ADDED", made.object)
        await controller.sync(key)

        te = await api.get_object("taskexecutions", NS, "big")
        assert te is not None
        status = te["status"]
        assert status["state"] == "FAILED", status
        message = status["message"]
        assert "spec.task.prompt" in message and "spec.task.patchFrom" in message, message
        assert "limit 65536" in message
        assert await api.list_jobs(NS) == []  # no attempt was started
        (record,) = controller.store.tasks("e2e")
        assert record.status is TaskState.FAILED and record.attempts == 0
        assert "limit 65536" in (record.failure_message or "")
        assert [e.event for e in controller.store.events()] == ["TASK_FAILED"]

    asyncio.run(main())

"""The operator's Controller on the fake API server with real SQLite and a local evidence
store, for tests that drive it step by step or under a control loop."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from core.db.database import default_url, make_engine, upgrade
from core.db.store import Store
from core.engine.evidence import LEDGER_DIR
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore
from core.kube.reconciler import Controller, ControllerSettings
from core.testing.fake_kube import FakeKubeApi
from tests.e2e.operator_harness import adapter, demo_patch

NS = "scale"


def fake_controller(
    api: FakeKubeApi, workdir: Path, now: Callable[[], datetime] | None = None
) -> Controller:
    url = default_url(workdir)
    upgrade(url)
    # no pod runs here (no kubelet): the store is never called over HTTP
    signer = GrantSigner(b"k" * 32)
    evidence = LocalGrantingStore(
        workdir / LEDGER_DIR, base_url="http://127.0.0.1:9", signer=signer
    )
    return Controller(
        api,
        Store(make_engine(url)),
        ControllerSettings(workdir=workdir, runner_image="unused", namespaces=(NS,)),
        evidence=evidence,
        **({"now": now} if now else {}),
    )


async def driven_controller(
    api: FakeKubeApi, workdir: Path
) -> tuple[Controller, dict[str, Any]]:
    """A controller driven step by step (no control loop) that knows a ``patch`` Adapter,
    and the task of a TaskExecution that names it."""
    controller = fake_controller(api, workdir)
    made = await api.create_object("adapters", NS, adapter("patch", "patch"))
    controller.observe_adapter("ADDED", made.object)
    return controller, {"prompt": "p", "patch": demo_patch("add-multiply")}



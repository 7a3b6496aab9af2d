"""The parity suite, fast form: every scenario through the embedded executor and through the
operator on the in-memory API server with the fake kubelet (real runner, git, processes).

Both backends must record the same final state, failure class, attempt count, attempt
classes, ledger shape and events -- and what the scenario expects.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.testing.fake_kube import FakeKubeApi
from core.testing.fake_kubelet import FakeKubelet
from tests.parity import (
    NS,
    SCENARIOS,
    Cluster,
    Scenario,
    drive_kubernetes,
    outcomes,
    run_embedded,
    workdir_for,
)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_both_backends_record_the_same_outcome(tmp_path: Path, scenario: Scenario) -> None:
    embedded = run_embedded(tmp_path / "embedded", scenario)

    workdir = workdir_for(tmp_path / "kube", scenario)
    operator = tmp_path / "operator"
    operator.mkdir()

    async def main() -> None:
        api = FakeKubeApi(namespaces=(NS,))

        async def connect() -> FakeKubeApi:
            return api

        async with FakeKubelet(api.server, tmp_path / "kubelet") as kubelet:
            await drive_kubernetes(
                api,
                workdir,
                scenario,
                operator_workdir=operator,
                cluster=Cluster(connect, NS, timeout=120),
            )
            assert kubelet.errors == []

    asyncio.run(main())
    from core.db.database import default_url

    kube = outcomes(default_url(operator), operator, [t["task_id"] for t in scenario.tasks])

    expected = {k: v for k, v in scenario.expect.items()}
    assert {t: (o.state, o.failure_class, o.attempts) for t, o in embedded.items()} == expected
    assert scenario.gate_expectations(embedded) == (scenario.expect_gate or {})
    assert kube == embedded

"""The fault proxy's own promises on the real API server (tests/e2e/fault_proxy.py).

A fault *after* the request is the one a chaos run needs to find double writes: the API
server acted, the client saw a failure. Asserted on what the API server holds.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.fault_proxy import FaultProxy, Rule

pytestmark = pytest.mark.cluster


def _via(kube_cluster, proxy: FaultProxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kube_cluster.kubectl_bin, "--kubeconfig", proxy.kubeconfig, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("after", [False, True])
def test_a_fault_after_the_request_loses_only_the_answer(
    kube_cluster, kubectl, kube_namespace, after: bool
) -> None:
    ns = kube_namespace
    with FaultProxy(kube_cluster.kubeconfig) as proxy:
        rule = proxy.add(Rule(verb="create", resource="configmaps", status=500, after=after))
        made = _via(kube_cluster, proxy, "create", "configmap", "probe", "-n", ns)
        assert made.returncode != 0 and "injected by the fault proxy" in made.stderr
        assert rule.fired == 1
    there = kubectl("get", "configmap", "probe", "-n", ns, check=False)
    assert (there.returncode == 0) is after, there.stderr

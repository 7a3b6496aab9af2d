"""The fault proxy's own promises on the real API server (tests/e2e/fault_proxy.py).

A fault *after* the request is the one a chaos run needs to find double writes: the API
server acted, the client saw a failure. Asserted on what the API server holds.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

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


def test_an_api_server_that_is_down_looks_down_through_the_proxy(kube_cluster, tmp_path) -> None:
    """While the API server restarts (a chaos run) the client must see a connection that
    fails, as it would without the proxy, not a 500 the proxy made up (with a traceback)."""
    config = yaml.safe_load(Path(kube_cluster.kubeconfig).read_text())
    with socket.socket() as s:  # a port nothing listens on: the API server is "down"
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{closed}"
    down = tmp_path / "down.kubeconfig"
    down.write_text(yaml.safe_dump(config))
    with FaultProxy(str(down)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/api/v1/namespaces/default/configmaps"
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(url, timeout=30).close()  # a 500 would be an HTTPError
        assert [c.status for c in proxy.seen("list", "configmaps")] == [None]

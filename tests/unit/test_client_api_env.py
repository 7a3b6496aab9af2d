"""The API client takes from the environment only what was asked for.

aiohttp's ``trust_env`` (on in the Kubernetes client) reads proxy variables and ``~/.netrc``
on every request. The operator turns it off: a ``.netrc`` entry for the API server's host can
neither add a password to the operator's requests nor clash with its bearer token. The proxy
a variable names (``NO_PROXY`` honoured) is passed to the client explicitly, its credentials
as the Proxy-Authorization header; here a loopback "proxy" records what reaches it.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from aiohttp import web

from core.kube.client_api import ClientKubeApi, env_proxy

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "WS_PROXY", "WSS_PROXY")


def _kubeconfig(path: Path, port: int, proxy_url: str = "") -> Path:
    proxy = f", proxy-url: {proxy_url!r}" if proxy_url else ""
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"{proxy}}}}}]
users: [{{name: u, user: {{token: operator-token}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
    )
    return path


def _no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_no_netrc_password_reaches_the_api_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_proxy_variables(monkeypatch)
    _netrc(tmp_path, monkeypatch)
    seen: list[str | None] = []

    async def configmap(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/ns/configmaps/x", configmap)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        api = await ClientKubeApi.connect(str(_kubeconfig(tmp_path / "kubeconfig", port)))
        try:
            assert await api.get_object("configmaps", "ns", "x") is None
        finally:
            await api.close()
            await runner.cleanup()

    asyncio.run(main())
    assert seen == ["Bearer operator-token"]


def _netrc(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(home))
    netrc = home / ".netrc"
    netrc.write_text("machine 127.0.0.1 login admin password netrc-secret\n")
    netrc.chmod(0o600)


async def _recorder(seen: list[dict[str, str | None]]) -> tuple[web.AppRunner, int]:
    """A loopback server answering every request 404, recording its target and headers."""

    async def anything(request: web.Request) -> web.Response:
        seen.append(
            {
                "target": str(request.url),
                "authorization": request.headers.get("Authorization"),
                "proxy-authorization": request.headers.get("Proxy-Authorization"),
            }
        )
        return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _get_configmap(kubeconfig: Path, *servers: web.AppRunner) -> object:
    """GET a ConfigMap (the servers answer 404: None) through a fresh client; returns its
    session options. Stops ``servers`` afterwards."""
    api = await ClientKubeApi.connect(str(kubeconfig))
    try:
        assert await api.get_object("configmaps", "ns", "x") is None
        return api.api_client.configuration.client_session_kwargs
    finally:
        await api.close()
        for server in servers:
            await server.cleanup()


def test_a_proxy_variable_is_honoured_without_trust_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_proxy_variables(monkeypatch)
    _netrc(tmp_path, monkeypatch)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    seen: list[dict[str, str | None]] = []

    async def main() -> object:
        proxy, port = await _recorder(seen)
        monkeypatch.setenv("HTTP_PROXY", f"http://op%40x:s%3Acret@127.0.0.1:{port}")
        # the API server's port has nothing listening: only the proxy can answer
        return await _get_configmap(_kubeconfig(tmp_path / "kubeconfig", 9), proxy)

    assert asyncio.run(main()) == {"trust_env": False}
    assert seen == [
        {
            "target": "http://127.0.0.1:9/api/v1/namespaces/ns/configmaps/x",
            "authorization": "Bearer operator-token",  # not the .netrc password
            "proxy-authorization": "Basic " + base64.b64encode(b"op@x:s:cret").decode(),
        }
    ]


def test_the_kubeconfigs_proxy_url_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxy_variables(monkeypatch)
    seen: list[dict[str, str | None]] = []
    ignored: list[dict[str, str | None]] = []

    async def main() -> None:
        proxy, port = await _recorder(seen)
        other, other_port = await _recorder(ignored)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{other_port}")
        kubeconfig = _kubeconfig(tmp_path / "kubeconfig", 9, f"http://127.0.0.1:{port}")
        await _get_configmap(kubeconfig, proxy, other)

    asyncio.run(main())
    assert [d["target"] for d in seen] == ["http://127.0.0.1:9/api/v1/namespaces/ns/configmaps/x"]
    assert ignored == []


def test_no_proxy_sends_the_api_server_requests_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_proxy_variables(monkeypatch)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    through_proxy: list[dict[str, str | None]] = []
    direct: list[dict[str, str | None]] = []

    async def main() -> None:
        proxy, proxy_port = await _recorder(through_proxy)
        server, port = await _recorder(direct)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        await _get_configmap(_kubeconfig(tmp_path / "kubeconfig", port), proxy, server)

    asyncio.run(main())
    assert through_proxy == []
    assert [d["authorization"] for d in direct] == ["Bearer operator-token"]


@pytest.mark.parametrize(
    ("server", "variables", "expected"),
    [
        ("https://10.0.0.1:6443", {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
        ("https://10.0.0.1:6443", {"HTTP_PROXY": "http://p:3128"}, None),  # the scheme's
        ("https://api.internal", {"HTTPS_PROXY": "http://p", "NO_PROXY": ".internal"}, None),
        ("https://10.0.0.1", {"ALL_PROXY": "socks5://p:1080"}, None),  # as aiohttp does
        ("https://[fd00::1]:6443", {"https_proxy": "http://[fd00::2]:3128"}, "http://[fd00::2]:3128"),
        ("https://10.0.0.1", {"HTTPS_PROXY": "p:3128"}, "http://p:3128"),  # as curl reads it
        ("https://10.0.0.1", {"HTTPS_PROXY": "https://p:3128"}, None),  # aiohttp cannot
    ],
)
def test_the_proxy_for_an_api_server(
    monkeypatch: pytest.MonkeyPatch,
    server: str,
    variables: dict[str, str],
    expected: str | None,
) -> None:
    _no_proxy_variables(monkeypatch)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert env_proxy(server) == expected

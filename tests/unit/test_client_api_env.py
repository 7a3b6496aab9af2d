"""The API client takes from the environment only what was asked for.

aiohttp's ``trust_env`` (on in the Kubernetes client) reads proxy variables and ``~/.netrc``
on every request. With no proxy variable set the operator turns it off: nothing to find, and
a ``.netrc`` entry for the API server's host can neither add a password to the operator's
requests nor clash with its bearer token. With a proxy variable set it stays on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from core.kube.client_api import ClientKubeApi

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "WS_PROXY", "WSS_PROXY")


def _kubeconfig(path: Path, port: int) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
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
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login admin password netrc-secret\n")
    netrc.chmod(0o600)
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


def test_a_proxy_variable_is_still_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_proxy_variables(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")

    async def main() -> object:
        api = await ClientKubeApi.connect(str(_kubeconfig(tmp_path / "kubeconfig", 9)))
        try:
            return api.api_client.configuration.client_session_kwargs
        finally:
            await api.close()

    assert asyncio.run(main()) is None  # the client's own default: trust_env on

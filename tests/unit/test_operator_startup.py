"""A misconfigured operator stops at once with the setting and the fix named.

kopf retries a failing start-up activity every 60 seconds, forever: a missing runner image or
an unreadable kubeconfig would have kept a pod Running and "starting" with a traceback per
minute. Settings, kubeconfig and schema errors are unrecoverable, so the start-up raises
kopf's PermanentError and the process exits non-zero (a pod goes to CrashLoopBackOff showing
the message). The last test runs the real operator process (``kopf run``) to prove the exit.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError, KubeConfigError
from core.kube.client_api import ClientKubeApi
from core.kube.runtime import load_settings, start_evidence

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ORCHESTRATOR_") or name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
            monkeypatch.delenv(name)


def test_a_missing_setting_names_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("ORCHESTRATOR_WORKERS", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "ORCHESTRATOR_RUNNER_IMAGE: Field required" in message
    assert "ORCHESTRATOR_WORKERS: Input should be greater than or equal to 1" in message
    assert "fix: set these environment variables" in message


def test_good_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("ORCHESTRATOR_RUNNER_IMAGE", "registry.example/runner:1")
    monkeypatch.setenv("ORCHESTRATOR_NAMESPACE", "a, b")
    settings = load_settings()
    assert settings.runner_image == "registry.example/runner:1"
    assert settings.namespaces == ("a", "b")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("garbage: [\n", "while parsing"),
        ("apiVersion: v1\nkind: Config\n", "current-context"),
        (None, "current-context"),  # no file at all
    ],
)
def test_an_unusable_kubeconfig_is_a_config_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, why: str
) -> None:
    _clean_env(monkeypatch)
    path = tmp_path / "kubeconfig"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KubeConfigError) as caught:
        asyncio.run(ClientKubeApi.connect(str(path)))
    message = str(caught.value)
    assert f"no usable Kubernetes configuration in {path}" in message and why in message
    assert "fix: set ORCHESTRATOR_KUBECONFIG or KUBECONFIG" in message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "ORCHESTRATOR_RUNNER_IMAGE: Field required"),
        ({"ORCHESTRATOR_RUNNER_IMAGE": "runner:1"}, "no usable Kubernetes configuration in"),
    ],
)
def test_the_operator_process_exits_instead_of_retrying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    _clean_env(monkeypatch)
    bad = tmp_path / "kubeconfig"
    bad.write_text("garbage: [\n")
    run_env = {
        **os.environ,
        "ORCHESTRATOR_WORKDIR": str(tmp_path / "work"),
        "KUBECONFIG": str(bad),
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "x",
         str(ROOT / "operator" / "handlers.py")],
        env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # kopf would retry a failing start-up every 60 s for ever: it ends within the timeout,
    # non-zero, with the problem and its fix in its log
    assert done.returncode == 1, done.stderr[-2000:]
    assert "failed permanently" in done.stderr and expected in done.stderr


def test_an_evidence_port_already_taken_is_a_config_error_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found with two benchmark operators on one machine: the second one's start-up retried
    binding 8081 every 60 s and never logged why it did not start."""
    _clean_env(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("ORCHESTRATOR_RUNNER_IMAGE", "runner:1")
        monkeypatch.setenv("ORCHESTRATOR_WORKDIR", str(tmp_path))
        monkeypatch.setenv("ORCHESTRATOR_EVIDENCE_LISTEN", f"127.0.0.1:{port}")
        with pytest.raises(ConfigError) as caught:
            asyncio.run(start_evidence(load_settings(), None))
    message = str(caught.value)
    assert f"ORCHESTRATOR_EVIDENCE_LISTEN=127.0.0.1:{port}: cannot listen there" in message
    assert "port 0 takes any free one" in message

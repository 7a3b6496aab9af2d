"""core.engine.redaction: values and credential shapes masked; ordinary text left alone."""

from __future__ import annotations

import pytest

from core.engine.redaction import Redactor, adapter_redactor, secret_values
from core.models import AdapterSpec, url_credentials

SHAPED = {
    "github classic": "ghp_" + "a1B2" * 9,
    "github fine-grained": "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEF",
    "anthropic": "sk-ant-api03-" + "x9" * 20,
    "openai project": "sk-proj-" + "Yz" * 16,
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "slack": "xoxb-1234-5678-abcdefghijkl",
    "gitlab": "glpat-" + "A1b2C3d4E5" * 2,
}


@pytest.mark.parametrize("name", sorted(SHAPED))
def test_known_credential_shapes_are_masked_without_being_told(name: str) -> None:
    token = SHAPED[name]
    out = Redactor()(f"error: token {token} rejected")
    assert token not in out and out.startswith("error: token [REDACTED") and "rejected" in out


def test_bearer_headers_url_userinfo_and_key_blocks() -> None:
    r = Redactor()
    assert r("Authorization: Bearer abc.def-ghi_jkl123") == (
        "Authorization: Bearer [REDACTED:bearer token]"
    )
    out = r("clone https://user:hunter22@example.com/r.git failed")
    assert out == "clone https://[REDACTED:url userinfo]@example.com/r.git failed"
    block = "x\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\nabc\n-----END EC PRIVATE KEY-----\ny"
    assert r(block) == "x\n[REDACTED:private key]\ny"


def test_ordinary_text_hashes_and_paths_are_left_alone() -> None:
    text = (
        "commit 8f3c2a1b9d0e4f5a6b7c8d9e0f1a2b3c4d5e6f7a sha256 "
        + "ab" * 32
        + " in /usr/lib/python3/site-packages/foo.py, git@github.com:org/repo.git"
    )
    assert Redactor()(text) == text


def test_values_in_every_form_a_traceback_or_url_shows_them() -> None:
    secret = "p@ss/w'rd-12345"
    r = Redactor({"MY_KEY": secret})
    for shown in (secret, repr(secret)[1:-1], "p%40ss%2Fw%27rd-12345"):
        assert r(f"got {shown}!") == "got [REDACTED:MY_KEY]!"


def test_short_values_are_not_masked() -> None:
    assert Redactor({"X": "abc"})("abc abc") == "abc abc"


def test_models_and_nested_values_are_walked() -> None:
    r = Redactor(["s3cr3t-value"])
    assert r.value({"a": ["x s3cr3t-value", ("s3cr3t-value",)], "n": 3}) == {
        "a": ["x [REDACTED]", ("[REDACTED]",)],
        "n": 3,
    }
    merged = r.merge(Redactor({"B": "other-secret"}))
    assert merged("s3cr3t-value other-secret") == "[REDACTED] [REDACTED:B]"


def test_an_adapters_secrets_are_its_pass_env_and_secret_named_env() -> None:
    adapter = AdapterSpec(
        id="a",
        kind="process",
        command=["x"],
        pass_env=["TOOL_KEY", "ABSENT"],
        env={"API_TOKEN": "literal-token-1", "MODE": "fast-mode-value"},
    )
    parent = {"TOOL_KEY": "from-parent-123", "OTHER": "not-passed-456"}
    assert secret_values(adapter.pass_env, adapter.env, parent) == {
        "TOOL_KEY": "from-parent-123",
        "API_TOKEN": "literal-token-1",
    }
    r = adapter_redactor(adapter, parent)
    assert r("from-parent-123 literal-token-1 fast-mode-value not-passed-456") == (
        "[REDACTED:TOOL_KEY] [REDACTED:API_TOKEN] fast-mode-value not-passed-456"
    )
    assert r.contains_value(b"xx from-parent-123 yy") and not r.contains_value(b"nothing")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://user:pw@host/r.git", "a password (user:password@)"),
        ("https://ghp_token@github.com/o/r.git", "a user name or token (token@)"),
        ("ssh://git:pw@host/r.git", "a password (user:password@)"),
        ("ssh://git@host/r.git", None),
        ("git@github.com:o/r.git", None),
        ("https://host/path/with@at", None),
        ("repos/local", None),
    ],
)
def test_repository_urls_with_credentials(url: str, problem: str | None) -> None:
    assert url_credentials(url) == problem


def test_a_refused_repository_url_is_not_repeated_in_the_error() -> None:
    from pydantic import ValidationError

    from core.models import TaskSpec

    with pytest.raises(ValidationError) as exc:
        TaskSpec(task_id="t", prompt="p", repo="https://u:hunter2@h/r", base_commit="a" * 40)
    assert "hunter2" not in str(exc.value) and "carries a password" in str(exc.value)

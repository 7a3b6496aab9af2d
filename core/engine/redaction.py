"""Masking secrets before anything is written: one :class:`Redactor` per attempt.

Why: an adapter gets its own API key (``pass_env``, secret env values) and may print it,
echo it in a traceback or put it in an error message; from there it would reach the task
log, the console, failure messages, DB rows, the ledger, the results file and events. Every
sink therefore sees text only after a redactor has masked

* the *values* of every secret the adapter was given (exact strings; also their URL-quoted
  and ``repr`` forms, which tracebacks and URLs use), and
* well-known credential *shapes*, whoever printed them: the detectors of Yelp's
  ``detect-secrets`` (AWS, GitHub, GitLab, Slack, Stripe, npm, PyPI, JWT, ... kept up to
  date there, we only read their ``denylist`` patterns), plus what it lacks: current
  provider API keys (``sk-...``, ``sk-ant-...``, ``sk-proj-...``), fine-grained GitHub
  tokens (``github_pat_``), ``Bearer`` headers, userinfo in URLs and whole private-key
  blocks (detect-secrets flags only their first line).

Why detect-secrets' patterns and not its scanner: the scanner reports findings per line and
yields the *capture group* of some patterns (``ghp`` for a GitHub token), which is right for
a report and wrong for masking; its entropy and keyword plugins would mask commit hashes and
half of every log. We mask the whole match of the curated regex detectors, in one compiled
alternation (one pass per string, fast enough for a flooding adapter).

Values shorter than :data:`MIN_SECRET_CHARS` are not masked (masking ``"1"`` would destroy
every log); name such a value in an issue rather than rely on masking.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector
from pydantic import BaseModel

from core.models import AdapterSpec, GateCheck

MIN_SECRET_CHARS = 4
MASK = "[REDACTED]"

#: Env var names whose values count as secrets when set literally in an adapter's ``env``
#: (``pass_env`` values always do: listing a name there is how an adapter gets a key).
SECRET_NAME = re.compile(
    r"KEY|TOKEN|SECRET|PASSW|PWD|CREDENTIAL|AUTH|PRIVATE|COOKIE|SESSION|PAT\b", re.IGNORECASE
)

#: detect-secrets' regex detectors whose shapes are specific enough to mask in logs
#: (Artifactory, keyword, entropy and IP detectors are left out: they match ordinary text).
DETECTORS: tuple[type[RegexBasedDetector], ...] = (
    AWSKeyDetector,
    AzureStorageKeyDetector,
    BasicAuthDetector,
    DiscordBotTokenDetector,
    GitHubTokenDetector,
    GitLabTokenDetector,
    JwtTokenDetector,
    MailchimpDetector,
    NpmDetector,
    OpenAIDetector,
    PypiTokenDetector,
    SendGridDetector,
    SlackDetector,
    SquareOAuthDetector,
    StripeDetector,
    TelegramBotTokenDetector,
    TwilioKeyDetector,
)

#: Shapes detect-secrets lacks, tried first (name, pattern, group to mask: 0 = whole match).
OWN_SHAPES: tuple[tuple[str, str, int], ...] = (
    (
        "private key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----(?s:.*?)-----END [A-Z0-9 ]*"
        r"PRIVATE KEY[A-Z ]*-----",
        0,
    ),
    ("url userinfo", r"(?i:\b[a-z][a-z0-9+.-]*://)([^/\s:@\"'<>]+(?::[^/\s@\"'<>]*)?)@", 1),
    ("bearer token", r"(?i:\bbearer\s+)([A-Za-z0-9._~+/=-]{8,})", 1),
    ("api key", r"\bsk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", 0),
    ("github token", r"\bgithub_pat_[A-Za-z0-9_]{22,}", 0),
    ("github token", r"\bgh[pousr]_[A-Za-z0-9_]{30,}", 0),
    ("aws key", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b", 0),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", 0),
)
_PRIVATE_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----")
_PRIVATE_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----")

_INLINE = {re.IGNORECASE: "i", re.MULTILINE: "m", re.DOTALL: "s", re.VERBOSE: "x"}


def _scoped(pattern: re.Pattern[str]) -> str:
    flags = "".join(letter for flag, letter in _INLINE.items() if pattern.flags & flag)
    return f"(?{flags}:{pattern.pattern})" if flags else f"(?:{pattern.pattern})"


def _shape_regex() -> re.Pattern[str]:
    parts = []
    for index, (_, pattern, group) in enumerate(OWN_SHAPES):
        # each own shape as a named group; the part to mask is found again below
        parts.append(f"(?P<own{index}_{group}>{pattern})")
    for detector in DETECTORS:
        for pattern in detector.denylist:  # type: ignore[attr-defined]  # a class attribute
            # their capture groups only confuse the alternation: the whole match is masked
            parts.append(re.sub(r"(?<!\\)\((?!\?)", "(?:", _scoped(pattern)))
    return re.compile("|".join(parts))


_SHAPES = _shape_regex()
#: Every shape needs one of these; most log lines have none and skip the full scan (which
#: tries each alternative at every position).
_MAYBE = re.compile(r"[A-Za-z0-9_+/=.-]{16,}|://|xox|_authToken|PRIVATE KEY|PuTTY|(?i:bearer)")
_OWN = [(name, re.compile(p), g) for name, p, g in OWN_SHAPES]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def _variants(value: str) -> set[str]:
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    forms.add(repr(value)[1:-1])
    return {f for f in forms if len(f) >= MIN_SECRET_CHARS}


class Redactor:
    """Masks given secret values and known credential shapes in text and records.

    Immutable after construction; :meth:`__call__` is safe to share between threads.
    """

    def __init__(
        self,
        values: Mapping[str, str] | Iterable[str] = (),
        *,
        shapes: bool = True,
        pairs: Iterable[tuple[str | None, str]] = (),
    ) -> None:
        """``values``: secret values, by env var name (the name labels the mask) or bare;
        ``pairs``: (name or None, value) as :attr:`pairs` gives them."""
        named: Iterable[tuple[str | None, str]] = (
            values.items() if isinstance(values, Mapping) else ((None, v) for v in values)
        )
        self.pairs: tuple[tuple[str | None, str], ...] = (*named, *pairs)
        self.shapes = shapes
        self._labels: dict[str, str] = {}
        for name, value in self.pairs:
            for form in _variants(value) if value else ():
                self._labels.setdefault(form, f"{MASK[:-1]}:{name}]" if name else MASK)
        ordered = sorted(self._labels, key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @property
    def secret_count(self) -> int:
        return len(self._labels)

    def merge(self, other: Redactor) -> Redactor:
        """Masks what either masks."""
        return Redactor(shapes=self.shapes or other.shapes, pairs=(*self.pairs, *other.pairs))

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._values is not None:
            text = self._values.sub(lambda m: self._labels[m.group(0)], text)
        if self.shapes and _MAYBE.search(text):
            text = _SHAPES.sub(_mask_shape, text)
        return text

    def contains_value(self, data: bytes) -> bool:
        """Whether ``data`` holds the raw value of a secret (used to flag a diff)."""
        return any(form.encode() in data for form in self._labels)

    def value(self, obj: T) -> T:
        """``obj`` with every string inside (dicts, lists, tuples) redacted."""
        return _walk(obj, self)  # type: ignore[no-any-return]

    def model(self, model: M) -> M:
        """A pydantic model with every string field redacted (validated again)."""
        data = model.model_dump(mode="json")
        redacted = _walk(data, self)
        return model if redacted == data else type(model).model_validate(redacted)

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


def _mask_shape(match: re.Match[str]) -> str:
    for group, value in match.groupdict().items():
        if value is None:
            continue
        index, part = (int(x) for x in group[3:].split("_"))
        if part == 0:
            return f"[REDACTED:{OWN_SHAPES[index][0]}]"
        inner = _OWN[index][1].fullmatch(value)
        assert inner is not None
        start, end = inner.span(part)
        return f"{value[:start]}[REDACTED:{OWN_SHAPES[index][0]}]{value[end:]}"
    return MASK


def _walk(obj: Any, redact: Redactor) -> Any:
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: _walk(v, redact) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, redact) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_walk(v, redact) for v in obj)
    return obj


class StreamRedactor:
    """Line by line, for one output stream: also masks the body lines of a private key
    block, which no single line shows to be secret."""

    def __init__(self, redactor: Redactor) -> None:
        self._redact = redactor
        self._in_key = False

    def __call__(self, line: str) -> str:
        if self._in_key:
            if _PRIVATE_END.search(line):
                self._in_key = False
            return "[REDACTED:private key]"
        if (begin := _PRIVATE_BEGIN.search(line)) and not _PRIVATE_END.search(line, begin.end()):
            self._in_key = True
            return self._redact(line[: begin.start()]) + "[REDACTED:private key]"
        return self._redact(line)


#: Shapes only: for sinks that know no attempt's secrets (and the default everywhere).
SHAPES_ONLY = Redactor()


def secret_values(
    pass_env: Iterable[str],
    env: Mapping[str, str],
    parent_env: Mapping[str, str],
    *,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The secrets an adapter receives, by name: every ``pass_env`` value, and literal
    ``env`` values (and ``extra``, e.g. gate check env) whose names look secret."""
    values = {name: parent_env[name] for name in pass_env if parent_env.get(name)}
    for source in (env, extra or {}):
        values.update({k: v for k, v in source.items() if v and SECRET_NAME.search(k)})
    return values


def adapter_redactor(
    adapter: AdapterSpec,
    parent_env: Mapping[str, str],
    gate_checks: Iterable[GateCheck] = (),
) -> Redactor:
    """The redactor of one attempt: the secrets ``adapter`` receives from ``parent_env``
    (and secret-looking gate check env values), plus every known credential shape."""
    extra: dict[str, str] = {}
    for check in gate_checks:
        extra.update(check.env)
    return Redactor(secret_values(adapter.pass_env, adapter.env, parent_env, extra=extra))

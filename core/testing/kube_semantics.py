"""The API server's rules the fake needs: label selectors, JSON merge patch, name and label
validation, timestamps.

Hand-written on purpose: the Kubernetes Python client has no selector parser or validators
(they live in the Go apimachinery), and RFC 7386 merge patch is ten lines; a dependency for
either would be larger than the code. The messages copy the API server's wording, so a test
reading an error message reads the same text from the fake as from a cluster.
"""

from __future__ import annotations

import base64
import copy
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import RejectedError
from core.kube.api import ResourceType

# apimachinery/pkg/util/validation
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def timestamp(now: datetime) -> str:
    """metav1.Time: RFC 3339, seconds, UTC."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------- validation


def name_problems(name: str, max_length: int = 253) -> list[str]:
    problems = []
    if len(name) > max_length:
        problems.append(f"must be no more than {max_length} characters")
    if not DNS1123_SUBDOMAIN.match(name):
        problems.append(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
            "characters, '-' or '.', and must start and end with an alphanumeric character"
        )
    return problems


def label_problems(labels: dict[str, Any] | None, where: str) -> list[str]:
    """Problems of a label map, each as ``<field>: Invalid value: ...`` like the API server."""
    out = []
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        key_ok = (
            0 < len(name) <= 63
            and _QUALIFIED_NAME.match(name) is not None
            and (not prefix or (len(prefix) <= 253 and DNS1123_SUBDOMAIN.match(prefix)))
        )
        if not key_ok:
            out.append(f'{where}: Invalid value: "{key}": name part must be a valid label key')
        if not isinstance(value, str):
            out.append(f"{where}: Invalid value: {value!r}: label values must be strings")
            continue
        if len(value) > 63:
            out.append(f'{where}: Invalid value: "{value}": must be no more than 63 characters')
        if not _LABEL_VALUE.match(value):
            out.append(
                f'{where}: Invalid value: "{value}": a valid label must be an empty string or '
                "consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                "with an alphanumeric character"
            )
    return out


MAX_CONFIG_BYTES = 1024 * 1024  # ConfigMaps and Secrets (corev1 MaxSecretSize)


def size_problems(plural: str, obj: dict[str, Any]) -> list[str]:
    """A ConfigMap's (or Secret's) values may hold 1 MiB in all (keys not counted)."""
    if plural not in ("configmaps", "secrets"):
        return []
    total = 0
    for value in (obj.get("data") or {}).values():
        total += len(value.encode() if plural == "configmaps" else base64.b64decode(value))
    for value in (obj.get("binaryData") or {}).values():
        total += len(base64.b64decode(value))
    if total > MAX_CONFIG_BYTES:
        return [f"[]: Too long: must have at most {MAX_CONFIG_BYTES} bytes"]
    return []


def invalid(rt: ResourceType, name: str, problems: list[str], verb: str) -> RejectedError:
    """The 422 the API server answers for an invalid object."""
    kind = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    return RejectedError(
        f'{kind} "{name}" is invalid: {"; ".join(problems)}',
        status=422,
        reason="Invalid",
        verb=verb,
        resource=rt.plural,
        name=name,
    )


# --------------------------------------------------------------------------- label selectors


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        has, value = self.key in labels, labels.get(self.key)
        match self.op:
            case "=":
                return has and value in self.values
            case "!=":
                return not has or value not in self.values
            case "in":
                return has and value in self.values
            case "notin":
                return not has or value not in self.values
            case "exists":
                return has
            case _:
                return not has


_SET = re.compile(r"^\s*([^\s!=,()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ = re.compile(r"^\s*([^\s!=,()]+)\s*(==|=|!=)\s*([^\s,()]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([^\s!=,()]+)\s*$")


def parse_selector(selector: str | None) -> list[Requirement]:
    """A label selector string (``a=b,c!=d,e in (f,g),!h,i``); 400 when it does not parse."""
    if not selector or not selector.strip():
        return []
    out = []
    for part in _split(selector):
        if m := _SET.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            out.append(Requirement(m.group(1), m.group(2), values))
        elif m := _EQ.match(part):
            op = "!=" if m.group(2) == "!=" else "="
            out.append(Requirement(m.group(1), op, frozenset({m.group(3)})))
        elif m := _EXISTS.match(part):
            out.append(Requirement(m.group(2), "!" if m.group(1) else "exists"))
        else:
            raise RejectedError(
                f'unable to parse requirement: found "{part.strip()}", expected a requirement',
                status=400,
                reason="BadRequest",
                verb="list",
            )
    return out


def _split(selector: str) -> list[str]:
    """Split on the commas that are not inside ``( )``."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def selector_matches(requirements: list[Requirement], obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in requirements)

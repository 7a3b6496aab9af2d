"""Value rules of the Kubernetes API: object names, Secret references, reserved env names,
quantities, CIDRs, image references and repository URLs.

Apart from :mod:`core.resources` (which uses them on its fields) because each is a
:class:`~core.rules.Rule` with a CEL form and a Python twin, and several of the twins are
hand-written parsers whose agreement with the API server is the point: the e2e tests feed
both the same values (tests/api_cases.py).
"""

from __future__ import annotations

import ipaddress
import re

from core.models import IDENTIFIER_PATTERN, url_credentials
from core.rules import Rule, cel_string
from core.rules import matches as rules_matches

# --------------------------------------------------------------------------- names

#: A DNS subdomain (RFC 1123): what Kubernetes requires of a Secret's name.
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 (a pattern, not a secret)
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)


def name_rule(kind: str, why: str) -> Rule:
    """``metadata.name`` of a ``kind`` must be a DNS label (an object-level rule of the CRD)."""
    return Rule(
        cel=f"self.metadata.name.matches({cel_string(IDENTIFIER_PATTERN)})",
        message=f"metadata.name of {kind} objects must be a DNS label: lower-case letters, digits "
        f"and '-', at most 63 characters, starting and ending with a letter or digit ({why})",
        check=lambda name: _IDENTIFIER.fullmatch(name) is not None,
        field_path=".metadata.name",
    )


#: Checked by the API server at the CRD's root; the operator's twin: core.kube.validation.
TASK_EXECUTION_NAME_RULE = name_rule(
    "TaskExecution",
    "it is the default task id and a label value, and starts the names of its Jobs",
)
ADAPTER_NAME_RULE = name_rule(
    "Adapter", "it is the adapter's id, a label value of its pods and names its NetworkPolicy"
)


#: ``spec.queueName`` of a TaskExecution: a Kueue LocalQueue's name (a DNS label), which the
#: operator puts into its Jobs' ``kueue.x-k8s.io/queue-name`` label.
QUEUE_NAME_RULE = Rule(
    cel=f"self.matches({cel_string(IDENTIFIER_PATTERN)})",
    message="spec.queueName must be the name of a Kueue LocalQueue in the task's namespace, a "
    "DNS label: lower-case letters, digits and '-', at most 63 characters, starting and ending "
    "with a letter or digit",
    check=lambda name: _IDENTIFIER.fullmatch(name) is not None,
)

#: Environment variables the runner sets itself in adapter pods; an Adapter may not set them.
RESERVED_ENV_PREFIX = "ORCHESTRATOR_"


# --------------------------------------------------------------------------- quantities, CIDRs

_QUANTITY = re.compile(
    r"^[+]?(?P<number>[0-9]+(?:[.][0-9]*)?|[.][0-9]+)(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)


def _positive_quantity(text: str) -> bool:
    """A Kubernetes quantity above zero (the grammar of ``resource.Quantity``).

    Hand-written rather than the kubernetes client's ``parse_quantity`` because this layer
    must not import the client, and the question is only "is this a quantity above zero".
    """
    found = _QUANTITY.fullmatch(text)
    return found is not None and any(c in "123456789" for c in found["number"])


def quantity_rule(what: str) -> Rule:
    return Rule(
        cel="isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
        message=f"{what} must be a Kubernetes quantity above zero, e.g. "
        + ("500m or 2" if what == "cpu" else "512Mi or 2Gi"),
        check=_positive_quantity,
    )


def _canonical_cidr(text: str) -> bool:
    """An IPv4 or IPv6 CIDR whose host bits are zero (what CEL's ``cidr()`` accepts)."""
    if "/" not in text or "%" in text:
        return False
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return False
    prefix = text.rsplit("/", 1)[1]
    if prefix != str(int(prefix)) or text != text.strip():
        return False
    return not (isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped)


CIDR_RULE = Rule(
    cel="isCIDR(self) && cidr(self).ip() == cidr(self).masked().ip()",
    message="must be a CIDR with its host bits zero, e.g. 10.0.0.0/8, 192.0.2.10/32 or "
    "2001:db8::/32",
    check=_canonical_cidr,
)


# --------------------------------------------------------------------------- images, repositories

_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REPO_PART = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
#: An image reference (the grammar of distribution/reference, which the kubelet applies).
IMAGE_PATTERN = (
    rf"^(?:(?:{_DOMAIN_PART}(?:[.]{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?/)?"
    rf"{_REPO_PART}(?:/{_REPO_PART})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
IMAGE_RULE = rules_matches(
    IMAGE_PATTERN,
    "must be an image reference such as registry.example/team/aider:1.2 (lower-case "
    "repository path, optional :tag and @sha256:digest)",
)


#: Where runner pods can clone from: a URL with a scheme git understands without helpers.
REPO_PATTERN = r"^(https?|git|ssh|file)://[^\x00-\x20\x7f]+$"
REPO_RULE = rules_matches(
    REPO_PATTERN,
    "must be a git URL the pods can clone: https://, http://, git://, ssh:// (or file:// "
    "inside the runner image), without spaces",
)

#: A repository URL carrying a credential (the same test as the embedded entry contract's
#: :func:`core.models.url_credentials`, for the schemes ``spec.source.repo`` admits): a
#: password in its userinfo, or any userinfo (a token) on http(s). Searched, not matched
#: whole, by both sides.
_URL_PASSWORD = r"^[a-zA-Z][-a-zA-Z0-9+.]*://[^/]*:[^/]*@" # noqa: S105 (a pattern, not a secret)
_URL_HTTP_USER = r"(?i)^https?://[^/]*@"
_URL_CREDENTIALS = (re.compile(_URL_PASSWORD), re.compile(_URL_HTTP_USER))
#: How git access is given instead (said by both rules below).
NO_CREDENTIALS_HINT = (
    "runner pods clone without credentials: serve the repository where they reach it without "
    "any (an in-cluster git server or mirror, admitted by the runner NetworkPolicy)"
)
REPO_CREDENTIALS_RULE = Rule(
    cel=f"!self.matches({cel_string(_URL_PASSWORD)}) && "
    f"!self.matches({cel_string(_URL_HTTP_USER)})",
    message="must not carry credentials (user:password@ or token@): they would be stored in "
    f"the resource, the database, the ledger and the logs; {NO_CREDENTIALS_HINT}",
    check=lambda value: not any(r.match(value) for r in _URL_CREDENTIALS),
    explain=lambda value: f"must not carry credentials ({url_credentials(value) or 'userinfo'}): "
    "they would be stored in the resource, the database, the ledger and the logs; "
    f"{NO_CREDENTIALS_HINT}",
)
CREDENTIALS_REF_MESSAGE = (
    "credentialsSecretRef is not supported (it was never used for cloning) and is refused "
    f"rather than ignored; remove it: {NO_CREDENTIALS_HINT}"
)

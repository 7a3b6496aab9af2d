"""The operator's redactor for one attempt: what the operator itself can mask.

Why a separate answer from the runner's: the runner in the pod sees the adapter's whole
environment, Secret values included, and masks them in its log and in every text of its
report (:func:`core.engine.redaction.adapter_redactor`). The operator reads no Secret (the
chart grants it none): an Adapter's ``env`` entry with ``secretKeyRef`` is known to it only
by reference, so it cannot mask that value itself and relies on the runner's masking for
it. What it can mask, before the recorder writes the attempt (ledger, database, results,
status, Events):

* literal ``env`` values of the Adapter (and of the gate checks) whose names look secret
  (``KEY``, ``TOKEN``, ``SECRET``, ``PASSW``, ...): the same rule as the embedded backend;
* every well-known credential shape (provider API keys, GitHub and cloud tokens, bearer
  headers, URL userinfo, private keys), whoever printed it.

Messages the operator writes itself (a Job's failure reason, a pod's waiting message, an
evidence problem) go through the same redactor in the lifecycle's ``conclude``.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.engine.redaction import Redactor, secret_values
from core.models import GateCheck
from core.resources import AdapterResourceSpec


def operator_redactor(
    adapter: AdapterResourceSpec | None, gate_checks: Iterable[GateCheck] = ()
) -> Redactor:
    literal = {v.name: v.value for v in (adapter.env if adapter else []) if v.value}
    extra: dict[str, str] = {}
    for check in gate_checks:
        extra.update(check.env)
    return Redactor(secret_values((), literal, {}, extra=extra))

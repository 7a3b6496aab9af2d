"""API errors for a chaos run: seeded faults through the fault proxy (issue 11).

The operator's kubeconfig points at :class:`~tests.e2e.fault_proxy.FaultProxy`; at the moments
the run chooses, :meth:`ApiFaults.inject` adds a rule that fails the next one to three calls of
a kind the operator makes (a status write, a Job create, a pod-log read, a Lease renewal ...)
the way an API server or the network does: 500, 503, 429, or a connection dropped without an
answer; half of the faults on writes come *after* the API server acted (the write happened,
the operator saw it fail: the case that makes a retry write twice). What was actually served is counted from the proxy's own record, not from the plan:
a rule whose calls never came adds nothing to ``fired``.
"""

from __future__ import annotations

import random
from collections import Counter

from tests.e2e.fault_proxy import FaultProxy, Rule

#: (verb, resource) of the operator's calls; None: whatever call comes next.
TARGETS: tuple[tuple[str | None, str | None], ...] = (
    ("patch", "taskexecutions/status"),
    ("get", "taskexecutions"),
    ("create", "jobs"),
    ("get", "jobs"),
    ("list", "pods"),
    ("get", "pods/log"),
    ("create", "configmaps"),
    ("get", "configmaps"),
    ("create", "events"),
    ("update", "leases"),
    ("get", "leases"),
    ("watch", "taskexecutions"),
    ("watch", "jobs"),
    (None, None),
)
WRITES = frozenset({"create", "update", "patch", "delete"})
#: HTTP statuses of the faults; None drops the connection (no answer at all).
STATUSES: tuple[int | None, ...] = (500, 503, 429, None)


class ApiFaults:
    def __init__(self, kubeconfig: str, rng: random.Random) -> None:
        self.proxy = FaultProxy(kubeconfig)
        self.rng = rng
        self.rules: list[Rule] = []

    @property
    def kubeconfig(self) -> str:
        """The operator's kubeconfig: every call goes through the proxy."""
        return self.proxy.kubeconfig

    def start(self) -> ApiFaults:
        self.proxy.start()
        return self

    def stop(self) -> None:
        self.proxy.stop()

    def inject(self) -> Rule:
        verb, resource = self.rng.choice(TARGETS)
        rule = Rule(
            verb=verb,
            resource=resource,
            nth=1,
            times=self.rng.randint(1, 3),
            status=self.rng.choice(STATUSES),
            after=verb in WRITES and self.rng.random() < 0.5,
        )
        self.rules.append(self.proxy.add(rule))
        return rule

    def fired(self) -> int:
        """Calls that met a fault (answered with an error or dropped)."""
        return sum(rule.fired for rule in self.rules)

    def by_call(self) -> dict[str, int]:
        """Faults served per ``verb resource`` and status ("drop": no answer)."""
        out: Counter[str] = Counter()
        for rule in self.rules:
            if rule.fired:
                what = f"{rule.verb or '*'} {rule.resource or '*'}"
                when = " after" if rule.after else ""
                out[f"{what} {rule.status or 'drop'}{when}"] += rule.fired
        return dict(sorted(out.items()))

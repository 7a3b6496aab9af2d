"""Each Adapter's egress NetworkPolicy, kept in line with ``spec.egress``.

The policy is the operator's only when it says so (owner reference to the Adapter and the
managed-by label, :func:`core.kube.jobs.is_own_egress_policy`): a policy of that name made by
someone else is reported on the Adapter and never changed, also not after a 409 on create.
Clearing ``spec.egress`` patches the operator's policy to no rules (the allowance goes);
with no policy and no rules nothing is created (an empty policy would isolate the pods).
"""

from __future__ import annotations

from collections.abc import Sequence

from core.kube.api import Body, KubeApi
from core.kube.jobs import egress_policy, egress_policy_action, egress_policy_name
from core.resources import AdapterResourceSpec

POLICIES = "networkpolicies"


class EgressPolicies:
    def __init__(self, api: KubeApi, extra: Sequence[Body] = ()) -> None:
        """``extra``: egress rules every Adapter's policy also carries (the evidence store:
        a pod selected by a policy may reach only what the policies list)."""
        self.api = api
        self.extra = tuple(extra)
        self._done: set[tuple[str, str, str, int | None]] = set()

    async def ensure(self, adapter: Body, spec: AdapterResourceSpec) -> None:
        """Bring the policy in line with this generation of the Adapter (once per change)."""
        meta = adapter["metadata"]
        mark = (meta["namespace"], meta["name"], str(meta.get("uid")), meta.get("generation"))
        if mark in self._done:
            return
        name = egress_policy_name(meta["name"])
        existing = await self.api.get_object(POLICIES, meta["namespace"], name)
        action = egress_policy_action(existing, adapter, spec, self.extra)
        if action == "create":
            body = egress_policy(adapter, spec, self.extra)
            await self.api.create_object(POLICIES, meta["namespace"], body)
            return  # created, or raced with someone: decide again on the next step
        if action == "patch" and existing is not None:
            await self.api.patch_object(
                POLICIES,
                meta["namespace"],
                name,
                {"spec": egress_policy(adapter, spec, self.extra)["spec"]},
                resource_version=existing["metadata"]["resourceVersion"],
            )
        elif action == "foreign":
            await self.api.post_event(
                adapter,
                "Warning",
                "ForeignNetworkPolicy",
                f"NetworkPolicy {name} exists and is not this Adapter's: left alone, so "
                "spec.egress is not applied; rename or delete it",
                "Egress",
            )
        self._done.add(mark)

"""What the API server does to a custom resource with a structural schema, silently.

Pruning (fields the schema does not declare are dropped, so is ``null`` where the schema does
not allow it) and defaulting (an absent property with a ``default`` gets it, where its parent
object exists) change what a client reads back without any error: a controller that writes
an undeclared status field would see it on a fake that keeps everything and lose it on a
cluster. So the fake applies both, from the CRDs the project generates (:mod:`core.crd`).
Of the CEL rules only the transition rule ``self == oldSelf`` (an immutable field) is
evaluated; the others, and type/enum validation, fail loudly on a real cluster and are left
to the contract and e2e tests.

Hand-written: the rules are those of apiextensions-apiserver (``pkg/apiserver/schema/pruning``
and ``.../defaulting``), which have no Python implementation.
"""

from __future__ import annotations

import copy
from typing import Any

Schema = dict[str, Any]
_ROOT_KEEP = ("apiVersion", "kind", "metadata")


def project_schemas() -> dict[str, Schema]:
    """The openAPIV3Schema of each of the project's CRDs, by plural."""
    from core.crd import adapter_crd, task_execution_crd

    out: dict[str, Schema] = {}
    for crd in (task_execution_crd(), adapter_crd()):
        schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        out[crd["spec"]["names"]["plural"]] = schema
    return out


def structural(schema: Schema, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` pruned and defaulted by ``schema`` (metadata is the API server's, kept)."""
    out = {k: v for k, v in obj.items() if k in _ROOT_KEEP}
    rest = {k: v for k, v in obj.items() if k not in _ROOT_KEEP}
    out.update(_apply({**schema, "properties": _without_root(schema)}, rest))
    return out


def immutable_violations(schema: Schema, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The ``self == oldSelf`` rules of the top-level properties that ``new`` breaks."""
    problems = []
    for name, prop in (schema.get("properties") or {}).items():
        for rule in prop.get("x-kubernetes-validations") or []:
            if rule.get("rule") == "self == oldSelf" and old.get(name) != new.get(name):
                problems.append(f"{name}: Invalid value: {rule.get('message', rule['rule'])}")
    return problems


def _without_root(schema: Schema) -> Schema:
    return {k: v for k, v in (schema.get("properties") or {}).items() if k not in _ROOT_KEEP}


def _apply(schema: Schema, value: Any) -> Any:
    if isinstance(value, dict) and (
        schema.get("type") == "object" or "properties" in schema or "additionalProperties" in schema
    ):
        return _object(schema, value)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [None if v is None else _apply(schema["items"], v) for v in value]
    return value


def _object(schema: Schema, value: dict[str, Any]) -> dict[str, Any]:
    props: Schema = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or extra is True
    out: dict[str, Any] = {}
    for key, item in value.items():
        sub = props.get(key, extra if isinstance(extra, dict) else None)
        if sub is None:
            if keep_unknown:
                out[key] = item
            continue
        if item is None:
            if sub.get("nullable"):
                out[key] = None
            continue  # a null the schema does not allow is pruned (then maybe defaulted)
        out[key] = _apply(sub, item)
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = _apply(sub, copy.deepcopy(sub["default"]))
    return out

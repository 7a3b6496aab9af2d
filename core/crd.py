"""CustomResourceDefinitions generated from :mod:`core.resources`.

pydantic's JSON Schema is not a structural OpenAPI v3 schema: it uses ``$defs``/``$ref``,
``anyOf [X, null]`` for optionals, ``const``, numeric ``exclusiveMinimum`` and
``additionalProperties: false``, all of which the API server rejects or ignores. This module
rewrites it: references are inlined, optionals become ``nullable``, bounds use the OpenAPI
v3.0 forms, unknown fields are rejected by the API server's strict field validation instead
of ``additionalProperties: false``, and CEL rules are added for cross-field checks. The
result is applied to a real API server in the e2e tests.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from core.resources import (
    GROUP,
    VERSION,
    AdapterResourceSpec,
    AdapterResourceStatus,
    TaskExecutionSpec,
    TaskExecutionStatus,
)

Schema = dict[str, Any]

_DROP = {"title", "$schema"}


def _resolve(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _resolve(v, defs) for name, v in value.items()}
        else:
            out[key] = _resolve(value, defs)
    return _structural(out)


def _structural(node: Schema) -> Schema:
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) != len(any_of):
            node["nullable"] = True
        if len(options) == 1:
            merged = {**options[0], **node}
            node = merged
        else:
            node["anyOf"] = options
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[plain] = node[bound]
            node[bound] = True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    if (
        node.get("type") == "object"
        and "properties" not in node
        and "additionalProperties" not in node
    ):
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "default" in node and node["default"] is None:
        node.pop("default")
    return node


def openapi_schema(model: type[BaseModel], mode: str) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[arg-type]
    defs = raw.get("$defs", {})
    resolved: Schema = _resolve(raw, defs)
    return resolved


def _conditions(schema: Schema) -> None:
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]


TASK_EXECUTION_RULES = [
    {
        "rule": "!has(self.fallbackAdapterRefs) || "
        "self.fallbackAdapterRefs.all(f, f.name != self.adapterRef.name)",
        "message": "fallbackAdapterRefs must not repeat adapterRef",
        "fieldPath": ".fallbackAdapterRefs",
    },
]
ADAPTER_RULES = [
    {
        "rule": "self.kind != 'process' || (has(self.command) != has(self.template))",
        "message": "a process adapter needs exactly one of command or template",
    },
    {
        "rule": "self.kind == 'process' || (!has(self.command) && !has(self.template))",
        "message": "only process adapters take command or template",
    },
    {
        "rule": "!has(self.env) || self.env.all(e, has(e.value) != has(e.secretKeyRef))",
        "message": "each env entry needs exactly one of value or secretKeyRef",
        "fieldPath": ".env",
    },
]


def _crd(
    kind: str,
    plural: str,
    short: str,
    spec: type[BaseModel],
    status: type[BaseModel],
    rules: list[dict[str, str]],
    columns: list[dict[str, str]],
    description: str,
    *,
    immutable: bool,
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec, "validation")
    spec_schema["x-kubernetes-validations"] = list(rules)
    if immutable:
        spec_schema["x-kubernetes-validations"].insert(
            0,
            {
                "rule": "self == oldSelf",
                "message": "spec is immutable once created; create a new TaskExecution instead",
            },
        )
    status_schema = openapi_schema(status, "serialization")
    if "conditions" in status_schema.get("properties", {}):
        _conditions(status_schema)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["orchestrator"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def task_execution_crd() -> dict[str, Any]:
    return _crd(
        "TaskExecution",
        "taskexecutions",
        "tex",
        TaskExecutionSpec,
        TaskExecutionStatus,
        TASK_EXECUTION_RULES,
        [
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Adapter", "type": "string", "jsonPath": ".status.adapter"},
            {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "A routed coding task: run its adapter in a Job on a fresh checkout, then the test "
        "gate, and record the outcome in status.",
        immutable=True,
    )


def adapter_crd() -> dict[str, Any]:
    return _crd(
        "Adapter",
        "adapters",
        "adp",
        AdapterResourceSpec,
        AdapterResourceStatus,
        ADAPTER_RULES,
        [
            {"name": "Kind", "type": "string", "jsonPath": ".spec.kind"},
            {"name": "Breaker", "type": "string", "jsonPath": ".status.breakerState"},
            {"name": "Healthy", "type": "boolean", "jsonPath": ".status.healthy"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "How tasks are executed (an AI CLI, a script, a patch, a human), with its retry "
        "policy, circuit breaker and resources. status mirrors the circuit breaker.",
        immutable=False,
    )


def crd_files() -> dict[str, str]:
    header = "# Generated by `orchestrator schema generate` from core/resources.py; do not edit.\n"
    return {
        f"crds/{crd['metadata']['name']}.yaml": header
        + yaml.safe_dump(crd, sort_keys=False, width=100)
        for crd in (task_execution_crd(), adapter_crd())
    }

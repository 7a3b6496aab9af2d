"""CustomResourceDefinitions generated from :mod:`core.resources`.

pydantic's JSON Schema is not a structural OpenAPI v3 schema: it uses ``$defs``/``$ref``,
``anyOf [X, null]`` for optionals, ``const``, numeric ``exclusiveMinimum`` and
``additionalProperties: false``, all of which the API server rejects or ignores. This module
rewrites it: references are inlined, optionals become ``nullable``, bounds use the OpenAPI
v3.0 forms, unknown fields are rejected by the API server's strict field validation instead
of ``additionalProperties: false``. The CEL rules (``x-kubernetes-validations``) and list
types come from the models themselves (:mod:`core.rules`): each is checked by pydantic too.
This module adds only what no spec model can say: the rules on ``metadata.name`` at the
root and the immutability of a TaskExecution's spec. The result is applied to a real API
server in the e2e tests, which also feed it the objects the rules must refuse.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from core.api_rules import ADAPTER_NAME_RULE, TASK_EXECUTION_NAME_RULE
from core.integration_resources import INTEGRATION_NAME_RULE, IntegrationSpec, IntegrationStatus
from core.resources import (
    GROUP,
    VERSION,
    AdapterResourceSpec,
    AdapterResourceStatus,
    TaskExecutionSpec,
    TaskExecutionStatus,
)
from core.rules import CEL_KEY, Rule

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
        rules = target.get(CEL_KEY, []) + extra.get(CEL_KEY, [])
        merged = {**target, **extra}
        if rules:
            merged[CEL_KEY] = rules
        return _resolve(merged, defs)
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


def _crd(
    kind: str,
    plural: str,
    short: str,
    spec: type[BaseModel],
    status: type[BaseModel],
    root_rules: list[Rule],
    columns: list[dict[str, str]],
    description: str,
    *,
    immutable: bool,
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec, "validation")
    if immutable:
        spec_schema[CEL_KEY] = [
            {
                "rule": "self == oldSelf",
                "message": f"spec is immutable once created; create a new {kind} instead",
            },
            *spec_schema.get(CEL_KEY, []),
        ]
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
                            CEL_KEY: [rule.as_cel() for rule in root_rules],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                # declared so that the name rule can report its field
                                "metadata": {
                                    "type": "object",
                                    "properties": {"name": {"type": "string", "maxLength": 63}},
                                },
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
        [TASK_EXECUTION_NAME_RULE],
        [
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Adapter", "type": "string", "jsonPath": ".status.adapter"},
            {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "A routed coding task: run its adapter in a Job on a fresh checkout, then the test "
        "gate, and record the outcome in status. Its name is a DNS label (at most 63 "
        "characters): the default task id, a label value and the prefix of its Job names.",
        immutable=True,
    )


def adapter_crd() -> dict[str, Any]:
    return _crd(
        "Adapter",
        "adapters",
        "adp",
        AdapterResourceSpec,
        AdapterResourceStatus,
        [ADAPTER_NAME_RULE],
        [
            {"name": "Kind", "type": "string", "jsonPath": ".spec.kind"},
            {"name": "Breaker", "type": "string", "jsonPath": ".status.breakerState"},
            {"name": "Healthy", "type": "boolean", "jsonPath": ".status.healthy"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "How tasks are executed (an AI CLI, a script, a patch, a human), with its retry "
        "policy, circuit breaker and resources. status mirrors the circuit breaker. Its name "
        "is a DNS label (at most 63 characters): the adapter id and a label value of its pods.",
        immutable=False,
    )


def integration_crd() -> dict[str, Any]:
    return _crd(
        "Integration",
        "integrations",
        "itg",
        IntegrationSpec,
        IntegrationStatus,
        [INTEGRATION_NAME_RULE],
        [
            {"name": "Run", "type": "string", "jsonPath": ".spec.runId"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Merged", "type": "integer", "jsonPath": ".status.stats.merged"},
            {"name": "Conflict", "type": "integer", "jsonPath": ".status.stats.conflict"},
            {"name": "Gate-Failed", "type": "integer", "jsonPath": ".status.stats.gateFailed"},
            {"name": "Head", "type": "string", "jsonPath": ".status.headCommit"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "One run's integration branch: the run's COMPLETED TaskExecutions of this namespace "
        "merged in queue order onto a branch of their repository, the test gate re-run on the "
        "merged tree in gate Jobs (speculative batches, bisected on failure), the branch "
        "pushed; status mirrors integration_results.json. Its name is a DNS label.",
        immutable=True,
    )


def crd_files() -> dict[str, str]:
    header = "# Generated by `orchestrator schema generate` from core/resources.py; do not edit.\n"
    return {
        f"crds/{crd['metadata']['name']}.yaml": header
        + yaml.safe_dump(crd, sort_keys=False, width=100)
        for crd in (task_execution_crd(), adapter_crd(), integration_crd())
    }

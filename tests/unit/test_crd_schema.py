"""Structural pruning and defaulting as the fake API server applies them (the cluster's
answer for the project's CRDs is in tests/e2e/test_kube_api_contract.py)."""

from __future__ import annotations

from core.testing.crd_schema import immutable_violations, project_schemas, structural

SCHEMA = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "frozen"}],
            "properties": {
                "name": {"type": "string", "default": "none"},
                "maybe": {"type": "string", "nullable": True},
                "never": {"type": "string", "default": "d"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"a": {"type": "integer", "default": 1}},
                    },
                },
                "nested": {
                    "type": "object",
                    "properties": {"inner": {"type": "integer", "default": 7}},
                },
            },
        },
        "status": {"type": "object", "properties": {"state": {"type": "string", "default": "P"}}},
    },
}


def test_unknown_fields_are_pruned_and_defaults_fill_existing_parents() -> None:
    obj = {
        "apiVersion": "v",
        "kind": "K",
        "metadata": {"name": "x", "anything": {"kept": True}},
        "spec": {
            "maybe": None,
            "never": None,
            "env": {"A": "1", "B": "2"},
            "free": {"whatever": {"deep": 1}},
            "items": [{"a": 5, "b": 6}, {}],
            "unknown": 1,
        },
        "extra": "dropped",
    }
    out = structural(SCHEMA, obj)
    assert out == {
        "apiVersion": "v",
        "kind": "K",
        "metadata": {"name": "x", "anything": {"kept": True}},
        "spec": {
            "maybe": None,  # nullable: kept
            "never": "d",  # null not allowed: pruned, then defaulted
            "env": {"A": "1", "B": "2"},
            "free": {"whatever": {"deep": 1}},
            "items": [{"a": 5}, {"a": 1}],
            "name": "none",
        },
    }
    assert "nested" not in out["spec"] and "status" not in out  # no parent, no default
    assert obj["spec"]["unknown"] == 1  # the input is left alone


def test_self_equals_old_self_is_the_one_rule_evaluated() -> None:
    old = structural(SCHEMA, {"spec": {"name": "a"}})
    assert immutable_violations(SCHEMA, old, structural(SCHEMA, {"spec": {"name": "a"}})) == []
    assert immutable_violations(SCHEMA, old, structural(SCHEMA, {"spec": {"name": "b"}})) == [
        "spec: Invalid value: frozen"
    ]


def test_the_project_schemas_are_those_of_the_generated_crds() -> None:
    schemas = project_schemas()
    assert set(schemas) == {"taskexecutions", "adapters"}
    status = schemas["taskexecutions"]["properties"]["status"]["properties"]
    assert status["state"]["default"] == "PENDING"

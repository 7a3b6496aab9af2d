"""core.kube.validation: what the operator finds about an object that the API server cannot."""

from __future__ import annotations

import copy
from typing import Any

from core.kube.validation import (
    Problem,
    adapter_problems,
    describe,
    spec_problems,
    task_execution_problems,
)
from tests.api_cases import BAD, GOOD_ADAPTER, GOOD_TASK_EXECUTION

NS = "team-a"


def te(**spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(GOOD_TASK_EXECUTION)
    obj["metadata"]["namespace"] = NS
    obj["spec"].update(spec)
    return obj


def adapter(name: str, **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(GOOD_ADAPTER)
    obj["metadata"].update(name=name, namespace=NS)
    obj["spec"].update(spec)
    return obj


ADAPTERS = {n: adapter(n) for n in ("tool", "other", "third")}
SECRETS = {"tool-keys": frozenset({"api.key"}), "git.creds": frozenset({"username", "password"})}


def test_a_usable_task_has_no_problems() -> None:
    assert task_execution_problems(te(), ADAPTERS, SECRETS) == []
    assert task_execution_problems(te(), ADAPTERS) == []  # Secrets unknown: not judged


def test_a_missing_adapter_names_the_reference() -> None:
    adapters = {**ADAPTERS, "third": None}
    del adapters["other"]
    problems = task_execution_problems(te(), adapters)
    assert [(p.field, p.reason) for p in problems] == [
        ("spec.fallbackAdapterRefs[0].name", "AdapterNotFound"),
        ("spec.fallbackAdapterRefs[1].name", "AdapterNotFound"),
    ]
    assert "Adapter 'other' does not exist in namespace 'team-a'" in problems[0].message


def test_an_adapter_stored_before_the_crd_rules_is_reported_through_the_reference() -> None:
    bad = adapter("tool", command=["seq", "{i:07d}"])
    problems = task_execution_problems(te(), {**ADAPTERS, "tool": bad})
    assert [(p.field, p.reason) for p in problems] == [("spec.adapterRef.name", "AdapterInvalid")]
    assert "spec.command[1]" in problems[0].message
    assert "unknown placeholder {i}" in problems[0].message


def test_every_bad_case_is_found_in_a_stored_object() -> None:
    for case in BAD:
        problems = spec_problems(case.kind, case.body())
        assert case.field in {p.field for p in problems}, (case.id, problems)
        assert all(p.fix for p in problems)


def test_fix_points_at_kubectl_explain_and_says_how_to_change_the_object() -> None:
    (problem,) = spec_problems("Adapter", adapter("tool", command=["{nope}"]))
    assert problem.field == "spec.command[0]"
    assert "kubectl explain adapter.spec.command" in problem.fix
    (problem,) = spec_problems("TaskExecution", te(task={"prompt": "p", "targetPaths": ["-x"]}))
    assert problem.field == "spec.task.targetPaths[0]"
    assert "immutable" in problem.fix and "taskexecution.spec.task.targetPaths" in problem.fix


def test_a_long_name_stored_before_the_rule_is_named() -> None:
    obj = te()
    obj["metadata"]["name"] = "a" * 62 + "-b"
    problems = task_execution_problems(obj, ADAPTERS)
    assert [(p.field, p.reason) for p in problems] == [("metadata.name", "InvalidName")]


def test_a_patch_adapter_needs_the_tasks_patch() -> None:
    patcher = adapter("tool", kind="patch", command=None, image=None)
    del patcher["spec"]["command"], patcher["spec"]["image"]
    problems = task_execution_problems(te(), {**ADAPTERS, "tool": patcher})
    assert [p.field for p in problems] == ["spec.task.patch"]
    assert "a patch adapter" in problems[0].message
    with_patch = te(task={**GOOD_TASK_EXECUTION["spec"]["task"], "patch": "diff --git a/x b/x\n"})
    assert task_execution_problems(with_patch, {**ADAPTERS, "tool": patcher}) == []


def test_an_api_adapter_makes_its_own_diff_and_needs_no_patch() -> None:
    api = {"protocol": "openai-chat", "url": "http://10.0.0.5:8000/v1", "model": "m",
           "apiKeyEnv": "TOOL_KEY"}  # fmt: skip
    caller = adapter("tool", kind="api", api=api)
    del caller["spec"]["command"]
    assert task_execution_problems(te(), {**ADAPTERS, "tool": caller}) == []


def test_missing_secrets_and_keys_are_named_when_known() -> None:
    problems = task_execution_problems(te(), ADAPTERS, {"tool-keys": frozenset({"other"})})
    assert [(p.field, p.reason) for p in problems] == [
        ("spec.adapterRef.name", "AdapterInvalid"),
        ("spec.fallbackAdapterRefs[0].name", "AdapterInvalid"),
        ("spec.fallbackAdapterRefs[1].name", "AdapterInvalid"),
    ]
    (key,) = adapter_problems(ADAPTERS["tool"], {"tool-keys": frozenset({"other"})})
    assert key.field == "spec.env[0].secretKeyRef.key" and key.reason == "SecretKeyNotFound"
    assert "has no key 'api.key'" in key.message and "other" in key.message
    (gone,) = adapter_problems(ADAPTERS["tool"], {})
    assert gone.field == "spec.env[0].secretKeyRef.name" and gone.reason == "SecretNotFound"


def test_a_patch_adapter_takes_its_patch_inline_or_by_reference() -> None:
    obj = te(adapterRef={"name": "patcher"}, fallbackAdapterRefs=[], task={"prompt": "p"})
    adapters = {"patcher": adapter("patcher", kind="patch")}
    for key in ("command", "template", "env", "api"):
        adapters["patcher"]["spec"].pop(key, None)
    (problem,) = task_execution_problems(obj, adapters)
    assert problem.field == "spec.task.patch" and "patchFrom" in problem.message
    obj["spec"]["task"]["patchFrom"] = {"configMapKeyRef": {"name": "big", "key": "diff"}}
    assert task_execution_problems(obj, adapters) == []


def test_describe_fits_a_condition_message() -> None:
    problems = [Problem(f"spec.f{i}", "m" * 100, "fix it") for i in range(30)]
    text = describe(problems, 1000)
    assert len(text) <= 1000 and text.startswith("spec.f0: ") and text.endswith("more)")
    assert describe(problems[:1]) == "spec.f0: " + "m" * 100 + ". Fix: fix it"
    assert describe([]) == ""


def test_a_stored_credentials_secret_ref_is_refused_not_ignored() -> None:
    """An object stored before the CRD refused the field: the operator says so, at the field,
    instead of cloning without the credentials its author meant."""
    body = te()
    body["spec"]["source"]["credentialsSecretRef"] = {"name": "git-creds"}
    problems = task_execution_problems(body, ADAPTERS)
    assert [p.field for p in problems] == ["spec.source.credentialsSecretRef"]
    assert "not supported" in problems[0].message

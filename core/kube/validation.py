"""What the API server cannot check about a TaskExecution or an Adapter, as problems to show.

Why a module of its own: the CRDs refuse everything one object can say wrong about itself
(placeholders, CIDRs, names, paths: see :mod:`core.rules`), but some defects need other
objects or the operator's own view: an Adapter that does not exist (yet), an Adapter stored
before the CRD had its rules, a ``patch`` adapter routed a task without a patch, a Secret
without the key an Adapter names.
Each becomes a :class:`Problem` naming the field (the API path, as the API server names
fields), what is wrong and the fix, so the reconciler can put it into a condition within
seconds instead of failing an attempt minutes later.

Pure functions over what the caller already has (watch caches): no API calls here. Secrets
are optional input: the chart grants the operator no Secret reads, so a caller without them
passes ``None`` and a missing Secret shows up as a pod that cannot start instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from core.api_rules import ADAPTER_NAME_RULE, TASK_EXECUTION_NAME_RULE
from core.resources import (
    AdapterKind,
    AdapterResourceSpec,
    TaskExecutionSpec,
)

Kind = Literal["TaskExecution", "Adapter"]

#: Secret name -> the keys it holds, or None when the Secret does not exist.
Secrets = Mapping[str, frozenset[str] | None]


@dataclass(frozen=True)
class Problem:
    """One reason the operator cannot use an object, as a condition would show it."""

    field: str  # the API path, e.g. spec.command[1] or spec.adapterRef.name
    message: str
    fix: str
    reason: str = "InvalidSpec"  # a metav1.Condition reason (CamelCase)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}. Fix: {self.fix}"


def describe(problems: Sequence[Problem], limit: int = 1000) -> str:
    """The problems as one condition message of at most ``limit`` characters."""
    text = ""
    for i, problem in enumerate(problems):
        part = str(problem) if not text else f"; {problem}"
        rest = len(problems) - i
        if len(text) + len(part) > limit:
            more = f" (+{rest} more)"
            return (text[: limit - len(more)] + more) if text else str(problem)[:limit]
        text += part
    return text


# --------------------------------------------------------------------------- one object


def _api_path(loc: Sequence[str | int], root: str = "spec") -> str:
    out = root
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _explain_path(path: str) -> str:
    return "".join(part.split("[")[0] + "." for part in path.split(".")).rstrip(".")


def _fix(kind: Kind, path: str) -> str:
    how = (
        "delete the TaskExecution and create it again (its spec is immutable)"
        if kind == "TaskExecution"
        else "correct the Adapter (kubectl apply)"
    )
    return f"{how}; `kubectl explain {kind.lower()}.{_explain_path(path)}` describes the field"


def spec_problems(kind: Kind, obj: Mapping[str, Any]) -> list[Problem]:
    """The models' verdict on a stored object, field by field.

    The API server checks the same rules at create time; this catches objects stored before
    the CRD carried them (rules are not applied to what etcd already holds).
    """
    problems = []
    rule = TASK_EXECUTION_NAME_RULE if kind == "TaskExecution" else ADAPTER_NAME_RULE
    name_problem = rule.problem(str(obj["metadata"]["name"]))
    if name_problem is not None:
        problems.append(
            Problem(
                "metadata.name",
                name_problem,
                f"create the {kind} again under such a name",
                "InvalidName",
            )
        )
    model: type[BaseModel] = TaskExecutionSpec if kind == "TaskExecution" else AdapterResourceSpec
    try:
        model.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        for error in exc.errors():
            path = _api_path(error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(Problem(path, message, _fix(kind, path)))
    return problems


def adapter_problems(adapter: Mapping[str, Any], secrets: Secrets | None = None) -> list[Problem]:
    """What is wrong with an Adapter itself (for its own status), Secrets included if known."""
    problems = spec_problems("Adapter", adapter)
    if problems or secrets is None:
        return problems
    spec = AdapterResourceSpec.model_validate(adapter["spec"])
    for i, var in enumerate(spec.env):
        ref = var.secret_key_ref
        if ref is None:
            continue
        path = f"spec.env[{i}].secretKeyRef"
        keys = secrets.get(ref.name)
        if keys is None:
            problems.append(
                Problem(
                    f"{path}.name",
                    f"Secret {ref.name!r} (for {var.name}) does not exist",
                    "create the Secret in the Adapter's namespace or name another one",
                    "SecretNotFound",
                )
            )
        elif ref.key not in keys:
            problems.append(
                Problem(
                    f"{path}.key",
                    f"Secret {ref.name!r} has no key {ref.key!r} (for {var.name}); it has "
                    + (", ".join(sorted(keys)) or "no keys"),
                    "add the key to the Secret or name one it has",
                    "SecretKeyNotFound",
                )
            )
    return problems


# ------------------------------------------------------------------------ a task, its adapters


def _refs(spec: TaskExecutionSpec) -> list[tuple[str, str]]:
    refs = [("spec.adapterRef.name", spec.adapter_ref.name)]
    for i, ref in enumerate(spec.fallback_adapter_refs):
        refs.append((f"spec.fallbackAdapterRefs[{i}].name", ref.name))
    return refs


def task_execution_problems(
    te: Mapping[str, Any],
    adapters: Mapping[str, Mapping[str, Any] | None],
    secrets: Secrets | None = None,
) -> list[Problem]:
    """Everything that keeps the operator from running ``te``, the API server's part included.

    ``adapters``: the Adapters of the TaskExecution's namespace by name, as the operator's
    cache holds them (a missing name or None: not there). An empty list means the task can
    start; each problem names the TaskExecution's field that leads to it.
    """
    problems = spec_problems("TaskExecution", te)
    if any(p.field.startswith("spec") for p in problems):
        return problems
    spec = TaskExecutionSpec.model_validate(te["spec"])
    namespace = te["metadata"].get("namespace", "")
    for path, name in _refs(spec):
        adapter = adapters.get(name)
        if adapter is None:
            problems.append(
                Problem(
                    path,
                    f"Adapter {name!r} does not exist in namespace {namespace!r}",
                    f"create it (kubectl get adapters -n {namespace} lists those there); the "
                    "task starts as soon as it exists",
                    "AdapterNotFound",
                )
            )
            continue
        found = adapter_problems(adapter, secrets)
        if found:
            problems.append(
                Problem(
                    path,
                    f"Adapter {name!r} cannot be used: " + describe(found, 600),
                    f"fix Adapter {name!r}; the task starts once it is valid",
                    "AdapterInvalid",
                )
            )
            continue
        kind = AdapterKind(adapter["spec"]["kind"])
        # patch and manual adapters apply the task's patch (inline or by reference); process
        # and api ones make their own
        needs_patch = kind in (AdapterKind.PATCH, AdapterKind.MANUAL)
        if needs_patch and spec.task.patch is None and spec.task.patch_from is None:
            problems.append(
                Problem(
                    "spec.task.patch",
                    f"Adapter {name!r} is a {kind.value} adapter: it applies spec.task.patch "
                    "(or spec.task.patchFrom), which is empty",
                    "create the TaskExecution again with the diff in spec.task.patch or "
                    "spec.task.patchFrom, or route it to a process adapter",
                )
            )
    return problems

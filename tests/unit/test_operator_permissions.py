"""The operator's API calls, derived from its code, are exactly core/kube/permissions.py.

How the calls are derived (no hand-kept list of them):

1. The operator's modules are the ``core.kube`` modules operator/handlers.py imports,
   directly or through each other.
2. In them, every call of a :class:`~core.kube.api.KubeApi` method on an ``api`` object is a
   call site; the resource of the generic methods (``get_object(TE, ...)``, ``watch(...)``)
   is resolved from string constants, imported constants, and for an attribute such as the
   informer's ``self.resource`` from the arguments its class is constructed with.
3. Each call site runs through the real client, :class:`~core.kube.client_api.ClientKubeApi`,
   on a recording transport, once answered normally and once with 409 on every write (a
   create then reads the existing object); each HTTP request becomes the RBAC verb the API
   server's authorizer checks (GET of a name: get, of a collection: list, with ``watch``:
   watch; POST create, PUT update, PATCH patch, DELETE delete).

A call site the resolver cannot read fails the test (extend the resolver, do not skip it).
The chart's Roles are compared with the same table in tests/unit/test_chart.py.
"""

from __future__ import annotations

import ast
import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.kube.api import KubeApi
from core.kube.client_api import ClientKubeApi
from core.kube.permissions import PERMISSIONS, Grant, grants

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "operator/handlers.py"
KUBE = ROOT / "core/kube"
NS = "ns"
OWNER = "owner-uid"

#: Every method of the KubeApi Protocol that talks to the API server.
KUBE_METHODS = frozenset(
    name
    for name, value in vars(KubeApi).items()
    if callable(value) and not name.startswith("_") and name not in ("add_observer", "close")
)
#: Methods whose first argument names the resource (a plural of core.kube.api.RESOURCES).
GENERIC = frozenset(
    {
        "create_object",
        "get_object",
        "list_objects",
        "patch_object",
        "patch_status",
        "delete_object",
        "list_resource",
        "watch",
    }
)


# --------------------------------------------------------------------------- 1. the modules


def _imported_kube_modules(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("core.kube."):
                out.add(node.module.removeprefix("core.kube."))
            elif node.module == "core.kube":
                out |= {a.name for a in node.names if (KUBE / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Import):
            out |= {
                a.name.removeprefix("core.kube.") for a in node.names
                if a.name.startswith("core.kube.")
            }  # fmt: skip
    return out


def operator_modules() -> dict[str, ast.Module]:
    """``core.kube`` modules the operator runs (by short name), parsed."""
    todo = _imported_kube_modules(ast.parse(ENTRY.read_text()))
    found: dict[str, ast.Module] = {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found[name] = ast.parse((KUBE / f"{name}.py").read_text())
        todo |= _imported_kube_modules(found[name]) - set(found)
    return found


# --------------------------------------------------------------------------- 2. call sites


@dataclass(frozen=True)
class CallSite:
    method: str
    resource: str | None  # the plural of a generic method
    where: str


@dataclass
class Derivation:
    modules: dict[str, ast.Module]
    sites: set[CallSite] = field(default_factory=set)
    unresolved: list[str] = field(default_factory=list)

    def run(self) -> Derivation:
        for name, tree in self.modules.items():
            self._scan(name, tree.body, None)
        return self

    def _scan(self, module: str, body: list[ast.stmt], cls: ast.ClassDef | None) -> None:
        for stmt in body:
            if isinstance(stmt, ast.ClassDef):
                self._scan(module, stmt.body, stmt)
                continue
            for node in ast.walk(stmt):
                if isinstance(node, ast.Call):
                    self._call(module, node, cls)

    def _call(self, module: str, node: ast.Call, cls: ast.ClassDef | None) -> None:
        func = node.func
        if not isinstance(func, ast.Attribute) or func.attr not in KUBE_METHODS:
            return
        receiver = func.value
        on_api = (isinstance(receiver, ast.Name) and receiver.id == "api") or (
            isinstance(receiver, ast.Attribute) and receiver.attr == "api"
        )
        if not on_api:
            return
        where = f"core/kube/{module}.py:{node.lineno}"
        if func.attr not in GENERIC:
            self.sites.add(CallSite(func.attr, None, where))
            return
        arg = node.args[0] if node.args else next(
            (k.value for k in node.keywords if k.arg in ("plural", "resource")), None
        )
        values = self._resolve(module, arg, cls) if arg is not None else set()
        if not values:
            self.unresolved.append(f"{where}: {func.attr}({ast.unparse(arg) if arg else ''})")
        for value in values:
            self.sites.add(CallSite(func.attr, value, where))

    def _resolve(self, module: str, node: ast.expr, cls: ast.ClassDef | None) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Name):
            return self._constant(module, node.id) or self._part_resource(module, node.id)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and cls is not None
        ):
            return self._constructed_with(cls, node.attr)
        return set()

    def _constant(self, module: str, name: str) -> set[str]:
        """A module-level string constant, or one imported from another core.kube module."""
        tree = self.modules.get(module) or ast.parse((KUBE / f"{module}.py").read_text())
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                if any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                    return {stmt.value.value} if isinstance(stmt.value.value, str) else set()
            if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").startswith("core.kube."):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        return self._constant(stmt.module.removeprefix("core.kube."), alias.name)  # type: ignore[union-attr]
        return set()

    def _part_resource(self, module: str, name: str) -> set[str]:
        """A loop variable over the loop parts' ``extra_resources`` (core/kube/loop_part.py):
        every resource a class in the operator's modules declares there."""
        tree = self.modules.get(module) or ast.parse((KUBE / f"{module}.py").read_text())
        loops = [
            n for n in ast.walk(tree)
            if isinstance(n, (ast.For, ast.comprehension))
            and isinstance(n.target, ast.Name) and n.target.id == name
            and any(isinstance(a, ast.Attribute) and a.attr == "extra_resources"
                    for a in ast.walk(n.iter))
        ]  # fmt: skip
        if not loops:
            return set()
        out: set[str] = set()
        for part_module, part_tree in self.modules.items():
            for cls in (n for n in ast.walk(part_tree) if isinstance(n, ast.ClassDef)):
                for stmt in cls.body:
                    target = stmt.target if isinstance(stmt, ast.AnnAssign) else None
                    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                        target = stmt.targets[0]
                    value = getattr(stmt, "value", None)
                    if not (isinstance(target, ast.Name) and target.id == "extra_resources"):
                        continue
                    if value is None:  # the Protocol's declaration
                        continue
                    if not isinstance(value, ast.Tuple):
                        self.unresolved.append(f"core/kube/{part_module}.py:{stmt.lineno}")
                        continue
                    for elt in value.elts:
                        resolved = self._resolve(part_module, elt, None)
                        if not resolved:
                            self.unresolved.append(f"core/kube/{part_module}.py:{elt.lineno}")
                        out |= resolved
        return out

    def _constructed_with(self, cls: ast.ClassDef, attr: str) -> set[str]:
        """``self.<attr>`` set from an ``__init__`` parameter: what every construction of the
        class (in the operator's modules) passes for it."""
        init = next(
            (s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None
        )
        if init is None:
            return set()
        def sets_attr(target: ast.expr) -> bool:
            return (
                isinstance(target, ast.Attribute)
                and target.attr == attr
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            )

        param = None
        for node in ast.walk(init):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
                if any(sets_attr(t) for t in node.targets):
                    param = node.value.id
        names = [a.arg for a in init.args.args[1:]]
        if param is None or param not in names:
            return set()
        index = names.index(param)
        out: set[str] = set()
        for module, tree in self.modules.items():
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if called != cls.name:
                    continue
                arg = node.args[index] if len(node.args) > index else next(
                    (k.value for k in node.keywords if k.arg == param), None
                )
                resolved = self._resolve(module, arg, None) if arg is not None else set()
                if not resolved:
                    self.unresolved.append(f"core/kube/{module}.py:{node.lineno}: {cls.name}(...)")
                out |= resolved
        return out


# --------------------------------------------------------------------------- 3. HTTP -> RBAC


class _Content:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def __aiter__(self) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for line in self.lines:
                yield line

        return gen()


class _Raw:
    def __init__(self, lines: list[bytes]) -> None:
        self.content = _Content(lines)

    def release(self) -> None:
        pass


class _Response:
    def __init__(self, status: int, payload: bytes) -> None:
        self.status = status
        self.payload = payload
        self.response = _Raw([])

    async def read(self) -> bytes:
        return self.payload


class RecordingTransport:
    """Stands in for kubernetes.aio's ApiClient: records each request, answers plausibly
    (``conflict``: 409 on every POST, PUT and PATCH)."""

    def __init__(self, conflict: bool) -> None:
        self.conflict = conflict
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    async def param_serialize(self, **kw: Any) -> tuple[Any, ...]:
        return kw["method"], kw["resource_path"], dict(kw["query_params"]), kw["body"]

    async def call_api(self, method: str, path: str, query: dict[str, Any], body: Any,
                       **_: Any) -> _Response:  # fmt: skip
        self.requests.append((method, path, query))
        if method in ("POST", "PUT", "PATCH") and self.conflict:
            return _Response(409, json.dumps({"reason": "AlreadyExists"}).encode())
        if method == "GET" and path.endswith("/log"):
            return _Response(200, b"a log line\n")
        if method == "GET" and query.get("watch") == "true":
            return _Response(200, b"")
        name = path.rstrip("/").rsplit("/", 1)[-1]
        obj = {
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": "u",
                "resourceVersion": "7",
                "ownerReferences": [{"uid": OWNER}],
            },
            "spec": {"existing": True},
        }
        if method == "GET" and name in RESOURCE_NAMES:  # a collection
            return _Response(200, json.dumps({"items": [], "metadata": {"resourceVersion": "7"}}).encode())
        return _Response(201 if method == "POST" else 200, json.dumps(obj).encode())


RESOURCE_NAMES = {
    "jobs", "pods", "configmaps", "secrets", "events", "leases", "networkpolicies",
    "taskexecutions", "adapters", "integrations",
}  # fmt: skip


def rbac_of(method: str, path: str, query: dict[str, Any]) -> Grant:
    """The (group, resource, verb) the API server's authorizer checks for one request."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    if method == "GET":
        verb = "get" if named else ("watch" if query.get("watch") == "true" else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method) or (
            "delete" if named else "deletecollection"
        )
    return group, resource, verb


def _body(name: str = "n") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Thing",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "7",
                     "ownerReferences": [{"uid": OWNER}]},
        "spec": {"wanted": True},
    }  # fmt: skip


async def _drain(api: ClientKubeApi, resource: str) -> None:
    async for _ in api.watch(resource, NS, timeout_seconds=1):
        pass


_TE = {"apiVersion": "orchestrator.dev/v1alpha1", "kind": "TaskExecution",
       "metadata": {"name": "t", "namespace": NS, "uid": "u"}}  # fmt: skip
#: How to call each KubeApi method (``p``: the resource of a generic one).
SAMPLES: dict[str, Callable[[ClientKubeApi, str], Awaitable[Any]]] = {
    "create_job": lambda api, p: api.create_job(NS, _body()),
    "get_job": lambda api, p: api.get_job(NS, "n"),
    "list_jobs": lambda api, p: api.list_jobs(NS, "a=b"),
    "delete_job": lambda api, p: api.delete_job(NS, "n", uid="u"),
    "list_pods": lambda api, p: api.list_pods(NS, "a=b"),
    "job_pods": lambda api, p: api.job_pods(NS, "n"),
    "pod_log": lambda api, p: api.pod_log(NS, "n"),
    "create_configmap": lambda api, p: api.create_configmap(NS, _body()),
    "get_configmap": lambda api, p: api.get_configmap(NS, "n"),
    "delete_configmap": lambda api, p: api.delete_configmap(NS, "n", uid="u"),
    "create_object": lambda api, p: api.create_object(p, NS, _body()),
    "get_object": lambda api, p: api.get_object(p, NS, "n"),
    "list_objects": lambda api, p: api.list_objects(p, NS),
    "patch_object": lambda api, p: api.patch_object(p, NS, "n", {"spec": {}}, resource_version="7"),
    "patch_status": lambda api, p: api.patch_status(p, NS, "n", {}, resource_version="7"),
    "delete_object": lambda api, p: api.delete_object(p, NS, "n", uid="u"),
    "apply_network_policy": lambda api, p: api.apply_network_policy(NS, _body()),
    "post_event": lambda api, p: api.post_event(_TE, "Normal", "R", "m", "a", name="t.u.finished"),
    "get_lease": lambda api, p: api.get_lease(NS, "n"),
    "create_lease": lambda api, p: api.create_lease(NS, _body()),
    "replace_lease": lambda api, p: api.replace_lease(NS, _body()),
    "list_resource": lambda api, p: api.list_resource(p, NS),
    "watch": lambda api, p: _drain(api, p),
}


def grants_of(site: CallSite) -> set[Grant]:
    """What one call site needs: its requests through the real client, both ways answered."""
    out: set[Grant] = set()
    for conflict in (False, True):
        transport = RecordingTransport(conflict)
        api = ClientKubeApi(transport)
        reported: list[tuple[str, str]] = []
        api.add_observer(lambda c: reported.append((c.verb, c.resource)))

        async def call(api: ClientKubeApi = api) -> None:
            try:
                await SAMPLES[site.method](api, site.resource or "")
            except Exception as exc:  # a 409 the method does not absorb: it was still sent
                if getattr(exc, "status", None) != 409:
                    raise

        asyncio.run(call())
        assert transport.requests, site
        needed = [rbac_of(*r) for r in transport.requests]
        # the client's own bookkeeping (metrics, benchmarks) names the same verbs
        assert reported == [(verb, res) for _, res, verb in needed], (site, reported, needed)
        out |= set(needed)
    return out


def derive(modules: dict[str, ast.Module]) -> tuple[set[Grant], Derivation]:
    found = Derivation(modules).run()
    needed: set[Grant] = set()
    for site in found.sites:
        needed |= grants_of(site)
    return needed, found


# --------------------------------------------------------------------------- tests


def test_every_kube_api_method_has_a_sample_call() -> None:
    assert set(SAMPLES) == KUBE_METHODS


def test_the_operator_needs_exactly_the_documented_permissions() -> None:
    modules = operator_modules()
    # the modules that make the calls are found (the import graph from the kopf entry file)
    assert {"reconciler", "control_loop", "informer", "leader", "status_writer", "egress",
            "task_context", "adapter_breakers", "pod_logs"} <= set(modules)  # fmt: skip
    assert "submit" not in modules  # the CLI's, run with the user's own credentials
    needed, found = derive(modules)
    assert found.unresolved == [], "call sites whose resource the test cannot read"
    missing = needed - grants()
    extra = grants() - needed
    assert not missing, f"calls without a line in core/kube/permissions.py: {sorted(missing)}"
    assert not extra, f"permissions no call needs (remove them): {sorted(extra)}"
    # the Lease is the only thing of the "lease" scope, and everything of the Lease is there
    assert {g for g in needed if g[1] == "leases"} == grants("lease")


def test_a_new_call_without_a_permission_is_found() -> None:
    """The derivation sees a call added anywhere in the operator's modules, also through a
    constant and a class constructed with the resource (the informer's pattern)."""
    extra = ast.parse(
        "from core.kube.status_writer import TE\n"
        "PODS = 'pods'\n"
        "class Cleaner:\n"
        "    def __init__(self, api, resource):\n"
        "        self.api = api\n"
        "        self.resource = resource\n"
        "    async def go(self):\n"
        "        await self.api.delete_object(self.resource, 'ns', 'x')\n"
        "        await self.api.delete_configmap('ns', 'x')\n"
        "        await self.api.patch_object(TE, 'ns', 'x', {})\n"
        "def build(api):\n"
        "    return Cleaner(api, PODS)\n"
    )
    needed, found = derive({**operator_modules(), "cleaner": extra})
    assert found.unresolved == []
    assert needed - grants() == {
        ("", "pods", "delete"),
        ("", "configmaps", "delete"),
        ("orchestrator.dev", "taskexecutions", "patch"),
    }
    unreadable = ast.parse("async def go(api, plural):\n    await api.get_object(plural, 'n', 'x')\n")
    _, found = derive({"odd": unreadable})
    assert found.unresolved == ["core/kube/odd.py:2: get_object(plural)"]


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/a/pods", {}, ("", "pods", "list")),
        ("GET", "/api/v1/namespaces/a/pods/p/log", {}, ("", "pods/log", "get")),
        ("GET", "/apis/batch/v1/namespaces/a/jobs", {"watch": "true"}, ("batch", "jobs", "watch")),
        ("PATCH", "/apis/orchestrator.dev/v1alpha1/namespaces/a/adapters/x/status", {},
         ("orchestrator.dev", "adapters/status", "patch")),
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/a/leases/l", {},
         ("coordination.k8s.io", "leases", "update")),
        ("DELETE", "/apis/batch/v1/namespaces/a/jobs/j", {}, ("batch", "jobs", "delete")),
    ],
)  # fmt: skip
def test_requests_map_to_rbac_verbs_as_the_authorizer_does(
    method: str, path: str, query: dict[str, Any], expected: Grant
) -> None:
    assert rbac_of(method, path, query) == expected


def test_the_table_has_one_line_per_resource_scope_and_reason() -> None:
    seen = [(p.group, p.resource, p.scope) for p in PERMISSIONS]
    # the Lease has two lines (create cannot be limited by name); everything else one
    assert len(seen) == len(set(seen)) + 1
    assert all(p.why and p.verbs and len(set(p.verbs)) == len(p.verbs) for p in PERMISSIONS)


def test_the_readme_documents_the_same_table() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("### What the operator may do (RBAC)", 1)[1].split("\n#", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "API group" not in r]
    documented = set()
    for row in rows:
        group, resource, verbs, where, _ = (c.strip() for c in row.strip("|").split("|"))
        documented.add(
            (
                "" if group == "core" else group.strip("`"),
                resource.strip("`"),
                tuple(v.strip() for v in verbs.split(",")),
                "served" if where == "served"
                else "evidence" if "evidence store" in where
                else "lease",
            )
        )
    assert documented == {(p.group, p.resource, p.verbs, p.scope) for p in PERMISSIONS}

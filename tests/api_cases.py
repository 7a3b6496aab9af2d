"""One table of Adapter and TaskExecution objects, good and bad, fed to both validators.

tests/unit/test_api_validation.py gives each to the pydantic models (the operator's parse)
and tests/e2e/test_crd_validation.py to a real API server with the generated CRDs. A bad
object differs from a good one in one field; both sides must refuse it *at that field* (the
API server's path, e.g. ``spec.command[1]``) and only there, with a message containing
``says``. A good object must pass both. The two validators can therefore not drift apart
without one of the two tests failing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from core.resources import API_VERSION

Kind = Literal["Adapter", "TaskExecution"]
COMMIT = "d143d8712a637d59f8cf0c2dc6a5dee0e71fa9cd"

GOOD_ADAPTER: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "Adapter",
    "metadata": {"name": "tool"},
    "spec": {
        "kind": "process",
        "image": "registry.example:5000/team/tool:1.2",
        "command": ["{python}", "-c", "print('{{literal}}', '{task_id}')", "--", "{target_paths}"],
        "stdin": "prompt",
        "env": [
            {"name": "TOOL_KEY", "secretKeyRef": {"name": "tool-keys", "key": "api.key"}},
            {"name": "MODE", "value": "fast"},
        ],
        "resources": {"cpu": "500m", "memory": "256Mi"},
        "gate": [
            {"name": "unit", "command": ["{python}", "-m", "pytest", "{workspace}"]},
            {"name": "lint", "command": ["ruff", "check", "."], "env": {"RUFF_CACHE_DIR": "/tmp"}},
        ],
        "retry": {"retryOn": ["infrastructure", "adapter_error"]},
        "healthCheck": {"command": ["{python}", "--version"]},
        "egress": [{"cidr": "10.0.0.0/8", "ports": [443, 9418]}, {"cidr": "2001:db8::/32"}],
    },
}

GOOD_TASK_EXECUTION: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "TaskExecution",
    "metadata": {"name": "fix-bug"},
    "spec": {
        "runId": "run-1",
        "taskId": "fix-bug",
        "source": {
            "repo": "https://git.example/team/repo.git",
            "baseCommit": COMMIT,
        },
        "task": {
            "title": "Fix the bug",
            "prompt": "Fix the off-by-one in src/a.py.",
            "targetPaths": ["src/a.py", "./-odd-name.py", "..hidden/b.py"],
        },
        "adapterRef": {"name": "tool"},
        "fallbackAdapterRefs": [{"name": "other"}, {"name": "third"}],
        "timeoutSeconds": 600,
        "gate": {"checks": [{"name": "unit", "command": ["{python}", "-m", "unittest"]}]},
    },
}


@dataclass(frozen=True)
class Case:
    """``base`` with ``changes`` applied (a path of keys/indexes -> new value, or DELETE)."""

    id: str
    kind: Kind
    changes: dict[tuple[str | int, ...], Any]
    field: str = ""  # where both validators must report the defect ("" for a good object)
    says: str = ""  # a fragment of both messages (case-insensitive)

    def body(self) -> dict[str, Any]:
        obj = copy.deepcopy(GOOD_ADAPTER if self.kind == "Adapter" else GOOD_TASK_EXECUTION)
        for path, value in self.changes.items():
            node: Any = obj
            for key in path[:-1]:
                node = node[key]
            if value is DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        return obj


DELETE = object()
PLACEHOLDERS = "use only the placeholders"


def adp(id: str, changes: dict[tuple[str | int, ...], Any], field: str = "", says: str = "") -> Case:
    return Case(id, "Adapter", changes, field, says)


def tex(id: str, changes: dict[tuple[str | int, ...], Any], field: str = "", says: str = "") -> Case:
    return Case(id, "TaskExecution", changes, field, says)


S = "spec"
API = {"protocol": "openai-chat", "url": "http://10.0.0.5:8000/v1", "model": "m",
       "apiKeyEnv": "TOOL_KEY"}
LONG_NAME = "a" * 62 + "-b"  # 64 characters; cut to 63 it ended in '-' (a 422 on Job create)

BAD: list[Case] = [
    # ------------------------------------------------------------------ names
    adp("adapter-name-dotted", {("metadata", "name"): "my.tool"}, "metadata.name", "DNS label"),
    adp("adapter-name-long", {("metadata", "name"): "t" * 64}, "metadata.name", "63"),
    tex("te-name-dotted", {("metadata", "name"): "fix.bug"}, "metadata.name", "DNS label"),
    tex("te-name-long", {("metadata", "name"): LONG_NAME}, "metadata.name", "63"),
    tex("te-name-upper", {("metadata", "name"): "Fix-Bug"}, "metadata.name", "DNS label"),
    tex("run-id", {(S, "runId"): "Run_1"}, "spec.runId", "should match"),
    tex("queue-name", {(S, "queueName"): "Team_A"}, "spec.queueName", "Kueue LocalQueue"),
    tex("queue-name-long", {(S, "queueName"): "q" * 64}, "spec.queueName", "63"),
    tex("queue-timeout-zero", {(S, "queueName"): "q", (S, "queueTimeoutSeconds"): 0},
        "spec.queueTimeoutSeconds", "0"),
    tex("task-id-long", {(S, "taskId"): "t" * 64}, "spec.taskId", "should match"),
    tex("adapter-ref", {(S, "adapterRef", "name"): "my.tool"}, "spec.adapterRef.name", "should match"),
    tex(
        "fallback-repeats-adapter",
        {(S, "fallbackAdapterRefs", 1, "name"): "tool"},
        "spec.fallbackAdapterRefs",
        "must not repeat adapterRef",
    ),
    tex(
        "fallback-duplicate",
        {(S, "fallbackAdapterRefs", 1, "name"): "other"},
        "spec.fallbackAdapterRefs[1]",
        "duplicate",
    ),
    # ------------------------------------------------------------------ argv placeholders
    adp("format-spec", {(S, "command", 1): "{i:07d}"}, "spec.command[1]", PLACEHOLDERS),
    adp("unknown", {(S, "command", 2): "--msg={foo}"}, "spec.command[2]", PLACEHOLDERS),
    adp("known-with-spec", {(S, "command", 1): "{attempt:03d}"}, "spec.command[1]", PLACEHOLDERS),
    adp("conversion", {(S, "command", 1): "{task_id!r}"}, "spec.command[1]", PLACEHOLDERS),
    adp("attribute", {(S, "command", 1): "{workspace.parent}"}, "spec.command[1]", PLACEHOLDERS),
    adp("empty-braces", {(S, "command", 1): "{}"}, "spec.command[1]", PLACEHOLDERS),
    adp("lone-brace", {(S, "command", 1): "a{b"}, "spec.command[1]", PLACEHOLDERS),
    adp("lone-close", {(S, "command", 1): "a}b"}, "spec.command[1]", PLACEHOLDERS),
    adp("nul", {(S, "command", 1): "a\x00b"}, "spec.command[1]", PLACEHOLDERS),
    adp("env-nul", {(S, "env", 1, "value"): "a\x00"}, "spec.env[1].value", "should match"),
    adp("paths-inside", {(S, "command", 4): "--files={target_paths}"}, "spec.command[4]", "whole"),
    adp("no-args", {(S, "command"): []}, "spec.command", "at least 1"),
    adp("too-many-args", {(S, "command"): ["x"] * 65}, "spec.command", "at most 64"),
    adp("gate-prompt", {(S, "gate", 0, "command", 3): "{prompt_file}"}, "spec.gate[0].command[3]",
        "{python}, {report}, {workspace}"),
    adp("rerun-unknown", {(S, "gate", 0, "rerun"): ["{python}", "-m", "pytest", "{tests}"]},
        "spec.gate[0].rerun[3]", "{test_name}"),
    adp("rerun-empty", {(S, "gate", 0, "rerun"): []}, "spec.gate[0].rerun", "at least 1"),
    adp("probe-workspace", {(S, "healthCheck", "command", 0): "{workspace}"},
        "spec.healthCheck.command[0]", "placeholders {python};"),
    tex("te-gate-placeholder", {(S, "gate", "checks", 0, "command", 1): "{target_paths}"},
        "spec.gate.checks[0].command[1]", PLACEHOLDERS),
    # ------------------------------------------------------------------ adapter kinds
    adp("process-without-command", {(S, "command"): DELETE}, "spec", "exactly one of command"),
    adp("process-with-both", {(S, "template"): "aider"}, "spec", "exactly one of command"),
    adp("patch-with-command", {(S, "kind"): "patch"}, "spec", "only process adapters"),
    adp("api-without-endpoint", {(S, "kind"): "api", (S, "command"): DELETE}, "spec",
        "an api adapter needs spec.api"),
    adp("endpoint-on-process", {(S, "api"): API}, "spec", "only api adapters take it"),
    adp("api-key-env-unknown",
        {(S, "kind"): "api", (S, "command"): DELETE, (S, "api"): {**API, "apiKeyEnv": "NOPE"}},
        "spec.api.apiKeyEnv", "must name a variable of spec.env"),
    # ------------------------------------------------------------------ egress
    adp("cidr-host-bits", {(S, "egress", 0, "cidr"): "10.0.0.1/8"}, "spec.egress[0].cidr",
        "host bits zero"),
    adp("cidr-no-prefix", {(S, "egress", 0, "cidr"): "10.0.0.1"}, "spec.egress[0].cidr", "CIDR"),
    adp("cidr-octet", {(S, "egress", 0, "cidr"): "300.0.0.0/8"}, "spec.egress[0].cidr", "CIDR"),
    adp("cidr-leading-zero", {(S, "egress", 0, "cidr"): "010.0.0.0/8"}, "spec.egress[0].cidr",
        "CIDR"),
    adp("cidr-prefix-zero", {(S, "egress", 0, "cidr"): "10.0.0.0/08"}, "spec.egress[0].cidr",
        "CIDR"),
    adp("cidr-mapped", {(S, "egress", 1, "cidr"): "::ffff:10.0.0.0/104"}, "spec.egress[1].cidr",
        "CIDR"),
    adp("cidr-zone", {(S, "egress", 1, "cidr"): "fe80::%eth0/64"}, "spec.egress[1].cidr", "CIDR"),
    adp("cidr-prefix-long", {(S, "egress", 0, "cidr"): "10.0.0.0/33"}, "spec.egress[0].cidr",
        "CIDR"),
    adp("cidr-space", {(S, "egress", 0, "cidr"): " 10.0.0.0/8"}, "spec.egress[0].cidr", "CIDR"),
    adp("port-zero", {(S, "egress", 0, "ports", 0): 0}, "spec.egress[0].ports[0]",
        "greater than or equal to 1"),
    adp("port-high", {(S, "egress", 0, "ports", 1): 65536}, "spec.egress[0].ports[1]",
        "less than or equal to 65535"),
    adp("port-duplicate", {(S, "egress", 0, "ports", 1): 443}, "spec.egress[0].ports[1]",
        "duplicate"),
    # ------------------------------------------------------------------ env, secrets, resources
    adp("env-reserved", {(S, "env", 1, "name"): "ORCHESTRATOR_REQUEST"}, "spec.env[1].name",
        "runner's own"),
    adp("env-name", {(S, "env", 1, "name"): "1MODE"}, "spec.env[1].name", "should match"),
    adp("env-both", {(S, "env", 1, "secretKeyRef"): {"name": "k", "key": "v"}}, "spec.env[1]",
        "exactly one of value or secretKeyRef"),
    adp("env-neither", {(S, "env", 1, "value"): DELETE}, "spec.env[1]",
        "exactly one of value or secretKeyRef"),
    adp("env-duplicate", {(S, "env", 1, "name"): "TOOL_KEY"}, "spec.env[1]", "duplicate"),
    adp("secret-name", {(S, "env", 0, "secretKeyRef", "name"): "Tool_Keys"},
        "spec.env[0].secretKeyRef.name", "should match"),
    adp("secret-key", {(S, "env", 0, "secretKeyRef", "key"): "api key"},
        "spec.env[0].secretKeyRef.key", "should match"),
    adp("cpu-unit", {(S, "resources", "cpu"): "1GB"}, "spec.resources.cpu", "quantity above zero"),
    adp("cpu-lower-ki", {(S, "resources", "cpu"): "1ki"}, "spec.resources.cpu", "quantity"),
    adp("memory-zero", {(S, "resources", "memory"): "0"}, "spec.resources.memory",
        "quantity above zero"),
    adp("memory-negative", {(S, "resources", "memory"): "-1Gi"}, "spec.resources.memory",
        "quantity above zero"),
    adp("memory-word", {(S, "resources", "memory"): "lots"}, "spec.resources.memory", "quantity"),
    adp("image-upper", {(S, "image"): "registry.example/Team/tool:1"}, "spec.image",
        "image reference"),
    adp("image-space", {(S, "image"): "tool image"}, "spec.image", "image reference"),
    adp("image-tag", {(S, "image"): "tool:"}, "spec.image", "image reference"),
    # ------------------------------------------------------------------ gate checks, retry
    adp("gate-duplicate", {(S, "gate", 1, "name"): "unit"}, "spec.gate[1]", "duplicate"),
    adp("gate-env-key", {(S, "gate", 1, "env"): {"RUFF-CACHE": "x"}}, "spec.gate[1].env",
        "environment variable names"),
    adp("gate-name", {(S, "gate", 1, "name"): "-lint"}, "spec.gate[1].name", "should match"),
    adp("retry-duplicate", {(S, "retry", "retryOn", 1): "infrastructure"},
        "spec.retry.retryOn[1]", "duplicate"),
    tex("te-gate-duplicate",
        {(S, "gate", "checks"): [{"name": "u", "command": ["a"]}, {"name": "u", "command": ["b"]}]},
        "spec.gate.checks[1]", "duplicate"),
    # ------------------------------------------------------------------ the task
    tex("path-option", {(S, "task", "targetPaths", 0): "--openai-api-base=https://elsewhere/v1"},
        "spec.task.targetPaths[0]", "'/' or '-'"),
    tex("path-dash", {(S, "task", "targetPaths", 1): "-x"}, "spec.task.targetPaths[1]", "'-'"),
    tex("path-absolute", {(S, "task", "targetPaths", 0): "/etc/passwd"},
        "spec.task.targetPaths[0]", "relative"),
    tex("path-up", {(S, "task", "targetPaths", 0): "a/../../b"}, "spec.task.targetPaths[0]",
        "'..'"),
    tex("path-up-end", {(S, "task", "targetPaths", 0): "src/.."}, "spec.task.targetPaths[0]",
        "'..'"),
    tex("path-nul", {(S, "task", "targetPaths", 0): "a\x00b"}, "spec.task.targetPaths[0]",
        "NUL"),
    tex("path-empty", {(S, "task", "targetPaths", 0): ""}, "spec.task.targetPaths[0]",
        "not empty"),
    tex("repo-ext", {(S, "source", "repo"): "ext::sh -c touch% /tmp/pwned"}, "spec.source.repo",
        "git URL"),
    tex("repo-option", {(S, "source", "repo"): "--upload-pack=touch /tmp/x"},
        "spec.source.repo", "git URL"),
    tex("repo-path", {(S, "source", "repo"): "/srv/git/repo"}, "spec.source.repo", "git URL"),
    tex("repo-space", {(S, "source", "repo"): "https://h/a b"}, "spec.source.repo", "git URL"),
    tex("commit", {(S, "source", "baseCommit"): "main"}, "spec.source.baseCommit", "should match"),
    tex("credentials-ref", {(S, "source", "credentialsSecretRef"): {"name": "git-creds"}},
        "spec.source.credentialsSecretRef", "credentialsSecretRef is not supported"),
    tex("repo-password", {(S, "source", "repo"): "https://user:s3cret@git.example/r.git"},
        "spec.source.repo", "must not carry credentials"),
    tex("repo-token", {(S, "source", "repo"): "https://ghp_token@git.example/r.git"},
        "spec.source.repo", "must not carry credentials"),
    tex("text-too-large", {(S, "task", "prompt"): "p" * 600_000, (S, "task", "patch"): "d" * 600_000},
        "spec.task", "1024 KiB"),
    # 350,000 characters, 1.05 MB in UTF-8 (over the limit in bytes, not in characters); the
    # client sends it \u-escaped (2.1 MB), under the API server's 3 MiB request limit
    tex("text-bytes", {(S, "task", "prompt"): "\u20ac" * 350_000}, "spec.task", "1024 KiB"),
    tex("patch-twice", {(S, "task", "patch"): "d",
                        (S, "task", "patchFrom"): {"evidence": {"sha256": "a" * 64}}},
        "spec.task", "not both"),
    tex("patch-from-two", {(S, "task", "patchFrom"): {"evidence": {"sha256": "a" * 64},
                                                        "secretKeyRef": {"name": "s", "key": "k"}}},
        "spec.task.patchFrom", "exactly one"),
    tex("timeout", {(S, "timeoutSeconds"): 0}, "spec.timeoutSeconds", "greater than 0"),
]

GOOD: list[Case] = [
    adp("adapter", {}),
    tex("task-execution", {}),
    tex("queued", {(S, "queueName"): "team-a", (S, "queueTimeoutSeconds"): 3600}),
    adp("rerun", {(S, "gate", 0, "rerun"): ["{python}", "-m", "pytest", "{test}", "--junitxml={report}"]}),
    adp("literal-braces", {(S, "command", 1): "{{}}{{{python}}}"}),
    adp("template", {(S, "command"): DELETE, (S, "template"): "aider"}),
    adp("patch-kind", {(S, "kind"): "patch", (S, "command"): DELETE, (S, "image"): DELETE}),
    adp("api-kind", {(S, "kind"): "api", (S, "command"): DELETE, (S, "api"): API}),
    adp("api-without-key", {(S, "kind"): "api", (S, "command"): DELETE,
                            (S, "api"): {k: v for k, v in API.items() if k != "apiKeyEnv"}}),
    adp("cidr-all", {(S, "egress", 0, "cidr"): "0.0.0.0/0"}),
    adp("cidr-host", {(S, "egress", 0, "cidr"): "192.0.2.10/32"}),
    adp("cidr-v6-long", {(S, "egress", 1, "cidr"): "2001:0db8:0000::/48"}),
    adp("cpu-fraction", {(S, "resources", "cpu"): "0.5"}),
    adp("cpu-exponent", {(S, "resources", "cpu"): "1e3"}),
    adp("cpu-plus", {(S, "resources", "cpu"): "+2"}),
    adp("memory-exa", {(S, "resources", "memory"): "1E"}),
    adp("memory-dot", {(S, "resources", "memory"): ".5Gi"}),
    adp("image-plain", {(S, "image"): "aider"}),
    adp("image-digest",
        {(S, "image"): "localhost:5000/a/b:v1@sha256:" + "0123456789abcdef" * 4}),
    adp("image-ipv6", {(S, "image"): "[fd00::1]:5000/team/tool"}),
    tex("no-task-id", {(S, "taskId"): DELETE}),
    tex("repo-git", {(S, "source", "repo"): "git://10.0.0.5:9418/calc.git"}),
    tex("repo-ssh", {(S, "source", "repo"): "ssh://git@git.example/team/repo.git"}),
    tex("repo-at-in-path", {(S, "source", "repo"): "https://git.example/team/r@2.git"}),
    tex("repo-file", {(S, "source", "repo"): "file:///srv/git/calc.git"}),
    tex("text-at-limit", {(S, "task", "prompt"): "p" * 50_000, (S, "task", "patch"): "d" * 48_304}),
    tex("name-63", {("metadata", "name"): "a" * 62 + "b"}),
]

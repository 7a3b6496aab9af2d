"""What users may put where a process starts: argv templates, target paths, env names.

Why a module of its own: these strings reach command lines of AI tools and test commands,
and each rule here runs twice (:mod:`core.rules`): in the models that read state files and
Kubernetes objects, and as a CEL rule in the CRDs, so that the API server refuses a command
the executor could not expand, or a target path a tool would read as an option, when it is
applied instead of when an attempt starts.

Placeholders are ``{name}`` only, from a fixed set per kind of command (no format spec,
conversion, index or attribute: values are strings the executor makes), and a literal
brace is written twice. The grammar is one regular expression, held against ``str.format``
(how :func:`core.engine.command_line.expand_argv` expands) by a property test.
"""

from __future__ import annotations

import re
import string
from typing import Annotated

from pydantic import Field

from core.rules import Rule, cel_string
from core.rules import matches as rules_matches

#: Placeholders an adapter command template may use. Values are paths and ids the executor
#: makes itself; task text is never substituted into a command (it reaches the tool as a file
#: or on stdin).
COMMAND_PLACEHOLDERS = frozenset(
    {
        "prompt_file",
        "workspace",
        "task_id",
        "attempt",
        "python",
        "workdir",
        "target_paths",
    }
)
#: Placeholders that expand into several arguments, so they must be a whole argument.
WHOLE_ARGUMENT_PLACEHOLDERS = frozenset({"target_paths"})
#: What a test-gate check's command may use (the gate fills in only these): ``{report}`` is
#: a fresh file outside the tree where the check may write its per-test report.
GATE_PLACEHOLDERS = frozenset({"python", "workspace", "report"})
#: What a check's ``rerun`` command may use, to run one test in isolation.
RERUN_PLACEHOLDERS = GATE_PLACEHOLDERS | {"test", "test_suite", "test_name"}
#: What a health probe's command may use.
PROBE_PLACEHOLDERS = frozenset({"python"})
#: Bounds of argv lists. Besides keeping objects small they bound the estimated cost of the
#: CRD's CEL rules, which the API server refuses above 10M per rule: a rule on every argument
#: of every gate check costs checks x arguments x length (x4 bytes per character). With these
#: bounds that rule is estimated at about 55% of the limit (Kubernetes 1.35: 32 checks were
#: refused as 1.09x); tests/e2e/test_crd_validation.py applies the CRDs to prove they fit.
MAX_ARGS = 64
MAX_ARG_LENGTH = 4096
MAX_CHECK_ARGS = 32
MAX_CHECK_ARG_LENGTH = 2048
MAX_CHECKS = 16
MAX_PATH_LENGTH = 4096


def _placeholder_list(names: frozenset[str]) -> str:
    whole = [f"{{{n}}} (as a whole argument)" for n in sorted(names & WHOLE_ARGUMENT_PLACEHOLDERS)]
    return ", ".join([*(f"{{{n}}}" for n in sorted(names - WHOLE_ARGUMENT_PLACEHOLDERS)), *whole])


def _argument_regex(names: frozenset[str]) -> str:
    """One argv element: text with ``{{``/``}}`` escapes and ``{name}`` placeholders only."""
    inline = "|".join(sorted(names - WHOLE_ARGUMENT_PLACEHOLDERS))
    regex = r"^(?:[^{}\x00]|\{\{|\}\}|\{(?:" + inline + r")\})*$"
    for name in sorted(names & WHOLE_ARGUMENT_PLACEHOLDERS):
        regex += r"|^\{" + name + r"\}$"
    return regex


def _argument_problem(arg: str, names: frozenset[str]) -> str | None:
    """What is wrong with one argv element, in the terms of ``str.format`` (None: nothing)."""
    if "\x00" in arg:
        return f"{arg!r} contains a NUL character, which no command line can hold"
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError as exc:
        return f"{arg!r}: {exc}"
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in names:
            return f"unknown placeholder {{{name}}} in {arg!r}"
        if spec or conversion:
            return f"placeholder {{{name}}} in {arg!r} takes no format spec or conversion"
        if name in WHOLE_ARGUMENT_PLACEHOLDERS and arg != f"{{{name}}}":
            return f"{{{name}}} must be a whole argument (it expands to many), not part of {arg!r}"
    return None


def argument_rule(names: frozenset[str]) -> Rule:
    """The rule for one element of an argv whose placeholders are ``names``."""
    message = (
        f"use only the placeholders {_placeholder_list(names)}; write a literal brace "
        "twice ({{ or }})"
    )

    def explain(arg: str) -> str:
        return f"{_argument_problem(arg, names) or 'malformed placeholder'}: {message}"

    return rules_matches(_argument_regex(names), message, explain)


AdapterArgument = Annotated[
    str, Field(max_length=MAX_ARG_LENGTH), argument_rule(COMMAND_PLACEHOLDERS)
]
AdapterArgv = Annotated[list[AdapterArgument], Field(min_length=1, max_length=MAX_ARGS)]
GateArgument = Annotated[
    str, Field(max_length=MAX_CHECK_ARG_LENGTH), argument_rule(GATE_PLACEHOLDERS)
]
GateArgv = Annotated[list[GateArgument], Field(min_length=1, max_length=MAX_CHECK_ARGS)]
RerunArgument = Annotated[
    str, Field(max_length=MAX_CHECK_ARG_LENGTH), argument_rule(RERUN_PLACEHOLDERS)
]
RerunArgv = Annotated[list[RerunArgument], Field(min_length=1, max_length=MAX_CHECK_ARGS)]
ProbeArgument = Annotated[
    str, Field(max_length=MAX_CHECK_ARG_LENGTH), argument_rule(PROBE_PLACEHOLDERS)
]
ProbeArgv = Annotated[list[ProbeArgument], Field(min_length=1, max_length=MAX_CHECK_ARGS)]


def argv_description(what: str, names: frozenset[str]) -> str:
    return (
        f"{what}: an argv list, no shell. Placeholders: {_placeholder_list(names)}; a literal "
        "brace is written twice."
    )


# --------------------------------------------------------------------------- environment

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME = re.compile(ENV_NAME_PATTERN)
#: Environment variable names in a map (a gate check's ``env``): every key a variable name.
ENV_NAMES_RULE = Rule(
    cel=f"self.all(k, k.matches({cel_string(ENV_NAME_PATTERN)}))",
    message="keys must be environment variable names (letters, digits and _, not starting "
    "with a digit)",
    check=lambda env: all(_ENV_NAME.fullmatch(k) for k in env),
)
MAX_ENV = 64
MAX_ENV_VALUE = 32768
#: An environment value (no NUL: no process environment can hold one).
EnvValue = Annotated[str, Field(max_length=MAX_ENV_VALUE, pattern=r"^[^\x00]*$")]


# --------------------------------------------------------------------------- target paths

_PATH_START = r"^[^/\x00-][^\x00]*$"
_PATH_UP = r"(^|/)[.][.](/|$)"


def _target_path_problem(path: str) -> str | None:
    if not path:
        return "a target path is empty"
    if path.startswith("/"):
        return f"target path {path!r} is absolute"
    if path.startswith("-"):
        return f"target path {path!r} starts with '-' and would be read as an option by the tool"
    if "\x00" in path:
        return f"target path {path!r} contains a NUL character"
    if re.search(_PATH_UP, path):
        return f"target path {path!r} leaves the repository ('..')"
    return None


_TARGET_PATH_MESSAGE = (
    "a target path is relative to the repository root: not empty, not starting with '/' or "
    "'-' (write ./-name for a file whose name starts with '-'), no '..' segment, no NUL"
)
TARGET_PATH_RULE = Rule(
    cel=f"self.matches({cel_string(_PATH_START)}) && !self.matches({cel_string(_PATH_UP)})",
    message=_TARGET_PATH_MESSAGE,
    check=lambda path: _target_path_problem(path) is None,
    explain=lambda path: f"{_target_path_problem(path)}: {_TARGET_PATH_MESSAGE}",
)
MAX_TARGET_PATHS = 256
TargetPath = Annotated[str, Field(max_length=MAX_PATH_LENGTH), TARGET_PATH_RULE]
TargetPaths = Annotated[list[TargetPath], Field(max_length=MAX_TARGET_PATHS)]

"""Validation rules written once and run twice: by pydantic and, as CEL, by the API server.

Why a module of its own: what the operator cannot use must be refused when it is applied,
not found by the operator minutes later (issue 11). The Kubernetes API server can check a
lot itself (CEL rules in the CRD), but the pydantic models are the source of the CRDs and the
operator parses every object through them, so each check must exist in both languages and
say the same. A :class:`Rule` holds both forms side by side with one message; used as
``Annotated`` metadata on a field (or listed in a model's ``model_rules``) it makes pydantic
run the Python form, and puts the CEL form into the model's JSON Schema under
``x-kubernetes-validations``, from where :mod:`core.crd` carries it into the CRD.
:class:`Unique` does the same for lists whose items must not repeat (a list type ``set`` or
``map`` that the API server enforces without any CEL cost). The JSON Schemas of the state
files and of the chart values drop these Kubernetes-only keys (:func:`without_kubernetes_keys`).

Regular expressions used by both sides are written in the subset that Python's ``re`` and
RE2 (CEL's ``matches``, Go) read alike: explicit ASCII classes (no ``\\d``/``\\w``/``\\s``,
which are Unicode in Python), no look-around or back-references, anchored with ``^``/``$``
and checked with ``re.fullmatch`` in Python (CEL's ``matches`` searches; RE2's ``$`` is the
end of the text). The unit tests keep the rules and the models in step; the e2e tests feed
the same bad objects to a real API server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError, core_schema

CEL_KEY = "x-kubernetes-validations"
LIST_TYPE_KEY = "x-kubernetes-list-type"
LIST_KEYS_KEY = "x-kubernetes-list-map-keys"


def cel_string(text: str) -> str:
    """``text`` as a CEL string literal (raw when it can be, so regexes stay readable)."""
    if "'" not in text and "\n" not in text:
        return f"r'{text}'"
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


@dataclass(frozen=True)
class Rule:
    """One check, in CEL for the API server and in Python for pydantic, with one message.

    ``check`` gets the field's value (or the model instance, for a rule in
    ``model_rules``) and returns whether it is acceptable. ``explain``, when given, returns
    a more specific message for pydantic (the API server only has ``message``).
    ``field_path`` (CEL's ``fieldPath``, e.g. ``.command``) names the field an object-level
    rule is about, so the API server reports it there.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    explain: Callable[[Any], str] | None = None

    def as_cel(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        return out

    def problem(self, value: Any) -> str | None:
        """The message pydantic gives for ``value``, or None when the rule holds."""
        if self.check(value):
            return None
        return self.explain(value) if self.explain is not None else self.message

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        def validate(value: Any) -> Any:
            problem = self.problem(value)
            if problem is not None:
                raise ValueError(problem)
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        target = handler.resolve_ref_schema(out)
        target.setdefault(CEL_KEY, []).append(self.as_cel())
        return out


def matches(regex: str, message: str, explain: Callable[[Any], str] | None = None) -> Rule:
    """A rule that the whole string matches ``regex`` (anchored with ``^``/``$``)."""
    if not (regex.startswith("^") and regex.endswith("$")):
        raise ValueError(f"anchor the regex with ^ and $: {regex!r}")
    compiled = re.compile(regex)
    return Rule(
        cel=f"self.matches({cel_string(regex)})",
        message=message,
        check=lambda value: compiled.fullmatch(value) is not None,
        explain=explain,
    )


@dataclass(frozen=True)
class Unique:
    """The items of a list must not repeat: by ``key`` (a list of objects) or whole.

    In the CRD this is ``x-kubernetes-list-type: map`` (keyed by ``key``) or ``set``: the
    API server refuses a duplicate itself, and server-side apply merges such lists by key.
    """

    key: str | None = None
    alias: str | None = None  # the key's name in the API (camelCase) when it differs

    def _keys(self, items: Iterable[Any]) -> list[Any]:
        if self.key is None:
            return list(items)
        return [getattr(i, self.key) if not isinstance(i, dict) else i[self.key] for i in items]

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        what = self.alias or self.key or "item"

        def validate(value: list[Any]) -> list[Any]:
            seen: set[Any] = set()
            for index, key in enumerate(self._keys(value)):
                if key in seen:
                    # at the repeated item, as the API server reports it
                    error = PydanticCustomError(
                        "value_error", f"duplicate {what} {key!r}: each may appear once"
                    )
                    raise ValidationError.from_exception_data(
                        "list", [InitErrorDetails(type=error, loc=(index,), input=value[index])]
                    )
                seen.add(key)
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        target = handler.resolve_ref_schema(out)
        if self.key is None:
            target[LIST_TYPE_KEY] = "set"
        else:
            target[LIST_TYPE_KEY] = "map"
            target[LIST_KEYS_KEY] = [self.alias or self.key]
        return out


class RuledModel(BaseModel):
    """A model with object-level :class:`Rule` s (cross-field checks) in ``model_rules``."""

    model_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _model_rules(self) -> RuledModel:
        for rule in type(self).model_rules:
            problem = rule.problem(self)
            if problem is None:
                continue
            if rule.field_path is None:
                raise ValueError(problem)
            # report it where the API server does: at the field the rule is about
            loc = tuple(rule.field_path.lstrip(".").split("."))
            error = PydanticCustomError("value_error", problem)
            raise ValidationError.from_exception_data(
                type(self).__name__, [InitErrorDetails(type=error, loc=loc, input=self)]
            )
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = super().__get_pydantic_json_schema__(schema, handler)
        if cls.model_rules:
            target = handler.resolve_ref_schema(out)
            target[CEL_KEY] = [r.as_cel() for r in cls.model_rules]
        return out


_KUBERNETES_KEYS = (CEL_KEY, LIST_TYPE_KEY, LIST_KEYS_KEY)


def without_kubernetes_keys(node: Any) -> Any:
    """A JSON Schema without the CRD-only keys (for ``schema/`` and the chart's values)."""
    if isinstance(node, list):
        return [without_kubernetes_keys(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _KUBERNETES_KEYS:
            continue
        if key == "properties":
            out[key] = {name: without_kubernetes_keys(v) for name, v in value.items()}
        else:
            out[key] = without_kubernetes_keys(value)
    return out

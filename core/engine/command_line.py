"""Expanding command templates into argv lists, without a shell.

A template is a list of arguments; ``{name}`` placeholders are filled from values the executor
makes itself (paths, ids). Task text never becomes part of a command: it reaches the tool as a
file or on stdin. ``{target_paths}`` as a whole argument expands into one argument per path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from core.errors import UnrecoverableError

Values = Mapping[str, "str | Sequence[str]"]


def expand_argv(template: Sequence[str], values: Values) -> list[str]:
    out: list[str] = []
    for arg in template:
        if arg.startswith("{") and arg.endswith("}") and arg[1:-1].isidentifier():
            value = values.get(arg[1:-1])
            if isinstance(value, (list, tuple)):
                out.extend(value)
                continue
        try:
            out.append(arg.format_map({k: v for k, v in values.items() if isinstance(v, str)}))
        except (KeyError, ValueError, IndexError) as exc:
            raise UnrecoverableError(f"cannot expand command argument {arg!r}: {exc}") from exc
    return out


def base_path() -> str:
    """A PATH for child processes: our interpreter's bin dir first, then the system's."""
    import sys

    parts = [os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]
    return os.pathsep.join(dict.fromkeys(parts))

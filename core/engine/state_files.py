"""State files under ``.state/``: atomic writes and schema-checked reads.

Writes go to a temporary file in the same directory, are fsynced and renamed over the target,
so a reader (or a crash) sees the old file or the new one, never half of one. Outputs are
validated by their pydantic model before they are written, and the generated JSON Schemas in
``schema/`` describe exactly those models (``orchestrator schema generate --check``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from core.errors import EntryContractError

STATE_DIR = ".state"
ROUTING_DECISIONS = "routing_decisions.json"
TASK_QUEUE = "task_queue.json"
ROUTING_COMPLETE = "ROUTING_COMPLETE"
EXECUTION_RESULTS = "execution_results.json"
PATCH_LEDGER = "patch_ledger.jsonl"

M = TypeVar("M", bound=BaseModel)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_model(path: Path, model: BaseModel) -> None:
    """Validate (the bytes to be written, read back through the model) and write atomically
    as pretty JSON.

    Serialised by pydantic's own JSON encoder: the same text as ``json.dumps(indent=2,
    ensure_ascii=False)`` of the model's JSON dump for what our models hold (floats may be
    spelled differently, e.g. ``1e-5``, the same number), several times faster than the
    pure-Python indenting encoder, which took most of the once-per-run cost of a run's
    results file (issue 17).
    """
    data = model.model_dump_json(indent=2).encode() + b"\n"
    type(model).model_validate_json(data)
    atomic_write_bytes(path, data)


def read_model(path: Path, model: type[M], *, producer: str = "phase 4") -> M:
    """Load a state file or raise an :class:`EntryContractError` naming file, field and fix."""
    if not path.exists():
        raise EntryContractError(
            str(path),
            "required file is missing",
            f"run {producer} for this work dir first",
        )
    try:
        return model.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise EntryContractError(
            f"{path}: field `{loc}`",
            f"{err['msg']}{more}",
            f"correct the file so it matches schema/{_schema_name(model)}",
        ) from exc


def _schema_name(model: type[BaseModel]) -> str:
    from core.models import SCHEMA_MODELS

    for name, candidate in SCHEMA_MODELS.items():
        if candidate is model:
            return name
    return f"{model.__name__}.schema.json"

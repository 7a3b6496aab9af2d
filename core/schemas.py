"""Generated artifacts: JSON Schemas of the state files (``schema/``) and the CRDs (``crds/``),
made from the models.

``orchestrator schema generate`` writes them; ``--check`` (and a unit test) fails on drift,
so the files can never disagree with the pydantic models that read and write the data.
"""

from __future__ import annotations

import json

from core.models import SCHEMA_MODELS
from core.rules import without_kubernetes_keys

SCHEMA_DIR = "schema"


def json_schema_text(model_name: str) -> str:
    model = SCHEMA_MODELS[model_name]
    schema = without_kubernetes_keys(model.model_json_schema(mode="serialization"))
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://orchestrator.dev/schema/{model_name}",
        **schema,
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def generated_files() -> dict[str, str]:
    """Relative path -> exact content of every generated file (schemas, CRDs, chart files)."""
    from core.chart_values import chart_files
    from core.crd import crd_files

    files = {f"{SCHEMA_DIR}/{name}": json_schema_text(name) for name in sorted(SCHEMA_MODELS)}
    return {**files, **crd_files(), **chart_files()}

"""core.engine.state_files.write_model: the JSON it writes, read back and as text."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import BaseModel

from core.engine.state_files import read_model, write_model
from core.errors import EntryContractError


class Inner(BaseModel):
    name: str
    share: float
    tags: list[str] = []


class Outer(BaseModel):
    when: datetime
    items: list[Inner]
    counts: dict[str, int]
    note: str | None = None


def sample() -> Outer:
    return Outer(
        when=datetime(2026, 11, 30, 1, 2, 3, 456000, tzinfo=UTC),
        items=[
            Inner(name='ünï cødé \u2028 "quoted" \\ \x1b', share=0.25, tags=["a", "b"]),
            Inner(name="empty", share=3.0),
        ],
        counts={"COMPLETED": 2, "FAILED": 0},
    )


def test_written_json_reads_back_as_the_model_and_is_the_pretty_text(tmp_path: Path) -> None:
    path = tmp_path / ".state" / "out.json"
    model = sample()
    write_model(path, model)
    assert read_model(path, Outer) == model
    text = path.read_text(encoding="utf-8")
    # the same text the standard library's pretty printer makes of the model's JSON dump
    expected = json.dumps(model.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    assert text == expected
    assert "ünï" in text and '"tags": []' in text


def test_a_model_that_does_not_validate_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    bad = Outer.model_construct(when="not a date", items=[], counts={})
    with pytest.warns(UserWarning), pytest.raises(ValueError):
        write_model(path, bad)
    assert not path.exists()
    with pytest.raises(EntryContractError):
        read_model(path, Outer)

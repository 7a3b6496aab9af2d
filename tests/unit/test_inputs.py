"""core.engine.inputs + state_files: entry contracts refuse bad inputs with file, field and fix."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.engine.inputs import load_inputs, resolve_repo
from core.engine.state_files import (
    ROUTING_COMPLETE,
    ROUTING_DECISIONS,
    STATE_DIR,
    TASK_QUEUE,
    atomic_write_bytes,
    read_model,
    write_model,
)
from core.errors import EntryContractError, UnrecoverableError
from core.models import RoutingCompleteFlag, TaskQueue

RUN = "demo"
PATCH = "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-a\n+b\n"


class Workdir:
    def __init__(self, root: Path, commit: str) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.commit = commit
        self.flag: dict[str, Any] = {"run_id": RUN, "completed_at": "2025-01-01T00:00:00Z"}
        self.queue: dict[str, Any] = {
            "schema_version": 1,
            "run_id": RUN,
            "tasks": [
                {"task_id": "t1", "prompt": "edit a", "repo": "repo", "base_commit": commit},
                {
                    "task_id": "t2",
                    "prompt": "apply",
                    "repo": "repo",
                    "base_commit": commit,
                    "patch": PATCH,
                },
            ],
        }
        self.routing: dict[str, Any] = {
            "schema_version": 1,
            "run_id": RUN,
            "adapters": [
                {"id": "script", "kind": "process", "command": ["{python}", "tool.py"]},
                {"id": "patcher", "kind": "patch"},
                {"id": "human", "kind": "manual"},
            ],
            "decisions": [
                {"task_id": "t1", "adapter_id": "script", "fallback_adapter_ids": ["human"]},
                {"task_id": "t2", "adapter_id": "patcher"},
            ],
        }

    def write(self) -> Workdir:
        self.state.mkdir(parents=True, exist_ok=True)
        for name, data in (
            (ROUTING_COMPLETE, self.flag),
            (TASK_QUEUE, self.queue),
            (ROUTING_DECISIONS, self.routing),
        ):
            (self.state / name).write_text(json.dumps(data))
        return self

    def load(self, run_id: str = RUN) -> Any:
        return load_inputs(self.root, run_id)

    def error(self, run_id: str = RUN) -> EntryContractError:
        with pytest.raises(EntryContractError) as exc:
            self.load(run_id)
        return exc.value


@pytest.fixture
def wd(tmp_path: Path, git_repo: Any) -> Workdir:
    root = tmp_path / "work"
    root.mkdir()
    repo = git_repo({"a.txt": "a\n"}, name="work/repo")
    return Workdir(root, repo.base).write()


# --------------------------------------------------------------------------- the good case


def test_valid_inputs_load(wd: Workdir) -> None:
    inputs = wd.load()
    assert inputs.run_id == RUN
    assert [t.task_id for t in inputs.tasks] == ["t1", "t2"]
    assert [t.seq for t in inputs.tasks] == [0, 1]
    assert inputs.tasks[0].adapter_chain == ["script", "human"]
    assert inputs.tasks[1].adapter_chain == ["patcher"]
    assert set(inputs.adapters) == {"script", "patcher", "human"}
    assert inputs.repo_url(inputs.tasks[0].spec) == str((wd.root / "repo").resolve())
    assert inputs.task("t2").spec.patch == PATCH
    with pytest.raises(KeyError):
        inputs.task("nope")


def test_resolve_repo() -> None:
    assert resolve_repo(Path("/w"), "https://example.com/r.git") == "https://example.com/r.git"
    assert resolve_repo(Path("/w"), "git@host:o/r.git") == "git@host:o/r.git"
    assert resolve_repo(Path("/w"), "/abs/repo") == "/abs/repo"
    assert resolve_repo(Path("/w"), "sub/repo") == "/w/sub/repo"


def test_url_repos_are_not_checked_locally(wd: Workdir) -> None:
    for task in wd.queue["tasks"]:
        task["repo"] = "https://example.invalid/repo.git"
    wd.write()
    assert wd.load().tasks[0].spec.repo == "https://example.invalid/repo.git"


# --------------------------------------------------------------------------- refusals


def test_missing_workdir(tmp_path: Path) -> None:
    with pytest.raises(EntryContractError) as exc:
        load_inputs(tmp_path / "absent", RUN)
    assert "work dir does not exist" in str(exc.value)
    assert "--workdir" in exc.value.fix


@pytest.mark.parametrize("name", [ROUTING_COMPLETE, TASK_QUEUE, ROUTING_DECISIONS])
def test_missing_state_file(wd: Workdir, name: str) -> None:
    (wd.state / name).unlink()
    err = wd.error()
    assert err.where == str(wd.state / name)
    assert err.problem == "required file is missing"
    assert "phase 4" in err.fix
    assert str(wd.state / name) in str(err) and "fix:" in str(err)


def test_missing_routing_complete_flag(wd: Workdir) -> None:
    (wd.state / ROUTING_COMPLETE).unlink()
    err = wd.error()
    assert ROUTING_COMPLETE in err.where
    assert isinstance(err, UnrecoverableError)


@pytest.mark.parametrize("name", [ROUTING_COMPLETE, TASK_QUEUE, ROUTING_DECISIONS])
def test_invalid_json(wd: Workdir, name: str) -> None:
    (wd.state / name).write_text('{"run_id": "demo", ')
    err = wd.error()
    assert err.where.startswith(str(wd.state / name))
    assert "JSON" in err.problem
    assert "schema/" in err.fix


def test_field_error_names_file_and_field_path(wd: Workdir) -> None:
    wd.queue["tasks"][1]["base_commit"] = "abc"
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / TASK_QUEUE}: field `tasks.1.base_commit`"
    assert "pattern" in err.problem
    assert err.fix == "correct the file so it matches schema/task_queue.schema.json"


def test_field_error_counts_further_errors(wd: Workdir) -> None:
    wd.queue["tasks"][0]["task_id"] = "Bad_Id"
    wd.queue["tasks"][1]["base_commit"] = "abc"
    wd.write()
    err = wd.error()
    assert "field `tasks.0.task_id`" in err.where
    assert "(and 1 more)" in err.problem


def test_field_error_in_routing_decisions(wd: Workdir) -> None:
    wd.routing["adapters"][0]["command"] = ["tool", "{prompt}"]
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / ROUTING_DECISIONS}: field `adapters.0.command.1`"
    assert "unknown placeholder {prompt}" in err.problem


def test_routing_complete_field_error(wd: Workdir) -> None:
    wd.flag["completed_at"] = "yesterday"
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / ROUTING_COMPLETE}: field `completed_at`"


@pytest.mark.parametrize("name", [ROUTING_COMPLETE, TASK_QUEUE, ROUTING_DECISIONS])
def test_run_id_mismatch(wd: Workdir, name: str) -> None:
    data = {ROUTING_COMPLETE: wd.flag, TASK_QUEUE: wd.queue, ROUTING_DECISIONS: wd.routing}[name]
    data["run_id"] = "other-run"
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / name}: field `run_id`"
    assert "'other-run'" in err.problem and "'demo'" in err.problem
    assert "--run other-run" in err.fix


def test_wrong_run_requested(wd: Workdir) -> None:
    err = wd.error(run_id="another")
    assert "field `run_id`" in err.where
    assert "--run demo" in err.fix


def test_decision_names_unknown_adapter(wd: Workdir) -> None:
    wd.routing["decisions"][1]["adapter_id"] = "ghost"
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / ROUTING_DECISIONS}: field `decisions.1.adapter_id`"
    assert "'ghost'" in err.problem
    assert "known: human, patcher, script" in err.problem
    assert "add the adapter" in err.fix


def test_fallback_names_unknown_adapter(wd: Workdir) -> None:
    wd.routing["decisions"][0]["fallback_adapter_ids"] = ["human", "phantom"]
    wd.write()
    err = wd.error()
    assert err.where.endswith("field `decisions.0.fallback_adapter_ids.1`")
    assert "'phantom'" in err.problem


def test_queued_task_without_decision(wd: Workdir) -> None:
    del wd.routing["decisions"][1]
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / ROUTING_DECISIONS}: field `decisions`"
    assert "'t2'" in err.problem


def test_patch_adapter_task_without_patch(wd: Workdir) -> None:
    del wd.queue["tasks"][1]["patch"]
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / TASK_QUEUE}: field `tasks.1.patch`"
    assert "'t2'" in err.problem and "`patch` adapter" in err.problem


def test_patch_adapter_as_fallback_also_needs_patch(wd: Workdir) -> None:
    wd.routing["decisions"][0]["fallback_adapter_ids"] = ["patcher"]
    wd.write()
    err = wd.error()
    assert err.where.endswith("field `tasks.0.patch`")


def test_repo_not_found(wd: Workdir) -> None:
    wd.queue["tasks"][0]["repo"] = "missing-repo"
    wd.write()
    err = wd.error()
    assert err.where == f"{wd.state / TASK_QUEUE}: field `tasks.0.repo`"
    assert "'missing-repo'" in err.problem
    assert str(wd.root / "missing-repo") in err.problem


def test_nothing_written_on_refusal(wd: Workdir) -> None:
    wd.routing["decisions"][0]["adapter_id"] = "ghost"
    wd.write()
    before = sorted(p.relative_to(wd.root) for p in wd.root.rglob("*") if ".git" not in p.parts)
    wd.error()
    after = sorted(p.relative_to(wd.root) for p in wd.root.rglob("*") if ".git" not in p.parts)
    assert before == after


# --------------------------------------------------------------------------- state files


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "state" / "out.json"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    inode = target.stat().st_ino
    atomic_write_bytes(target, b"second, longer content")
    assert target.read_bytes() == b"second, longer content"
    assert target.stat().st_ino != inode  # renamed over, not rewritten in place
    atomic_write_bytes(target, b"")
    assert target.read_bytes() == b""
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_atomic_write_failure_keeps_old_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_keeps_reader_view_whole(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_bytes(target, b"A" * 100_000)
    with open(target, "rb") as reader:
        atomic_write_bytes(target, b"B" * 10)
        # An open reader still sees the complete old file, never a mix.
        assert reader.read() == b"A" * 100_000
    assert target.read_bytes() == b"B" * 10


def test_write_model_round_trips(tmp_path: Path) -> None:
    flag = RoutingCompleteFlag(run_id="r1", completed_at=datetime(2025, 1, 2, tzinfo=UTC))
    path = tmp_path / STATE_DIR / ROUTING_COMPLETE
    write_model(path, flag)
    assert read_model(path, RoutingCompleteFlag) == flag
    assert path.read_text().endswith("}\n")
    assert json.loads(path.read_text())["run_id"] == "r1"


def test_write_model_validates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "queue.json"
    path.write_text("previous")
    bad = TaskQueue.model_construct(run_id="Not Valid", tasks=[], schema_version=1)
    with pytest.raises(ValidationError):
        write_model(path, bad)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["queue.json"]


def test_read_model_unknown_model_schema_name(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Other(BaseModel):
        x: int

    path = tmp_path / "other.json"
    path.write_text('{"x": "nope"}')
    with pytest.raises(EntryContractError) as exc:
        read_model(path, Other, producer="the tests")
    assert exc.value.where == f"{path}: field `x`"
    assert "Other.schema.json" in exc.value.fix
    (path).unlink()
    with pytest.raises(EntryContractError) as exc2:
        read_model(path, Other, producer="the tests")
    assert exc2.value.fix == "run the tests for this work dir first"


def test_no_temp_files_left_in_state_dir_after_many_writes(tmp_path: Path) -> None:
    target = tmp_path / "s" / "f.json"
    for i in range(20):
        atomic_write_bytes(target, str(i).encode())
    assert os.listdir(target.parent) == ["f.json"]
    assert target.read_bytes() == b"19"

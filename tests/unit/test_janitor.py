"""core.engine.janitor: directories leave their place at once and are deleted after."""

from __future__ import annotations

from pathlib import Path

from core.engine.janitor import Janitor


def make_tree(root: Path) -> Path:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("x\n")
    (root / "top.txt").write_text("y\n")
    (root / "link").symlink_to("/etc")  # a symlink is removed, never followed
    return root


def test_a_discarded_dir_is_gone_at_once_and_deleted_after_drain(tmp_path: Path) -> None:
    trash = tmp_path / "trash"
    janitor = Janitor(trash)
    trees = [make_tree(tmp_path / f"t{i}") for i in range(5)]
    for tree in trees:
        janitor.discard(tree)
        assert not tree.exists()
    # the path is free for the next checkout at once
    make_tree(tmp_path / "t0")
    janitor.drain()
    assert list(trash.iterdir()) == []
    assert (tmp_path / "t0" / "a" / "b" / "f.txt").exists()
    assert Path("/etc").is_dir()


def test_nothing_to_discard_and_a_file(tmp_path: Path) -> None:
    janitor = Janitor(tmp_path / "trash")
    janitor.discard(tmp_path / "missing")
    (tmp_path / "file").write_text("z")
    janitor.discard(tmp_path / "file")
    janitor.drain()
    assert not (tmp_path / "file").exists()
    assert list((tmp_path / "trash").iterdir()) == []


def test_what_a_dead_process_left_in_the_trash_is_deleted(tmp_path: Path) -> None:
    trash = tmp_path / "trash"
    make_tree(trash / "left-by-a-crash")
    janitor = Janitor(trash)
    janitor.discard(make_tree(tmp_path / "t"))
    janitor.drain()
    assert list(trash.iterdir()) == []

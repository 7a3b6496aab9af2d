"""Repository-wide checks that keep the code honest: generated files, layering, types, lint."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from core.schemas import generated_files

ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


def test_generated_schemas_match_the_models() -> None:
    drift = [
        rel
        for rel, content in generated_files().items()
        if not (ROOT / rel).exists() or (ROOT / rel).read_text(encoding="utf-8") != content
    ]
    assert drift == [], f"run `orchestrator schema generate`; stale: {drift}"


def test_schema_check_command_detects_drift(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "core.cli"]
    ok = subprocess.run(
        [*cli, "schema", "generate", "--check", "--root", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    stale = subprocess.run(
        [*cli, "schema", "generate", "--check", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert stale.returncode == 1 and "out of date" in stale.stderr


def test_layers_are_respected() -> None:
    result = run(str(Path(sys.executable).parent / "lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_is_mypy_strict_clean() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "core", "tests", "bench", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_importable_top_level_operator_package() -> None:
    assert not (ROOT / "operator/__init__.py").exists()


def _private_uses(path: Path) -> list[str]:
    """Private names of another module or object used in ``path`` (not self's/cls's own)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("core"):
            found += [
                f"{path}:{node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    paths = [
        p
        for base in ("core", "operator", "bench")
        for p in sorted((ROOT / base).rglob("*.py"))
        if "migrations" not in p.parts
    ]
    assert paths
    offenders = [use for p in paths for use in _private_uses(p)]
    assert offenders == []


def test_private_name_check_finds_a_planted_use(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from core.kube.reconciler import _older\n"
        "def probe(memo):\n    return memo.controller._policies\n",
        encoding="utf-8",
    )
    assert len(_private_uses(planted)) == 2

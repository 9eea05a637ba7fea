"""Project style: ruff's lint and format check, as CI runs them, and a rule ruff
does not check: no function over 80 lines.

Without ruff the ruff tests skip, except under ``CI=true`` where they fail: the
``[test]`` extra installs it, so a missing ruff there is a broken set-up.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clippy_monitor", "dashboards")
MAX_FUNCTION_LINES = 80  # hard limit; aim for 60 (docstring included, decorators not)

# Functions allowed over the limit, as "path::Qualified.name" (none: keep it so).
ALLOWED: set[str] = set()


def function_lengths(path: Path) -> Iterator[tuple[str, int]]:
    """``(qualified name, lines from def to last line)`` of every function in ``path``."""

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    yield name, child.end_lineno - child.lineno + 1
                yield from visit(child, name + ".")
            else:
                yield from visit(child, prefix)

    yield from visit(ast.parse(path.read_text(), filename=str(path)), "")


def long_functions() -> dict[str, int]:
    """Every function in the packages over :data:`MAX_FUNCTION_LINES`, by "path::name"."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, lines in function_lengths(path):
                if lines > MAX_FUNCTION_LINES:
                    found[f"{path.relative_to(ROOT).as_posix()}::{name}"] = lines
    return found


def test_no_function_is_over_80_lines():
    too_long = {name: lines for name, lines in long_functions().items() if name not in ALLOWED}
    assert not too_long, f"split these functions (lines): {too_long}"


def test_the_allow_list_holds_only_functions_still_too_long():
    assert ALLOWED <= set(long_functions()), (
        f"remove from ALLOWED: {ALLOWED - set(long_functions())}"
    )


def test_function_lengths_count_nested_and_methods(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "class A:\n    def f(self):\n        def g():\n            pass\n        return g\n"
    )
    assert dict(function_lengths(source)) == {"A.f": 4, "A.f.g": 2}


def run_ruff(*args: str) -> subprocess.CompletedProcess:
    """``python -m ruff ARGS`` from the repository root (skip without ruff; fail in CI)."""
    if importlib.util.find_spec("ruff") is None:
        message = "ruff is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=" ".join)
def test_ruff_passes(args):
    result = run_ruff(*args)
    assert result.returncode == 0, (
        f"ruff {' '.join(args)} failed (format with: .venv/bin/ruff format .):\n"
        f"{result.stdout}{result.stderr}"
    )

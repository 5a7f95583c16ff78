"""The import rules that keep the layers apart, read from the source (no import runs back up).

- the plan and the executor (with its output directory and byte copier) know no models,
  engines or checkpoint files: they import only each other, ``plan`` and ``errors``;
- ``reference/`` holds forward math and never imports ``verify``;
- ``record`` (what gdnfuse writes into a checkpoint) and ``names`` import no planner.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gdnfuse"


def gdnfuse_imports(path: Path) -> set[str]:
    """Every ``gdnfuse.*`` module ``path`` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gdnfuse")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gdnfuse"):
            module = node.module or ""
            if module == "gdnfuse":  # from gdnfuse import outdir
                found |= {f"gdnfuse.{a.name}" for a in node.names}
            else:
                found.add(module)
    return found


EXECUTOR = {"executor", "outdir", "copier", "plan"}


@pytest.mark.parametrize("module", sorted(EXECUTOR))
def test_the_executor_knows_no_models(module: str) -> None:
    allowed = {f"gdnfuse.{m}" for m in EXECUTOR | {"errors"}}
    path = PACKAGE / f"{module}.py"
    assert gdnfuse_imports(path) <= allowed, gdnfuse_imports(path) - allowed
    for name in ("config.json", "index.json", "manifest", "safetensors", "in_proj"):
        assert not any(name in text for text in code_strings(path)), (
            f"{module}.py names {name!r}: model knowledge")  # fmt: skip


def code_strings(path: Path) -> list[str]:
    """The string literals the code uses (docstrings left out: they may give examples)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs]  # fmt: skip


@pytest.mark.parametrize("path", sorted((PACKAGE / "reference").glob("*.py")), ids=str)
def test_reference_never_imports_verify(path: Path) -> None:
    assert not {m for m in gdnfuse_imports(path) if m.startswith("gdnfuse.verify")}


@pytest.mark.parametrize("module", ["record", "names", "layout", "errors"])
def test_leaf_modules_import_no_planner(module: str) -> None:
    banned = {"gdnfuse.fusion", "gdnfuse.convert", "gdnfuse.verify", "gdnfuse.cli"}
    assert not gdnfuse_imports(PACKAGE / f"{module}.py") & banned

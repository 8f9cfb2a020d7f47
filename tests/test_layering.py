"""Imports point one way (DESIGN.md, layout): the foundation ``ctbench`` <- the stages ``pretrain`` and ``transfer``
(independent of each other: what both need lives in the foundation) <- ``results`` (reads records only) <-
``orchestrate`` and ``benchmarks``; inside ``results`` the table model is the bottom. An AST scan of every module,
lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package (or module) -> what it may not import
FORBIDDEN = {
    "ctbench": {"pretrain", "transfer", "results", "orchestrate", "benchmarks"},
    "pretrain": {"transfer", "results", "orchestrate", "benchmarks"},
    "transfer": {"pretrain", "results", "orchestrate", "benchmarks"},
    "results": {"pretrain", "transfer", "orchestrate", "benchmarks"},
    "benchmarks": {"orchestrate"},
    "results.model": {"results.collect", "results.tables", "results.render", "results.plots", "results.reported"},
    "results.render": {"results.tables", "results.plots"},
    "results.plots": {"results.tables", "results.render"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` (module ``name``) imports, relative imports resolved, at any depth of the file."""
    name, found = name or module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # ``from results import tables``
    return found


def _within(mod: str, scope: str) -> bool:
    return mod == scope or mod.startswith(scope + ".")


SOURCES = sorted(p for top in ("ctbench", "pretrain", "transfer", "results", "orchestrate", "benchmarks")
                 for p in (REPO / top).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path) -> None:
    name = module_name(path)
    found = imports(path)
    broken = sorted(f"{scope} may not import {mod}" for scope, banned in FORBIDDEN.items() if _within(name, scope)
                    for mod in found for b in banned if _within(mod, b) and mod.rpartition(".")[0] not in found)
    assert not broken, f"{path.relative_to(REPO)}: {'; '.join(broken)}"


def test_the_scan_sees_imports(tmp_path: Path) -> None:
    """Absolute, aliased, relative and lazy imports are all seen (so a passing scan means something)."""
    src = tmp_path / "m.py"
    src.write_text("import os.path as p\nfrom . import tables\nfrom ..transfer.x import y\n"
                   "def f():\n    from pretrain import engine\n")
    assert {"os.path", "results.tables", "transfer.x", "transfer.x.y", "pretrain.engine"} <= imports(src, "results.m")

"""The import direction of docs/architecture.md, checked on the module-level imports of every file:
lower layers never import higher ones, and the engine names no concrete technique."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "effinfer"
FORBIDDEN = {
    "engine": ["effinfer.serving", "effinfer.bench", "effinfer.compression.quant.", "effinfer.compression.prune.",
               "effinfer.decoding.spec."],
    "models": ["effinfer.engine", "effinfer.serving", "effinfer.bench", "effinfer.llm"],
    "layers": ["effinfer.engine", "effinfer.models", "effinfer.serving", "effinfer.bench", "effinfer.llm"],
    "loader": ["effinfer.engine", "effinfer.models", "effinfer.serving", "effinfer.bench", "effinfer.llm"],
    "compression": ["effinfer.engine", "effinfer.serving", "effinfer.bench", "effinfer.llm"],
    "decoding": ["effinfer.engine", "effinfer.serving", "effinfer.bench", "effinfer.llm"],
}


def top_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    bad = [f"{path.relative_to(ROOT)} imports {name}"
           for path in (ROOT / package).rglob("*.py") for name in top_level_imports(path)
           if any(name == f.rstrip(".") and not f.endswith(".") or name.startswith(f) for f in FORBIDDEN[package])]
    assert not bad, bad

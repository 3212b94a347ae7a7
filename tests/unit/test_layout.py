"""The import direction of docs/architecture.md, checked on every import of every file, those inside
functions included: a module imports only from its own tier or the tiers below it, and the package
import graph has no loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "effinfer"
TIERS = [
    # tier 1: the run-time library, lowest first
    ["effinfer.utils", "effinfer.sampling_params", "effinfer.prompts"],
    ["effinfer.kernels"],
    ["effinfer.layers"],
    ["effinfer.compression"],      # run-time quantization / pruning plug-ins and their math
    ["effinfer.loader"],
    ["effinfer.models"],
    ["effinfer.decoding"],
    ["effinfer.outputs", "effinfer.output_processor", "effinfer.config"],
    ["effinfer.engine"],
    ["effinfer.distributed"],      # tensor-parallel ranks: split models, worker processes that run engine steps
    # tier 2: the facade
    ["effinfer.llm", "effinfer.build", "effinfer.core_process"],
    # tier 3: tools and services
    ["effinfer.tools", "effinfer.bench", "effinfer.serving", "effinfer.cli_args"],
    ["effinfer.cli", "effinfer"],
]
"""Each row is one rank; a module may import from its own rank and the ranks above it in this list."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_imports(path: Path) -> list[str]:
    """Every effinfer module that `path` imports, at module level or inside a function (relative imports resolved)."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names += [module] + [f"{module}.{a.name}" for a in node.names]   # `from pkg import submodule`
    return [n for n in names if n == "effinfer" or n.startswith("effinfer.")]


def rank(module: str) -> int:
    """The rank of the longest tier prefix that `module` falls under."""
    best, best_len = None, -1
    for index, prefixes in enumerate(TIERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no tier of TIERS"
    return best


def graph() -> dict[str, set[str]]:
    return {module_name(p): set(all_imports(p)) for p in ROOT.rglob("*.py")}


def test_every_import_runs_down_the_tiers():
    bad = [f"{module} imports {name}" for module, names in graph().items() for name in sorted(names)
           if name != "effinfer" and rank(name) > rank(module)]
    assert not bad, "\n".join(bad)


def test_package_graph_has_no_loop():
    """Between top-level packages (engine, models, ...), including imports inside functions: a depth-first walk
    finds any cycle, of two packages or more."""
    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for module, names in graph().items():
        for name in names:
            if name != "effinfer" and package(name) != package(module) and module != "effinfer":
                edges.setdefault(package(module), set()).add(package(name))
    loops, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not loops, loops


def test_registry_entries_run_down_the_tiers():
    """The registries import their entries by name (`importlib`): each entry's module sits no higher than
    the registry that names it."""
    from effinfer.compression.quant import QUANT_METHODS
    from effinfer.decoding.spec import PROPOSERS
    from effinfer.layers.attn_backends import ATTENTION_BACKENDS
    from effinfer.models.registry import _MODELS

    tables = {"effinfer.compression.quant": [v.partition(":")[0] for v in QUANT_METHODS.values()],
              "effinfer.decoding.spec": [v.partition(":")[0] for v in PROPOSERS.values()],
              "effinfer.layers.attn_backends": [v.module for v in ATTENTION_BACKENDS.values()],
              "effinfer.models.registry": [module for module, _ in _MODELS.values()]}
    bad = [f"{registry} names {entry}" for registry, entries in tables.items() for entry in entries
           if rank(entry) > rank(registry)]
    assert not bad, bad


@pytest.mark.parametrize("module, name, ok", [
    ("effinfer.engine.llm_engine", "effinfer.models", True),
    ("effinfer.models", "effinfer.engine.llm_engine", False),
    ("effinfer.layers.attention", "effinfer.compression.quant", False),
    ("effinfer.tools.quantize", "effinfer.llm", True),
    ("effinfer.llm", "effinfer.tools.quantize", False),
])
def test_rank_order(module, name, ok):
    assert (rank(name) <= rank(module)) is ok


def test_the_engine_names_no_technique():
    """The engine runs the plug-ins it is given: no import of a concrete quantization, pruning, proposer or
    early-exit module, and no import of the facade or of a tool."""
    concrete = ("effinfer.compression.quant.", "effinfer.compression.prune", "effinfer.decoding.spec.",
                "effinfer.decoding.early_exit")
    bad = [f"{module} imports {name}" for module, names in graph().items() if module.startswith("effinfer.engine")
           for name in names if name.startswith(concrete)]
    assert not bad, bad

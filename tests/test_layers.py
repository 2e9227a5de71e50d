"""The package's folders are its layers (README.md, Layout): a module imports only from its own
layer or from the layers below it that MAY_IMPORT names, and no two modules import each other,
directly or round a loop.
Every import counts, those inside functions too (a lazy import is still a dependency).

An AST walk over the source, so a wrong import fails here before anything runs it."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = "densenet_exp"
# Top to bottom. "entry" and "base" are the modules at the package's root: the entry points of
# `python -m densenet_exp.X`, and the torch-free names, config and checks every layer uses.
ENTRY_POINTS = ("run", "job", "report", "export", "replay", "search", "study", "bench")
LAYERS = ("entry", "training", "probes", "models", "runs", "claims", "analysis", "measures", "base")
# What each layer may import besides itself: a partial order (probes and analysis both use
# measures, and neither uses the other).
MAY_IMPORT = {
    "entry": set(LAYERS[1:]),
    "training": {"probes", "models", "runs", "measures", "base"},
    "probes": {"models", "measures", "base"},
    "models": {"base"},
    "runs": {"base"},
    "claims": {"analysis", "measures", "base"},
    "analysis": {"measures", "base"},
    "measures": {"base"},
    "base": set(),
}
# Layers whose modules import no torch, torchvision or Lightning (the report and the config
# checks stay light).
TORCH_FREE = ("claims", "analysis", "measures", "base")
TORCH = ("torch", "torchvision", "lightning")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")[1:]
    if len(parts) >= 2 or (parts and (Path(ROOT) / PACKAGE / parts[0]).is_dir()):
        return parts[0]
    return "entry" if parts and parts[0] in ENTRY_POINTS else "base"


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Each module of the package -> the modules (package-internal or external tops) it imports."""
    modules = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from . import x` names a module x where there is one
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                found.update(subs or [target])
        graph[module] = {m for m in found if m != module}
    return graph


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a (layer) imports b (layer)' for each import of a layer that MAY_IMPORT does not allow."""
    bad = []
    for module, deps in internal(graph).items():
        for dep in sorted(deps):
            mine, theirs = layer_of(module), layer_of(dep)
            if theirs != mine and theirs not in MAY_IMPORT.get(mine, ()):
                bad.append(f"{module} ({mine}) imports {dep} ({theirs})")
    return bad


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = internal(graph)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def folder_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    layers: dict[str, set[str]] = defaultdict(set)
    for module, deps in internal(graph).items():
        layers[layer_of(module)].update(layer_of(d) for d in deps if layer_of(d) != layer_of(module))
    return loops({f"{PACKAGE}.{k}": {f"{PACKAGE}.{d}" for d in v} for k, v in layers.items()})


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").exists()}
    assert folders <= set(LAYERS), folders - set(LAYERS)
    assert set(ENTRY_POINTS) <= {p.stem for p in (ROOT / PACKAGE).glob("*.py")}


def test_the_layers_are_ordered():
    assert set(MAY_IMPORT) == set(LAYERS)
    assert all(LAYERS.index(d) > LAYERS.index(layer) for layer, deps in MAY_IMPORT.items() for d in deps)


def test_imports_go_only_downward():
    assert upward_imports(imports()) == []


def test_no_import_loops_between_modules_or_folders():
    graph = imports()
    assert loops(graph) == []
    assert folder_loops(graph) == []


def test_lower_layers_import_no_torch():
    heavy = [f"{m} imports {d}" for m, deps in imports().items() if layer_of(m) in TORCH_FREE
             for d in sorted(deps) if d.split(".")[0] in TORCH]
    assert heavy == []


def test_benchmarks_are_not_imported_by_the_package():
    assert [m for m, deps in imports().items() if any(d.split(".")[0] == "benchmarks" for d in deps)] == []


def test_the_checks_catch_an_upward_import_and_a_loop():
    graph = {"densenet_exp.record": set(), "densenet_exp.analysis.results": {"densenet_exp.record"},
             "densenet_exp.runs.store": {"densenet_exp.record"}}
    assert upward_imports(graph) == [] and loops(graph) == []
    graph["densenet_exp.record"] = {"densenet_exp.analysis.results"}
    assert upward_imports(graph) == ["densenet_exp.record (base) imports densenet_exp.analysis.results (analysis)"]
    assert loops(graph) == [["densenet_exp.analysis.results", "densenet_exp.record"]]


# `--help` of the two commands a researcher types most stays fast: neither loads torch or Lightning.
HELP_PROBE = """
import runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except SystemExit as end:
    assert end.code in (0, None), end.code
print("heavy:", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("module", ["densenet_exp.run", "densenet_exp.report"])
def test_help_imports_neither_torch_nor_lightning(module):
    code = HELP_PROBE.format(module=module, heavy=TORCH)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or "powered by hydra" in done.stdout.lower(), done.stdout[:500]
    assert done.stdout.splitlines()[-1] == "heavy: []", done.stdout[-500:]

"""The package's import structure: one-way layers, no cycle, no private names across modules, empty __init__s.

Every ``import`` / ``from ... import`` in ``easytune/`` counts, at module level and inside functions alike
(relative imports resolved; ``from easytune.models import hf`` is an import of ``easytune.models.hf``). The
layer order is the one of docs/architecture.md (low to high; a module imports only its own layer or below):

    1  config, mixture, config_check, presets, paths, lora, quant, sharding, tokenizer
    2  models/*
    3  data/*
    4  generate, adapter, estimate, eval
    5  train/*
    6  export
    7  cli

Cycles are found with Tarjan's strongly connected components over the module graph.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_ROOT = REPO / "easytune"

LAYERS = {
    "easytune": 0,  # the package itself (its __init__ holds only a docstring)
    "easytune.config": 1, "easytune.paths": 1, "easytune.lora": 1, "easytune.quant": 1,
    "easytune.sharding": 1, "easytune.tokenizer": 1, "easytune.presets": 1, "easytune.config_check": 1,
    "easytune.vocab": 1,
    "easytune.mixture": 1,
    "easytune.models": 2,
    "easytune.data": 3,
    "easytune.generate": 4, "easytune.adapter": 4, "easytune.estimate": 4, "easytune.eval": 4,
    "easytune.train": 5,
    "easytune.export": 6,
    "easytune.cli": 7,
}


@dataclasses.dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` (both dotted module names) at ``path:line``."""
    importer: str
    imported: str
    path: str
    line: int


def module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (``__init__.py`` names the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from X import ...`` names (relative levels resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclasses.dataclass
class Findings:
    edges: list[Edge]
    private: list[str]     # "path:line: message"
    init_imports: list[str]


def analyse(root: pathlib.Path = PACKAGE_ROOT, package: str = "easytune") -> Findings:
    """Parses every module under ``root`` and collects import edges, private-name uses and __init__ imports."""
    modules = module_files(root, package)
    edges, private, init_imports = [], [], []
    for module, path in modules.items():
        rel = path.relative_to(root.parent)
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        bound: dict[str, str] = {}  # local name -> easytune module it is bound to (file-wide approximation)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and is_package:
                if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                    init_imports.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not _in_package(alias.name, package):
                        continue
                    edges.append(Edge(module, alias.name, str(rel), node.lineno))
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(node, module, is_package)
                if not _in_package(source, package):
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in modules:
                        edges.append(Edge(module, sub, str(rel), node.lineno))
                        bound[alias.asname or alias.name] = sub
                    else:
                        edges.append(Edge(module, source, str(rel), node.lineno))
                        if _is_private(alias.name):
                            private.append(f"{rel}:{node.lineno}: imports private name {alias.name!r} "
                                           f"from {source}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in bound:
                continue
            target = bound[base.id]
            for attr in reversed(chain):
                if f"{target}.{attr}" in modules:
                    target = f"{target}.{attr}"
                    continue
                if _is_private(attr) and target != module:
                    private.append(f"{rel}:{node.lineno}: uses private name {target}.{attr}")
                break
    # an attribute chain a.b._c is visited once per prefix (a.b._c and a.b); keep each finding once
    private = sorted(set(private))
    return Findings(edges, private, init_imports)


def layer_of(module: str) -> int | None:
    """The layer of ``module``: its own entry in LAYERS or its subpackage's (``easytune.models.x`` -> 2); a
    top-level module missing from LAYERS has none."""
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    return LAYERS.get(module)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (node -> successors), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def cycles(edges: list[Edge]) -> list[str]:
    """One message per import cycle: its modules, then the import lines that close it."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    messages = []
    for component in strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        lines = sorted({f"    {e.path}:{e.line}: {e.importer} -> {e.imported}" for e in edges
                        if e.importer in members and e.imported in members})
        messages.append(f"cycle through {len(component)} modules: {', '.join(component)}\n" + "\n".join(lines))
    return messages


@pytest.fixture(scope="module")
def findings() -> Findings:
    return analyse()


def test_every_module_has_a_layer():
    unknown = [m for m in module_files(PACKAGE_ROOT, "easytune") if layer_of(m) is None]
    assert not unknown, f"modules missing from LAYERS in {__file__} (and docs/architecture.md): {unknown}"


def test_no_import_cycle(findings):
    found = cycles(findings.edges)
    assert not found, f"{len(found)} import cycle(s) in easytune/:\n" + "\n".join(found)


def upward_imports(edges: list[Edge]) -> list[str]:
    """One message per import of a module from a higher layer: file, line, both modules and layers."""
    return sorted({f"{e.path}:{e.line}: {e.importer} (layer {layer_of(e.importer)}) imports {e.imported} "
                   f"(layer {layer_of(e.imported)})" for e in edges
                   if None not in (layer_of(e.importer), layer_of(e.imported))
                   and layer_of(e.imported) > layer_of(e.importer)})


def test_imports_only_run_down_the_layers(findings):
    upward = upward_imports(findings.edges)
    assert not upward, f"{len(upward)} import(s) up the layer order:\n" + "\n".join(upward)


def test_no_private_names_across_modules(findings):
    assert not findings.private, (f"{len(findings.private)} use(s) of another module's private names (make the "
                                  f"helper public in its one home):\n" + "\n".join(findings.private))


def test_package_inits_import_nothing(findings):
    assert not findings.init_imports, ("package __init__.py files hold only a docstring; callers import from the "
                                       "module that defines a name:\n" + "\n".join(findings.init_imports))


def test_checker_finds_what_it_should(tmp_path):
    """The analysis itself, on a made-up package: a function-level relative import closing a cycle, an upward
    import, a private name by import and by attribute, and an __init__ that re-exports."""
    pkg = tmp_path / "easytune"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""doc."""\n')
    (pkg / "models" / "__init__.py").write_text("from .llama import Model\n")
    (pkg / "models" / "llama.py").write_text("def f():\n    from ..config import x\n    return x\nModel = 1\n")
    (pkg / "config.py").write_text("from easytune.models import llama\nfrom easytune.quant import _pack\n"
                                   "x = llama._helper\n")
    (pkg / "quant.py").write_text("import easytune.config as cfg\n_pack = 1\ny = cfg.x\n")
    found = analyse(pkg, "easytune")
    edges = {(e.importer, e.imported) for e in found.edges}
    assert ("easytune.models.llama", "easytune.config") in edges
    assert ("easytune.config", "easytune.models.llama") in edges
    assert ("easytune.models", "easytune.models.llama") in edges
    (cycle,) = cycles(found.edges)
    assert cycle.startswith("cycle through 3 modules: easytune.config, easytune.models.llama, easytune.quant")
    assert "easytune/models/llama.py:2: easytune.models.llama -> easytune.config" in cycle
    assert upward_imports(found.edges) == [
        "easytune/config.py:1: easytune.config (layer 1) imports easytune.models.llama (layer 2)"]
    assert any("private name '_pack'" in p for p in found.private)
    assert any("easytune.models.llama._helper" in p for p in found.private)
    assert found.init_imports == ["easytune/models/__init__.py:1: from .llama import Model"]

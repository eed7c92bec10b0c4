"""The package's import structure: each module imports only from its own layer or the layers below, and
module-level imports form no cycle. Read with `ast`, so the test imports nothing it checks."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "slimlm"

# Highest first. A module may import from its own layer and every layer below it, never above.
LAYERS: list[tuple[str, ...]] = [
    ("cli", "commands"),  # the command line: parse flags, call the library, print
    ("server", "bench", "cluster"),  # applications over the engine (cluster replicas serve through server)
    ("engine", "train", "eval", "plan", "guard", "generation"),  # what the commands drive
    ("models", "kv", "quant", "kernels", "loading", "tokenizer", "optim"),  # the building blocks
    # the vocabulary every layer speaks: "" is slimlm/__init__.py
    ("config", "errors", "progress", "output_dir", "settings", "formats", "devices", "heap", ""),
]
LAYER = {top: len(LAYERS) - i for i, names in enumerate(LAYERS) for top in names}

# Imports inside functions that run up the layers, each with its reason. Keep this short.
ALLOWED_UPWARD = {
    # A Ray replica rebuilds the engine from `slimlm serve`'s own flags, in its own process.
    ("slimlm.cluster.launch", "slimlm.commands.common"),
    ("slimlm.cluster.replica", "slimlm.commands.common"),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module an imported name lives in (`slimlm.kv.paged.PagedKVCache` -> `slimlm.kv.paged`)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, module_level_only: bool) -> set[str]:
    """The slimlm modules `module` imports (at module level only, or anywhere)."""
    found: set[str] = set()

    def add(node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            # `from slimlm.train import checkpoint` imports the submodule, not the package's names
            names = subs + ([base] if len(subs) < len(node.names) else [])
        for name in names:
            if name == "slimlm" or name.startswith("slimlm."):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                add(node)
            elif isinstance(node, ast.If):
                if not _type_checking(node):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)

    tree = ast.parse(path.read_text(encoding="utf-8"))
    if module_level_only:
        visit(tree.body)
    else:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                add(node)
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYER, f"{module}: put slimlm/{top} in a layer of tests/test_layers.py"
    return LAYER[top]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_runs_up_the_layers():
    upward = set()
    for module, path in MODULES.items():
        for target in _imports(module, path, module_level_only=False):
            if _layer(target) > _layer(module):
                upward.add((module, target))
    assert upward - ALLOWED_UPWARD == set(), "imports that run up the layers"
    assert ALLOWED_UPWARD - upward == set(), "allowed upward imports that no longer exist: drop them"


def test_no_import_cycle():
    graph = {m: _imports(m, p, module_level_only=True) for m, p in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert cycles == [], "modules that import each other at module level"


def test_the_checker_sees_what_it_must():
    """The walker finds a known upward import and a known cycle when they are there (guards against a
    checker that silently sees nothing)."""
    assert "slimlm.engine.config" in _imports("slimlm.engine.llm", MODULES["slimlm.engine.llm"], True)
    assert "slimlm.commands.common" in _imports(
        "slimlm.cluster.replica", MODULES["slimlm.cluster.replica"], False
    )
    assert "slimlm.commands.common" not in _imports(
        "slimlm.cluster.replica", MODULES["slimlm.cluster.replica"], True
    )

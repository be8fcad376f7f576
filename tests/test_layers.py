"""Imports between the library's modules, read from the source with `ast` (nothing is
imported): no cycle, and every import goes down the layers. Imports inside functions count.
Test modules import shared builders from helpers.py, never from each other."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "superweights"

LAYERS = {
    # lowest first; a module imports modules of its own layer or of lower ones only
    "plumbing": ("__init__", "errors", "settings", "config", "outputs", "genes", "rule_io"),
    "core": ("probe", "confirm", "editing"),  # model-agnostic: plumbing only
    "data": ("data",),
    "model": ("model",),  # spike tracking runs the core probe during training
    "stages": (),  # every module not named here; scores runs the model, so it is one
    "top": ("cli", "report", "captions"),
}
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    """`model.train` for model/train.py, `data` for data/__init__.py, `__init__` for the root."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    for name, members in LAYERS.items():
        if any(module == m or module.startswith(f"{m}.") for m in members):
            return name
    return "stages"


def resolve(name: str) -> str | None:
    """The module that `superweights.x.y` names (`__init__` for `superweights`), or None
    outside the package."""
    parts = name.split(".")
    if parts[0] != "superweights":
        return None
    module = ".".join(parts[1:]) or "__init__"
    return module if module in MODULES else None


def imports(module: str) -> list[tuple[str, int]]:
    """The package modules that `module` imports anywhere in its file, with the line."""
    path = MODULES[module]
    package = [] if module == "__init__" else module.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:
                base = ["superweights", *package[: len(package) - node.level + 1], *base]
            base = ".".join(base)
            # `from package import name` imports the submodule `name` where there is one
            targets = [resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in dict.fromkeys(targets) if t not in (None, module)]
    return found


def dotted(module: str) -> str:
    return "superweights" if module == "__init__" else f"superweights.{module}"


GRAPH = {module: imports(module) for module in MODULES}


def test_the_table_names_existing_modules():
    named = [m for members in LAYERS.values() for m in members]
    missing = [m for m in named if not any(k == m or k.startswith(f"{m}.") for k in MODULES)]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def test_imports_go_down_the_layers():
    upward = [
        f"superweights/{MODULES[a].relative_to(PACKAGE)}:{line}: {dotted(a)} ({layer(a)}) "
        f"imports {dotted(b)} ({layer(b)})"
        for a, targets in GRAPH.items()
        for b, line in targets
        if RANK[layer(b)] > RANK[layer(a)]
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges = {a: sorted({b for b, _ in targets}) for a, targets in GRAPH.items()}
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in edges[module]:
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(map(dotted, cycle)))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module)


def test_no_test_module_imports_another():
    """Shared builders live in helpers.py and fixtures in conftest.py, never in a test module."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            found += [
                f"tests/{path.name}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0].startswith("test_") or name == "conftest"
            ]
    assert not found, "\n".join(found)

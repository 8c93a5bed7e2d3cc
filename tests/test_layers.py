"""The package's layers, read from its source: imports point down, never up, and no two
modules import each other (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import aiockpt

ROOT = Path(aiockpt.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function: names of modules
    (``aiockpt.x.y``) or of other top-level packages (``anyio``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` imports the module pkg.mod
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
            found.update(subs or [module])
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _internal(name: str) -> set[str]:
    return {m for m in GRAPH[name] if m in MODULES and m != name}


def _in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


ASYNC_LIBRARIES = ("anyio", "asyncio", "trio", "sniffio", "uvloop")


@pytest.mark.parametrize("layer", ["aiockpt._core", "aiockpt._staging", "aiockpt.storage"])
def test_lower_layers_use_no_event_loop(layer: str) -> None:
    offenders = {
        name: sorted(m for m in GRAPH[name] if _in(m, *ASYNC_LIBRARIES))
        for name in MODULES
        if _in(name, layer)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# What each layer may import from the package (beyond itself): the vocabulary modules
# and the layers below it.
VOCABULARY = ("aiockpt._exceptions", "aiockpt._options", "aiockpt._request", "aiockpt._dist")
ALLOWED_BELOW = {
    "aiockpt._staging": ("aiockpt._staging",),
    "aiockpt.storage": ("aiockpt.storage", "aiockpt._staging", "aiockpt._ranks", *VOCABULARY),
    "aiockpt._core": ("aiockpt._core", "aiockpt._staging", "aiockpt._ranks", *VOCABULARY),
    "aiockpt._ranks": (),
    "aiockpt._exceptions": (),
    "aiockpt._request": ("aiockpt._exceptions", "aiockpt._ranks"),
    "aiockpt._dist": ("aiockpt._exceptions", "aiockpt._ranks", "aiockpt._request"),
    "aiockpt._options": ("aiockpt._exceptions", "aiockpt._ranks", "aiockpt._dist"),
}


@pytest.mark.parametrize("layer", sorted(ALLOWED_BELOW))
def test_layers_import_only_what_lies_below_them(layer: str) -> None:
    allowed = ALLOWED_BELOW[layer]
    offenders = {
        name: sorted(m for m in _internal(name) if not _in(m, *allowed))
        for name in MODULES
        if _in(name, layer)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_command_line_and_nvrx_names_import_dcp() -> None:
    """The checkpoint managers find the DCP format by name (``_formats``); the engine,
    storage and facades never import it. Above it: the CLI and NVRx's module paths."""
    importers = {
        name
        for name in MODULES
        if not _in(name, "aiockpt.dcp", "aiockpt.compat")
        and any(_in(m, "aiockpt.dcp") for m in _internal(name))
    }
    assert importers == {"aiockpt._cli._main"}


def test_nothing_in_the_library_imports_the_command_line_tools() -> None:
    importers = {
        name
        for name in MODULES
        if not _in(name, "aiockpt._cli") and any(_in(m, "aiockpt._cli") for m in _internal(name))
    }
    assert importers == {"aiockpt.__main__"}


def test_no_import_cycles() -> None:
    """No module reaches itself through the modules it imports (package ``__init__``
    re-exports aside: they import what they re-export and nothing imports them back)."""
    inits = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    edges = {n: _internal(n) - inits for n in MODULES if n not in inits}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_checks_see_real_imports() -> None:
    """The graph is read correctly: known edges are there (else every check above would
    pass vacuously)."""
    assert "aiockpt._core._callers" in GRAPH["aiockpt._core._engine"]
    assert "aiockpt._core._transport" in GRAPH["aiockpt._core._worker"]
    assert "anyio" in GRAPH["aiockpt._async_queue"]
    assert "aiockpt.dcp" in GRAPH["aiockpt._cli._main"]

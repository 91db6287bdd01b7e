"""The modules of src/kvserve import each other without cycles, and nothing imports the CLI.

The graph is read from the source with `ast`, so it counts every import: at the top of a
module, inside functions (the lazy ones), relative ones. An edge goes to the module that is
named: `from kvserve import native` is an edge to kvserve.native, `from kvserve.estimate
import ModelShape` one to the package kvserve.estimate (its __init__). A cycle is a strongly
connected component of that graph with more than one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name → file, for every module of `package` under `src` (a package is its __init__)."""
    modules = {}
    for path in (src / package).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name `module` imports; `from x import y` gives x.y (y may be a module or a name in x)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module → the modules of `package` it imports; a name resolves to its longest prefix that is a module."""
    modules = module_files(src, package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = set()
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def _describe(components: list[set[str]] | set[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in components)


def test_kvserve_has_no_import_cycles() -> None:
    found = {frozenset(c) for c in cycles(import_graph(SRC, "kvserve"))}
    assert not found, f"import cycles in src/kvserve: {_describe(found)}"


def test_nothing_imports_the_cli() -> None:
    """`kvserve` (entrypoints/cli.py) sits above everything: it may import any module, none may import it."""
    graph = import_graph(SRC, "kvserve")
    assert sorted(m for m, targets in graph.items() if "kvserve.entrypoints.cli" in targets) == []


def test_the_graph_sees_lazy_relative_and_from_package_imports(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "A = 1\ndef f():\n    from .sub import b\n",    # lazy and relative: a -> pkg.sub.b
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from pkg import c\n",                      # a module named from its package: b -> pkg.c
        "pkg/c.py": "import pkg.sub.d\n",                           # c -> pkg.sub.d
        "pkg/sub/d.py": "from .. import a\nfrom pkg.a import A\n",  # d -> pkg.a (twice)
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.sub.d"}, "pkg.sub.d": {"pkg.a"}}
    assert [sorted(c) for c in cycles(graph)] == [["pkg.a", "pkg.c", "pkg.sub.b", "pkg.sub.d"]]

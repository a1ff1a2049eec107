"""portfwd's modules import each other without a cycle: every import counts, the
ones inside functions too (a lazy import is still a dependency); only imports for
type checking (``if TYPE_CHECKING:``) are left out."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import portfwd

PACKAGE = os.path.dirname(os.path.abspath(portfwd.__file__))


def modules(root: str = PACKAGE) -> Dict[str, str]:
    """Dotted name (``portfwd.x``) → file of every module of the package."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))[:-3]
                dotted = rel.replace(os.sep, ".")
                out[dotted[:-9] if dotted.endswith(".__init__") else dotted] = os.path.join(
                    folder, name)
    return out


def _typing_only(tree: ast.AST) -> Set[int]:
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip |= {id(n) for sub in node.body for n in ast.walk(sub)}
    return skip


def imports(name: str, path: str, known: Dict[str, str]) -> Set[str]:
    """The package's modules that module ``name`` (file ``path``) imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    skip = _typing_only(tree)
    out: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = (f"{base}.{node.module}" if node.module else base) if node.level \
                else str(node.module)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    out.add(f"{source}.{alias.name}")
                elif source in known:
                    out.add(source)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    return out - {name}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "portfwd.cmdline" in graph["portfwd.commands.docs"]  # a lazy import is seen
    assert cycles(graph) == []


def test_a_cycle_is_found() -> None:
    """The check itself: a lazy import back is a cycle, a typing-only one is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from . import x\n"
                     "def f() -> None:\n    from . import y\n")
    skipped = _typing_only(tree)
    kept = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in skipped]
    assert [a.name for n in kept for a in n.names] == ["y"]


def test_every_command_has_its_function() -> None:
    """cli's table names a module and a function for each command ``cmdline`` parses."""
    from portfwd import cli, cmdline

    sub = next(a for a in cmdline.parser()._actions if a.dest == "command")
    assert set(cli.COMMANDS) == set(sub.choices or ())
    for name in cli.COMMANDS:
        assert callable(cli.command(name)), name

"""The package's import graph: no module imports (in any form, at any depth, also inside a function) a module that
imports it back, directly or round a longer circle; and nothing below the command line imports it."""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pfanet"
# The command line: `pfanet.cli`, the dispatcher, and `pfanet.commands`, one module per command; `__main__` runs it
COMMAND_LINE = ("pfanet.cli", "pfanet.commands", "pfanet.__main__")


def module_names(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by the name of its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its text: `import pfanet.x`, `from pfanet import x`,
    `from . import x`, `from .x import y`, `from ..x import y`, in functions and branches too.

    `from P import n` counts as importing P.n when that is a module, else P itself. The implicit import of a module's
    own parent packages is left out: every module has it, and counting it would make each package's __init__ that
    re-exports a name from its submodules a circle.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in known else source)
    # `import pfanet.a.b` names pfanet.a.b; keep the longest known prefix of anything else (pfanet.x.Name -> pfanet.x)
    resolved = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imported_modules(name, path, set(names)) for name, path in names.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list: every circle of
    imports, whatever its length, lies inside one."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete circle through the component's first module, for the failure message: a -> b -> ... -> a."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    return component


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert "pfanet.predictor" in graph and "pfanet.export" in graph["pfanet.runtime"]  # the parser sees the package
    found = [" -> ".join(a_circle(graph, c)) for c in circles(graph)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_circle_finder_finds_circles_of_every_form(tmp_path):
    """The checks above, on a made-up package: each form of import, a circle of three, a function's import."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "import pkg.b\nA = 1\n",                        # a -> b
        "b.py": "def f():\n    from .sub import c\n",          # b -> sub.c, inside a function
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import A\n",                       # sub.c -> a: a circle of three
        "d.py": "from . import e\n",                             # d -> e
        "e.py": "from pkg import d\n",                           # e -> d: a pair
        "f.py": "from . import A\nimport os\n",                  # f -> pkg (the __init__), not a module named A
    }
    for name, text in files.items():
        (root / name).write_text(text)
    names = module_names(root)
    graph = {name: imported_modules(name, path, set(names)) for name, path in names.items()}
    assert graph["pkg.f"] == {"pkg"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub"] == set()
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.d", "pkg.e"]]
    assert a_circle(graph, ["pkg.a", "pkg.b", "pkg.sub.c"]) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_no_library_module_imports_the_command_line():
    """The command line dispatches to the library, never the other way round (every form of import counts:
    `from . import cli`, `import pfanet.cli`, `from pfanet.commands import predict`, inside functions too)."""
    graph = import_graph()
    below = {name: targets for name, targets in graph.items() if not name.startswith(COMMAND_LINE)}
    offenders = {name: sorted(t for t in targets if t.startswith(COMMAND_LINE)) for name, targets in below.items()}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_command_line_guard_sees_every_form_of_import(tmp_path):
    root = tmp_path / "pfanet"
    root.mkdir()
    for name, text in {"__init__.py": "", "cli.py": "", "a.py": "from . import cli\n", "b.py": "import pfanet.cli\n",
                       "c.py": "def f():\n    from pfanet.cli import main\n", "d.py": "from .cli import main\n"}.items():
        (root / name).write_text(text)
    names = module_names(root)
    for name in ("pfanet.a", "pfanet.b", "pfanet.c", "pfanet.d"):
        assert imported_modules(name, names[name], set(names)) == {"pfanet.cli"}, name

"""The package's shape: no import cycle between its modules, no private name (``_x``) imported
from another module, no module over the size one reader holds in mind. Read from the source
with ``ast`` (nothing is imported), so a violation names the files involved."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "medusa_jax"
MAX_LINES = 520  # "about 500"


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    out = {}
    base = os.path.join(ROOT, PACKAGE)
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]):
    """``(imported module, [names], lineno)`` for each import of a package module in the file
    (function-level imports included: they are dependencies too)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                mod = ".".join(parts + ([mod] if mod else []))
            if mod.split(".")[0] != PACKAGE:
                continue
            names = [a.name for a in node.names]
            # `from pkg import submodule` depends on the submodule itself
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            for s in subs:
                yield s, [], node.lineno
            rest = [n for n in names if f"{mod}.{n}" not in modules]
            if rest or not subs:
                yield mod, rest, node.lineno


def _graph():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        for target, names, line in _imports(name, path, modules):
            if target not in modules:
                continue
            if target != name and not path.endswith("__init__.py"):
                # a package's __init__ importing its own modules is its interface, not a cycle
                edges[name].add(target)
            private += [f"{os.path.relpath(path, ROOT)}:{line} imports {n} from {target}"
                        for n in names if n.startswith("_") and not n.startswith("__")]
    return modules, edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    _, edges, _ = _graph()
    assert _cycles(edges) == [], "modules that import each other (directly or in a ring)"


def test_no_private_name_crosses_modules():
    _, _, private = _graph()
    assert private == [], "import a public name, or move the helper to where both can use it"


def test_no_module_over_the_size_limit():
    modules = _modules()
    sizes = {os.path.relpath(p, ROOT): sum(1 for _ in open(p, encoding="utf-8"))
             for p in modules.values()}
    big = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert big == {}, f"split these by concern (limit {MAX_LINES} lines)"


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
    """The walker itself: a two-module ring and a private import are found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    modules = {"medusa_jax.x": str(tmp_path / "x.py"), "medusa_jax.y": str(tmp_path / "y.py")}
    (tmp_path / "x.py").write_text("from medusa_jax.y import _hidden, public\n")
    (tmp_path / "y.py").write_text("def _hidden(): ...\ndef public(): ...\n")
    found = list(_imports("medusa_jax.x", modules["medusa_jax.x"], modules))
    assert found == [("medusa_jax.y", ["_hidden", "public"], 1)]

"""Static import analysis with the standard library's ``ast`` (no imports executed): the import graph of the
project's packages, import cycles, and the modules a ``spatial <command>`` (or ``python <script>``) can run."""

from __future__ import annotations

import ast
import functools
import shlex
from pathlib import Path

PACKAGES = ("training", "serving", "tuning")


def parse(path: Path) -> ast.Module:
    """``ast.parse`` of a file, kept while its modification time and size stay the same: the layout tests ask
    for every command's closure, each walks every module, and parsing each file once took them from 31 s to 6.5 s
    on 2 cores. Callers only read the tree."""
    stat = path.stat()
    return _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.cache
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    """CPython 3.11 shares the AST constructor's recursion counter between threads (python/cpython#106905): while a
    server or Ray thread of an earlier test parses too, a parse can fail with "AST constructor recursion depth
    mismatch" (seen once in a CI run sharing 2 cores). The counter is reset at every call, so a few retries parse
    the same, unchanged text."""
    text = path.read_text()
    for _ in range(4):
        try:
            return ast.parse(text)
        except SystemError:
            continue
    return ast.parse(text)


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str], top_level_only: bool = False) -> set[str]:
    """Project modules imported by ``tree`` (anywhere, so lazy imports inside functions count, unless
    ``top_level_only``); ``from a import b`` counts ``a.b`` when that is a module, and every parent package."""
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_pkg)
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    out = set()
    for name in found:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return out - {module}


def import_graph(root: Path, top_level_only: bool = False) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {m: imports(parse(f), m, f.name == "__init__.py", known, top_level_only)
            for m, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import): the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _command_name(call: ast.Call, default: str) -> str:
    if call.args and isinstance(call.args[0], ast.Constant):
        return call.args[0].value
    named = next((k.value.value for k in call.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)), None)
    return named or default.replace("_", "-")


def _is_command(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "command"


def command_modules(root: Path) -> dict[str, tuple[str, list[ast.AST]]]:
    """``spatial`` command name -> (CLI module, the command function and the module-level functions it calls,
    transitively), from ``@app.command(...)`` decorators and ``app.command("name")(function)`` calls."""
    out = {}
    for m, f in module_files(root, ("serving",)).items():
        if not m.startswith("serving.cli."):
            continue
        tree = parse(f)
        funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        found: dict[str, ast.FunctionDef] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    if _is_command(dec):
                        found[_command_name(dec, node.name)] = node
            elif isinstance(node, ast.Call) and _is_command(node.func) and node.args \
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in funcs:
                found[_command_name(node.func, node.args[0].id)] = funcs[node.args[0].id]
        for name, fn in found.items():
            body, todo = [], [fn]
            while todo:
                f_node = todo.pop()
                if f_node in body:
                    continue
                body.append(f_node)
                todo += [funcs[n.id] for n in ast.walk(f_node) if isinstance(n, ast.Name) and n.id in funcs]
            out[name] = (m, body)
    return out


def closure(root: Path, command: str) -> set[str]:
    """Every project module one shell command can import. ``spatial <cmd>``: the console entry's top-level
    imports (the CLI modules, their shared options), the command function's own (lazy) imports, then everything
    those import, lazily too. ``python <file>``: that file's imports, transitively."""
    files = module_files(root)
    known = set(files)
    graph = import_graph(root)
    top = import_graph(root, top_level_only=True)
    words = shlex.split(command)
    if not words:
        return set()
    if words[0] == "spatial":
        cmds = command_modules(root)
        name = next((w for w in words[1:] if not w.startswith("-")), None)
        if name not in cmds:
            raise KeyError(f"'{command}': no spatial command '{name}' in serving/cli")
        module, body = cmds[name]
        start = {"serving.cli.main"}.union(*(imports(fn, module, False, known) for fn in body))
        todo, seen = list(start), set()
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            # CLI modules run only their top level (other commands' lazy imports never execute)
            todo += sorted((top if m.startswith("serving.cli") else graph).get(m, ()))
        return seen
    script = next((w for w in words if w.endswith(".py")), None)
    if script is None:
        return set()
    tree = parse(root / script)
    todo = sorted(imports(tree, "__main__", False, known))
    seen = set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(graph.get(m, ()))
    return seen


def has_code(path: Path) -> bool:
    """False for a package ``__init__`` that holds only a docstring / ``__all__`` (a module map)."""
    body = parse(path).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
               and not (isinstance(n, ast.Assign) and all(getattr(t, "id", "") == "__all__" for t in n.targets))
               and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
               for n in body)

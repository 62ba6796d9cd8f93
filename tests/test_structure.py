"""The house rules, read from the source with ast: no import cycles inside jaxft/, nothing below
the CLI imports it, no function over 60 lines, and a late import only with a comment saying why."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "jaxft"
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(mod: str, tree: ast.Module) -> set[str]:
    """The jaxft modules `mod` imports anywhere in its body."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if (PKG / "/".join(mod.split(".")[1:]) / "__init__.py").exists() \
                    else mod.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n and n != mod:
                found.add(n)
    return found


GRAPH = {m: _imports(m, t) for m, t in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_graph_is_read():
    """Guards the checks below: the walk must see the package's real edges."""
    assert "jaxft.state" in GRAPH["jaxft.train"] and "jaxft.kernels" in GRAPH["jaxft.model"]
    assert "jaxft.errors" in GRAPH["jaxft.tasks"] and "jaxft.tasks" in GRAPH["jaxft.tasks.viggo"]


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_no_import_cycle(mod):
    assert _cycle_from(mod) is None, " -> ".join(_cycle_from(mod))


def test_nothing_below_the_cli_imports_it():
    offenders = sorted(m for m, deps in GRAPH.items() if "jaxft.__main__" in deps)
    assert offenders == []


def _functions():
    for mod, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield mod, node


def test_no_function_over_60_lines():
    long = [f"{m}.{f.name} ({f.end_lineno - f.lineno + 1} lines)" for m, f in _functions()
            if f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert long == []


def test_late_imports_say_why():
    """An import inside a function is for a heavy optional dependency, and its line says so."""
    bare = []
    for mod, fn in _functions():
        path = PKG.parent / (mod.replace(".", "/") + ("/__init__.py" if mod == "jaxft" else ".py"))
        lines = path.read_text().splitlines() if path.exists() else \
            (PKG.parent / mod.replace(".", "/") / "__init__.py").read_text().splitlines()
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]:
                bare.append(f"{mod}:{node.lineno}")
    assert bare == []

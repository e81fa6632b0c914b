"""The package's shape: no import cycles, no print in library code, no test fixtures shipped,
the feature defaults written once (checked statically, from the sources)."""
from __future__ import annotations

import ast
from pathlib import Path

import gmp_pipeline

PKG = Path(gmp_pipeline.__file__).parent
#: modules allowed to print: the command line (and the code generator's ``__main__`` block)
MAY_PRINT = {"gmp_pipeline.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every gmp_pipeline module ``name`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def add(target: str, names=()):
        for n in names:
            if f"{target}.{n}" in modules:
                found.add(f"{target}.{n}")
                break
        else:
            if target in modules:
                found.add(target)
        for n in names:            # "from . import a, b": each submodule named
            if f"{target}.{n}" in modules:
                found.add(f"{target}.{n}")

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gmp_pipeline"):
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("gmp_pipeline"):
                add(target, [a.name for a in node.names])
    found.discard(name)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _under_main_guard(tree) -> set[int]:
    lines = set()
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            for sub in ast.walk(node):
                if hasattr(sub, "lineno"):
                    lines.add(sub.lineno)
    return lines


def test_library_code_does_not_print():
    offenders = []
    for name, path in _modules().items():
        if name in MAY_PRINT:
            continue
        tree = ast.parse(path.read_text(), str(path))
        script = _under_main_guard(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print" and node.lineno not in script):
                offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not offenders, "print() in library code (log through logging instead): " + \
        ", ".join(offenders)


def test_no_test_fixture_code_in_the_package():
    names = [p.name for p in PKG.rglob("*.py")]
    assert not [n for n in names if "writer" in n and n != "writer.py"], names


def test_feature_defaults_are_written_once():
    """Only the shipped YAML holds the default feature values; the code reads them from it."""
    from gmp_pipeline import GMPFeaturizer
    from gmp_pipeline.config import DEFAULT_FEATURES, feature_defaults, load_feature_config

    assert feature_defaults() == load_feature_config(DEFAULT_FEATURES)
    fz = GMPFeaturizer()
    d = feature_defaults()
    assert fz.orders == d["orders"] and fz.sigmas == sorted(d["sigmas"])
    assert fz.overlap_threshold == d["overlap_threshold"] and fz.square == d["square"]
    for path in PKG.rglob("*.py"):
        assert "0.2, 0.4, 0.6, 0.8, 1.0" not in path.read_text(), path

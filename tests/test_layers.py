"""The packages' dependencies point one way and no module imports itself back (read from the source,
without importing anything): nmoe <- nmoe_models, broker <- agents <- scenarios."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nmoe", "broker", "agents", "nmoe_models", "scenarios")
ALLOWED = {  # package -> the project packages it may import
    "nmoe": set(),
    "nmoe_models": {"nmoe"},
    "broker": {"nmoe"},
    "agents": {"nmoe", "broker", "nmoe_models"},
    "scenarios": {"nmoe", "broker", "agents", "nmoe_models"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Project modules imported by ``path`` (absolute and relative imports, at any depth)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}


def test_packages_import_only_the_layers_below_them():
    for module, deps in graph().items():
        own = module.split(".")[0]
        wrong = sorted(d for d in deps if d.split(".")[0] not in ALLOWED[own] | {own})
        assert not wrong, f"{module} imports {wrong}"


def test_there_are_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if d.startswith(f"{m}."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])

"""Stage order (docs/architecture.md): no import cycles, and no stage imports a later one.

Every ``import`` in ``src/appleswap`` counts, also the ones inside functions: a cycle kept alive by a deferred
import is still a cycle for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "appleswap"

# the stages in pipeline order; a module may import its own stage and earlier ones only
STAGES = (
    ("files", "config", "weights", "devices", "cli_common", "registry", "parity", "workers", "provenance", "native_logs"),  # the core
    ("faces", "face_metrics"),
    ("preprocess",),
    ("identity",),
    ("model",),
    ("sampling",),
    ("speed",),
    ("pipeline",),
    ("generate", "train"),
    ("eval",),
    ("app", "benchmark"),
    ("cli",),
)


def module_name(path: Path) -> str:
    parts = ["appleswap", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], package: str = "appleswap") -> set[str]:
    """Every appleswap module ``path`` (in ``package``) imports, at any depth of its code (``from a import b``
    counts ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                    else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.startswith("appleswap"))
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in SRC.rglob("*.py")}
    known = set(paths)
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imported_modules(path, known, package) - {name}
    return graph


def stage_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top == "":
        return 0  # the package itself (version)
    for rank, names in enumerate(STAGES):
        if top in names:
            return rank
    raise AssertionError(f"{module} belongs to no stage: add it to STAGES")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_are_counted(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from appleswap.speed import fusion\n    import appleswap.files\n")
    assert imported_modules(module, {"appleswap.speed", "appleswap.speed.fusion", "appleswap.files"}) == {
        "appleswap.speed.fusion", "appleswap.files"}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_stage_imports_a_later_one():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() for target in sorted(targets)
              if stage_of(target) > stage_of(module) and not target.startswith(module + ".")]
    assert not upward, "imports of a later stage:\n" + "\n".join(sorted(upward))

"""House size limits (spec style.md rule 1), measured with ``ast`` so the build fails when code outgrows them.

Modules <= 400 lines (model files <= 800); functions <= 50 lines, except ``SwapPipeline.__call__`` and CLI
dispatchers (<= 100); median function length <= 20.
"""

from __future__ import annotations

import ast
import statistics
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "appleswap"
MODEL_FILES = {"model/transformer.py", "speed/transformer.py"}  # the reference model; its fast subclass
LONG_FUNCTIONS_ALLOWED = {"__call__", "run", "main", "build_parser", "add_parser"}


def _python_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_module_sizes():
    too_long = []
    for path in _python_files():
        rel = path.relative_to(SRC).as_posix()
        limit = 800 if rel in MODEL_FILES else 400
        lines = len(path.read_text().splitlines())
        if lines > limit:
            too_long.append(f"{rel}: {lines} lines > {limit}")
    assert not too_long, "\n".join(too_long)


def test_function_sizes():
    too_long, lengths = [], []
    for path in _python_files():
        for node, length in _functions(ast.parse(path.read_text())):
            lengths.append(length)
            limit = 100 if node.name in LONG_FUNCTIONS_ALLOWED else 50
            if length > limit:
                too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {length} lines > {limit}")
    assert not too_long, "\n".join(too_long)
    assert statistics.median(lengths) <= 20

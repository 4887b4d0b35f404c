"""Every test checks something: an AST walk over tests/ finds test functions that cannot fail on a wrong result.

The rule: a ``test_*`` function (module level or in a ``Test*`` class) must contain, in its own body,
* an ``assert`` statement, or
* a ``pytest.raises`` / ``pytest.warns`` / ``pytest.fail`` call (or ``with`` block), or
* a call to a checker: a name starting with ``assert`` or ``check`` (``torch.testing.assert_close``,
  ``np.testing.assert_array_equal``, ``_check_restores``, ...; a leading underscore is ignored), or
* a call to a helper defined in the same file that itself follows this rule (e.g. a shared ``_roundtrip``).
A test that only runs code ("it did not crash") passes whatever the code returns.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PYTEST_CHECKS = {"raises", "warns", "fail", "deprecated_call"}


def _call_name(node: ast.Call) -> tuple[str | None, str]:
    """(owner, name) of a call: ``pytest.raises`` -> ("pytest", "raises"), ``helper`` -> (None, "helper")."""
    func = node.func
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    if isinstance(func, ast.Name):
        return None, func.id
    return None, ""


def _checks_directly(function: ast.AST) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            owner, name = _call_name(node)
            if owner == "pytest" and name in PYTEST_CHECKS:
                return True
            if name.lstrip("_").startswith(("assert", "check")):
                return True
    return False


def _helpers_called(function: ast.AST) -> set[str]:
    return {_call_name(node)[1] for node in ast.walk(function) if isinstance(node, ast.Call)}


def _checking_helpers(tree: ast.Module) -> set[str]:
    """Names of the file's non-test functions that check something, directly or through each other."""
    helpers = {node.name: node for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("test_")}
    checking = {name for name, node in helpers.items() if _checks_directly(node)}
    changed = True
    while changed:
        changed = False
        for name, node in helpers.items():
            if name not in checking and _helpers_called(node) & checking:
                checking.add(name)
                changed = True
    return checking


def _tests(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            yield node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            yield from (item for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and item.name.startswith("test_"))


def find_unchecked_tests(root: Path = TESTS) -> list[str]:
    offenders = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        checking = _checking_helpers(tree)
        for test in _tests(tree):
            if not _checks_directly(test) and not (_helpers_called(test) & checking):
                offenders.append(f"{path.relative_to(root.parent)}:{test.lineno} {test.name}")
    return offenders


def test_every_test_function_checks_something():
    offenders = find_unchecked_tests()
    assert not offenders, "tests that cannot fail on a wrong result:\n  " + "\n  ".join(offenders)


def test_the_rule_flags_a_test_that_only_runs_code(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "def _roundtrip(x):\n    assert x == x\n"
        "def _via(x):\n    _roundtrip(x)\n"
        "def test_runs_only():\n    print(1)\n"
        "def test_asserts():\n    assert 1\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "def test_checker():\n    np.testing.assert_allclose(1, 1)\n"
        "def test_helper():\n    _via(1)\n"
        "class TestGroup:\n    def test_method_runs_only(self):\n        pass\n")
    assert find_unchecked_tests(tmp_path / "tests") == ["tests/test_x.py:6 test_runs_only",
                                                         "tests/test_x.py:18 test_method_runs_only"]

"""No function in ``lossympi/`` or ``aggregathor/`` is longer than 80 lines (``def`` to its last line, by ``ast``).

Methods and nested functions count on their own; a nested function's lines also count towards the function
that contains it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lossympi", "aggregathor")
MAX_LINES = 80


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, length)`` of each function of ``source`` longer than ``limit`` lines."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    if length > limit:
                        found.append((name, child.lineno, length))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_no_function_longer_than_80_lines() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {name} is {length} lines"
           for package in PACKAGES
           for path in sorted((ROOT / package).rglob("*.py"))
           for name, line, length in long_functions(path.read_text())]
    assert not bad, f"functions longer than {MAX_LINES} lines (split them):\n" + "\n".join(bad)


def _function(header: str, body_lines: int, indent: str = "") -> str:
    return indent + header + "\n" + "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))


def test_the_measure_counts_methods_nested_and_async_functions() -> None:
    assert long_functions(_function("def f():", 79)) == []  # 80 lines with its def: allowed
    assert long_functions(_function("def f():", 80)) == [("f", 1, 81)]
    method = "class C:\n" + _function("def method(self):", 80, "    ")
    assert long_functions(method) == [("C.method", 2, 81)]
    nested = "async def outer():\n" + _function("def inner():", 80, "    ")
    assert long_functions(nested) == [("outer", 1, 82), ("outer.inner", 2, 81)]

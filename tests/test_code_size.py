"""House style, enforced: in the library packages no module over 500 lines and no function
over 80 (DESIGN.md). A long function is where a second responsibility hides; split it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("still", "eval", "finetune", "distill", "publish")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def library_files(root: Path = ROOT) -> list[Path]:
    return [path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))]


def long_modules(files: list[Path], limit: int = MAX_MODULE_LINES, root: Path = ROOT) -> list[str]:
    return [
        f"{path.relative_to(root)}: {count} lines"
        for path in files
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > limit
    ]


def long_functions(
    files: list[Path], limit: int = MAX_FUNCTION_LINES, root: Path = ROOT
) -> list[str]:
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # from the `def` (or its first decorator) to its last line, docstring included
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = node.end_lineno - start + 1
                if length > limit:
                    found.append(
                        f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines"
                    )
    return found


def test_no_library_module_is_over_500_lines():
    assert long_modules(library_files()) == []


def test_no_library_function_is_over_80_lines():
    assert long_functions(library_files()) == []


def test_the_size_checks_see_a_long_function_and_a_long_module(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "long.py").write_text(f"@staticmethod\ndef long():\n{body}\n")
    (tmp_path / "short.py").write_text("def short():\n    return 1\n")
    files = [tmp_path / "long.py", tmp_path / "short.py"]
    assert long_functions(files, root=tmp_path) == ["long.py:2 long: 82 lines"]
    assert long_modules(files, limit=3, root=tmp_path) == ["long.py: 82 lines"]

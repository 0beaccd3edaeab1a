"""The package layers, enforced: still (core) < eval < finetune, distill < publish.

A package imports only packages below it; finetune and distill do not import each other; only
still/cli.py dispatches upward; and no module imports itself back through others, not even
through an import inside a function. Read from the code with `ast` (every import statement,
wherever it is), so a string mentioning a module does not count and a local import does.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKS = {"still": 0, "eval": 1, "finetune": 2, "distill": 2, "publish": 3}
DISPATCHER = "still.cli"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in the file (relative imports resolved)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` imports the module; `from module import name` the module
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = [p for package in RANKS for p in sorted((root / package).rglob("*.py"))]
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imported_modules(p, root, modules) for p in files}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imports in graph.items():
        if module == DISPATCHER:
            continue
        own = module.split(".")[0]
        for target in sorted(imports):
            other = target.split(".")[0]
            if other == own:
                continue
            if RANKS[other] >= RANKS[own]:
                problems.append(f"{module} imports {target} ({other} is not below {own})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_package_imports_upward_or_sideways():
    assert layer_violations(import_graph(ROOT)) == []


def test_no_import_cycles_even_through_local_imports():
    graph = {module: targets for module, targets in import_graph(ROOT).items()}
    assert cycles(graph) == []


def test_only_the_cli_dispatches_upward():
    graph = import_graph(ROOT)
    upward = {target.split(".")[0] for target in graph[DISPATCHER]}
    assert {"finetune", "distill", "eval", "publish"} <= upward  # it is the dispatcher
    assert all(
        t.split(".")[0] == "still"
        for m, ts in graph.items()
        if m.startswith("still.") and m != DISPATCHER
        for t in ts
    )


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in RANKS:
        (root / package).mkdir(exist_ok=True)
    return root


def test_the_checker_catches_an_upward_import_inside_a_function(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "still/__init__.py": "",
            "still/core.py": "def f():\n    from finetune import sft\n",
            "finetune/__init__.py": "",
            "finetune/sft.py": "from still import core\n",
        },
    )
    graph = import_graph(root)
    assert layer_violations(graph) == [
        "still.core imports finetune.sft (finetune is not below still)"
    ]
    assert cycles(graph) == [["finetune.sft", "still.core"]]


def test_the_checker_catches_sideways_imports_and_resolves_relative_ones(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "still/__init__.py": "",
            "still/a.py": "from . import b\n",
            "still/b.py": "from .a import x\n",
            "distill/__init__.py": "",
            "distill/kd.py": "import finetune.sft as sft\n",
            "finetune/__init__.py": "",
            "finetune/sft.py": "'from distill import kd'  # a string\n",
        },
    )
    graph = import_graph(root)
    assert layer_violations(graph) == [
        "distill.kd imports finetune.sft (finetune is not below distill)"
    ]
    assert cycles(graph) == [["still.a", "still.b"]]

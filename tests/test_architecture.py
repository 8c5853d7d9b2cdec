"""The import contract: stages import only what is upstream of them, and nothing imports in a circle.

Data flows one way through ``imagebuild/``; each stage package has a rank, and a module may
import modules of its own stage or of lower ranks, never of a higher one. Imports inside
functions count as much as those at the top of a module: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "imagebuild"

# Lowest first. Foundation modules (the exception tree, the reporter protocol, the digest
# type, the cache's atomic writes, the version) may be imported by every stage.
STAGES: tuple[tuple[str, ...], ...] = (
    (
        "imagebuild",
        "imagebuild.errors",
        "imagebuild.report",
        "imagebuild.digest",
        "imagebuild.cache",
    ),
    ("imagebuild.net",),
    ("imagebuild.project",),
    ("imagebuild.target",),
    ("imagebuild.index",),
    ("imagebuild.lock",),
    ("imagebuild.build",),
    ("imagebuild.install",),
    ("imagebuild.image",),
    ("imagebuild.debian",),
    ("imagebuild.sinks",),
    ("imagebuild.pipeline",),
    (
        "imagebuild.cli",
        "imagebuild.__main__",
        "imagebuild.commands",
        "imagebuild.launch",
        "imagebuild.server",
        "imagebuild.client",
    ),
)


def rank(module: str) -> int:
    """The stage rank of ``module``: the longest stage prefix that names it."""
    best, found = -1, -1
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    if found < 0:
        raise AssertionError(f"{module} belongs to no stage: add it to STAGES")
    return found


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, *, is_package: bool) -> set[str]:
    """Every ``imagebuild`` module that ``source`` imports, wherever the import stands."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "imagebuild")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "imagebuild":
                continue
            found.add(target)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the imagebuild modules it imports."""
    return {
        module_name(path, root): imports(
            path.read_text(encoding="utf-8"),
            module_name(path, root),
            is_package=path.name == "__init__.py",
        )
        for path in sorted(root.rglob("*.py"))
    }


def violations(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Each import of a downstream stage, as ``a -> b``."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in edges.items()
        for target in targets
        if rank(target) > rank(module)
    )


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Circles among modules (a module importing a package counts as importing it)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target == node or target not in edges:
                continue
            if state.get(target) == 1:
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_stage_imports_downstream() -> None:
    assert violations(graph(PACKAGE)) == []


def test_no_module_imports_in_a_circle() -> None:
    assert cycles(graph(PACKAGE)) == []


def test_every_module_belongs_to_a_stage() -> None:
    for module in graph(PACKAGE):
        rank(module)


def test_the_contract_catches_a_downstream_import(tmp_path: Path) -> None:
    # The checker itself, on a tree where the lock stage reaches into the pipeline
    # lazily (inside a function) and relatively: both are caught.
    root = tmp_path / "imagebuild"
    (root / "lock").mkdir(parents=True)
    (root / "pipeline").mkdir()
    (root / "__init__.py").write_text("")
    (root / "lock" / "__init__.py").write_text("")
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "pipeline" / "build.py").write_text("from imagebuild.lock import model\n")
    (root / "lock" / "model.py").write_text(
        "def f():\n    from ..pipeline import build\n    return build\n"
    )
    assert violations(graph(root)) == ["imagebuild.lock.model -> imagebuild.pipeline"]


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"imagebuild.a": {"imagebuild.b"}, "imagebuild.b": {"imagebuild.a"}}, 1),
        ({"imagebuild.a": {"imagebuild.b"}, "imagebuild.b": set()}, 0),
    ],
)
def test_the_contract_catches_a_circle(edges: dict[str, set[str]], expected: int) -> None:
    assert len(cycles(edges)) == expected


MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions whose body (from its first statement to its end) is longer than ``limit``.

    The body, not the signature: a typer command declares each option on lines of its own.
    """
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.body[0].lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    return found


def test_no_function_is_long() -> None:
    assert long_functions(PACKAGE) == []


def test_no_module_is_long() -> None:
    long = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_MODULE_LINES
    ]
    assert long == []


def test_the_length_check_catches_a_long_function(tmp_path: Path) -> None:
    root = tmp_path / "imagebuild"
    root.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES + 1))
    (root / "m.py").write_text(f"def f():\n{body}\n\ndef g():\n    return 1\n")
    assert long_functions(root) == ["imagebuild/m.py:1 f"]

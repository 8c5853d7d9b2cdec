"""Which of a wheel's extension modules its own code imports only where it can do without.

numba ships ``numba/np/ufunc/tbbpool.cpython-311-x86_64-linux-gnu.so``, linked to Intel's
TBB, and imports it inside ``try: ... except ImportError: pass``: without TBB, numba picks
another threading layer. pyarrow imports its S3, GCS, HDFS and Flight modules so, Pillow
its WebP and AVIF ones. Such a module is not needed for its package to import; lacking a
library, it fails only where the feature is used.

A module counts as *guarded* when its wheel's Python files import it at least once, and
every import of it stands in the body of a ``try`` whose first handler that catches an
``ImportError`` (bare ``except``, ``ImportError``, ``Exception``, ``BaseException``)
raises nothing, or in ``with suppress(...)`` of one of those. A handler that raises again
(numba's ``_typeconv``, which turns the error into a longer message) guards nothing; nor
does ``except ModuleNotFoundError``, which a missing library's ``ImportError`` passes by.
An import inside a function is judged by what surrounds it in that function: the guard
around the definition is gone by the time it runs.

A module no import statement names (imported by ``importlib.import_module``, by C code,
or by the user: ``cv2``, a top-level ``orjson``) is not guarded: nothing says the package
can do without it.
"""

from __future__ import annotations

import ast
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

_CATCHING = frozenset({"ImportError", "Exception", "BaseException"})
"""Exception names whose handler catches the ``ImportError`` of a library that cannot load."""

_DATA_DIR = re.compile(r"^[^/]+\.data/(?:purelib|platlib)/")
"""A wheel's ``<name>.data/purelib/`` or ``platlib/`` prefix: installed where the rest goes."""


def module_of(member: str) -> str:
    """The dotted module name of the wheel member ``member`` (a ``.py`` or an extension).

    ``numba/np/ufunc/tbbpool.cpython-311-x86_64-linux-gnu.so`` -> ``numba.np.ufunc.tbbpool``;
    a package's ``__init__.py`` names the package.
    """
    parts = _DATA_DIR.sub("", member).split("/")
    stem = parts[-1].split(".", 1)[0]
    names = [*parts[:-1], stem] if stem != "__init__" else parts[:-1]
    return ".".join(names)


def guarded_modules(wheel: Path, modules: Iterable[str]) -> frozenset[str]:
    """Those of ``modules`` (dotted names) that ``wheel``'s Python files import, always guarded.

    Only files that name one of the modules' last parts are parsed: a pandas wheel holds
    1,400 Python files, and parsing them all takes seconds.
    """
    wanted = frozenset(modules)
    if not wanted:
        return frozenset()
    names = sorted({re.escape(module.rpartition(".")[2].encode()) for module in wanted})
    pattern = re.compile(rb"\b(?:" + b"|".join(names) + rb")\b")
    guarded: dict[str, bool] = {}
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".py") or info.is_dir():
                continue
            source = archive.read(info)
            if not pattern.search(source):
                continue
            try:
                tree = ast.parse(source)
            except (SyntaxError, ValueError):  # ValueError: a null byte
                continue
            name = module_of(info.filename)
            package = name if info.filename.endswith("__init__.py") else name.rpartition(".")[0]
            for module, is_guarded in _imports(tree, package):
                if module in wanted:
                    guarded[module] = guarded.get(module, True) and is_guarded
    return frozenset(module for module, is_guarded in guarded.items() if is_guarded)


def _imports(tree: ast.AST, package: str) -> Iterator[tuple[str, bool]]:
    """Every module an import statement of ``tree`` may load, and whether it is guarded there.

    ``from a.b import c`` may load ``a.b`` and ``a.b.c`` (a submodule or a name): both.
    """
    todo: list[tuple[ast.AST, bool]] = [(tree, False)]
    while todo:
        node, guarded = todo.pop()
        if isinstance(node, ast.Import):
            yield from ((alias.name, guarded) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            if base is not None:
                yield base, guarded
                yield from ((f"{base}.{alias.name}".lstrip("."), guarded) for alias in node.names)
        elif isinstance(node, ast.Try | ast.TryStar):
            inner = guarded or _guards(node.handlers)
            todo.extend((child, inner) for child in node.body)
            after = [*node.handlers, *node.orelse, *node.finalbody]
            todo.extend((child, guarded) for child in after)
        elif isinstance(node, ast.With | ast.AsyncWith):
            inner = guarded or any(_suppresses(item.context_expr) for item in node.items)
            todo.extend((child, inner) for child in node.body)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend((child, False) for child in ast.iter_child_nodes(node))
        else:
            todo.extend((child, guarded) for child in ast.iter_child_nodes(node))


def _absolute(node: ast.ImportFrom, package: str) -> str | None:
    """The module ``from ... import`` names, made absolute; None past the top package."""
    if not node.level:
        return node.module or ""
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _guards(handlers: Iterable[ast.ExceptHandler]) -> bool:
    """Whether the first handler that catches an ``ImportError`` lets the failure go."""
    for handler in handlers:
        if handler.type is None or _names(handler.type) & _CATCHING:
            return not any(isinstance(n, ast.Raise) for n in _walk_here(handler.body))
    return False


def _suppresses(expression: ast.expr) -> bool:
    """Whether ``expression`` is ``suppress(...)`` (``contextlib``'s) of an ``ImportError``."""
    if not isinstance(expression, ast.Call) or not _names(expression.func) & {"suppress"}:
        return False
    return any(_names(argument) & _CATCHING for argument in expression.args)


def _names(expression: ast.expr) -> set[str]:
    """The last part of each name ``expression`` spells (a name, an attribute, a tuple)."""
    if isinstance(expression, ast.Tuple):
        return {name for element in expression.elts for name in _names(element)}
    if isinstance(expression, ast.Attribute):
        return {expression.attr}
    if isinstance(expression, ast.Name):
        return {expression.id}
    return set()


def _walk_here(body: Iterable[ast.stmt]) -> Iterator[ast.AST]:
    """Every node of ``body``, not descending into the functions and classes it defines."""
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))

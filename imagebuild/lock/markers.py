"""Whether two markers mean the same thing within ``requires-python``, as uv judges it.

uv keeps markers as decision diagrams; we sample instead: every combination of the literals
the markers mention (and the neighbours of each version literal), on the Pythons that
``requires-python`` allows, bounded so that a pathological marker falls back to text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

from packaging.markers import InvalidMarker, Marker
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

_QUOTED = re.compile(r"""'([^']*)'|"([^"]*)\"""")
_IDENT = re.compile(r"\b([a-z_][a-z_.]*)\b")
_VERSION_VARS = ("python_version", "python_full_version", "implementation_version")
_MAX_ENVIRONMENTS = 50_000


def markers_equivalent(
    a: Sequence[str | None], b: Sequence[str | None], requires_python: SpecifierSet | None
) -> bool:
    """Whether ``any(a)`` and ``any(b)`` hold in the same environments.

    uv keeps markers as decision diagrams, so two markers that mean the same thing are
    the same marker to it, and it drops what ``requires-python`` already implies. We check
    the same by evaluating both on every combination of the literals they mention (and
    neighbours of each version literal), restricted to Pythons ``requires-python`` allows.
    """
    if any(m is None for m in a) or any(m is None for m in b):
        a = [None] if any(m is None for m in a) else a
        b = [None] if any(m is None for m in b) else b
    texts = [m for m in (*a, *b) if m is not None]
    try:
        ma = [Marker(m) if m is not None else None for m in a]
        mb = [Marker(m) if m is not None else None for m in b]
    except InvalidMarker:
        return sorted(map(str, a)) == sorted(map(str, b))
    environments = _sample_environments(texts, requires_python)
    if environments is None:
        return sorted(str(m) for m in ma) == sorted(str(m) for m in mb)

    def holds(markers: Sequence[Marker | None], env: dict[str, str]) -> bool:
        return any(m is None or m.evaluate(env) for m in markers)

    return all(holds(ma, env) == holds(mb, env) for env in environments)


def _sample_environments(
    markers: Sequence[str], requires_python: SpecifierSet | None
) -> list[dict[str, str]] | None:
    literals: set[str] = set()
    variables: set[str] = set()
    for text in markers:
        for single, double in _QUOTED.findall(text):
            literals.add(single or double)
        unquoted = _QUOTED.sub(" ", text)
        variables |= set(_IDENT.findall(unquoted)) - {"and", "or", "not", "in"}
    pythons = _python_candidates(literals, requires_python)
    axes: list[list[tuple[str, str]]] = []
    if variables & set(_VERSION_VARS):
        axes.append([("python", full) for full in pythons])
    for var in sorted(variables - set(_VERSION_VARS)):
        axes.append([(var, v) for v in sorted(literals | {"", "~other~"})])
    count = 1
    for axis in axes:
        count *= max(len(axis), 1)
    if count > _MAX_ENVIRONMENTS:
        return None
    base_full = pythons[0] if pythons else "3.12.0"
    out = []
    for combo in itertools.product(*axes):
        env = _base_env(base_full)
        for var, value in combo:
            if var == "python":
                env.update(_python_env(value))
            else:
                env[var] = value
        out.append(env)
    return out


def _python_env(full: str) -> dict[str, str]:
    major, minor = full.split(".")[:2]
    return {
        "python_full_version": full,
        "python_version": f"{major}.{minor}",
        "implementation_version": full,
    }


def _base_env(full: str) -> dict[str, str]:
    return {
        "implementation_name": "cpython",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "sys_platform": "linux",
        "extra": "",
        **_python_env(full),
    }


def _python_candidates(literals: Iterable[str], requires_python: SpecifierSet | None) -> list[str]:
    minors: set[tuple[int, int]] = {(3, 8), (3, 12)}
    patches: set[int] = {0, 1, 99}
    if requires_python is not None:
        literals = [*literals, *(s.version for s in requires_python)]
    for literal in literals:
        text = literal.removesuffix(".*")
        if not valid_version(text):
            continue
        release = Version(text).release
        major = release[0]
        minor = release[1] if len(release) > 1 else 0
        if major != 3:
            minors |= {(3, 0), (3, 99)} if major < 3 else {(3, 99)}
            continue
        minors |= {(3, max(minor - 1, 0)), (3, minor), (3, minor + 1)}
        if len(release) > 2:
            patches |= {max(release[2] - 1, 0), release[2], release[2] + 1}
    out = [f"{a}.{b}.{p}" for (a, b) in sorted(minors) for p in sorted(patches)]
    if requires_python is not None:
        out = [v for v in out if requires_python.contains(v, prereleases=True)]
    return out or ["3.12.0"]


def valid_version(text: str) -> bool:
    """Whether ``text`` parses as a PEP 440 version."""
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True

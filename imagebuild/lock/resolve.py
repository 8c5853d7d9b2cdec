"""Resolution: requirements + a package index + a target platform -> pinned versions (resolvelib).

The provider below adapts a ``PackageIndex`` and a ``TargetPlatform`` to resolvelib; it never
talks HTTP itself. Extras follow the usual resolvelib recipe (pip's ``ExtrasCandidate``): a
requirement ``foo[x]>=1`` becomes ``foo>=1`` plus ``foo[x]>=1``, and the candidate ``foo[x] 1.0``
depends on ``foo==1.0`` and on the requirements its metadata gates behind ``extra == "x"``.
A metadata ``Requires-Python`` that the target does not meet is modelled as a dependency on a
virtual ``<python>`` package whose only candidate is the target's interpreter, so resolvelib
backtracks away from such a version instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from packaging.requirements import Requirement
from packaging.utils import NormalizedName
from packaging.version import Version
from resolvelib import (
    ResolutionImpossible,
    ResolutionTooDeep,
    Resolver,
)

from imagebuild.errors import ResolutionError
from imagebuild.index.model import IndexFile, PackageIndex
from imagebuild.lock.candidates import Candidate, ProjectVersions, Requirement_
from imagebuild.lock.provider import PYTHON, Provider, RoundCounter, split_requirement
from imagebuild.report import NullReporter, Reporter
from imagebuild.target.platform import TargetPlatform

if TYPE_CHECKING:
    from resolvelib.structs import RequirementInformation

__all__ = ["Pin", "Resolution", "resolve"]

# pip's own ceiling: deep enough for real projects, finite for pathological ones.
_MAX_ROUNDS = 200_000
_DEFAULT_ORIGIN = "pyproject.toml"


@dataclass(frozen=True, kw_only=True, slots=True)
class Pin:
    """One resolved package: the version chosen for the target, with everything a lock needs."""

    name: NormalizedName
    """Canonical project name."""
    version: Version
    """The chosen version."""
    files: tuple[IndexFile, ...]
    """Every non-yanked file of this version (wheels and sdists, for any platform), by filename."""
    dependencies: tuple[NormalizedName, ...]
    """Names this pin needs on the target (markers evaluated, union over ``extras``), sorted."""
    extras: tuple[NormalizedName, ...]
    """The extras of this package that were requested, sorted."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Resolution:
    """The outcome of ``resolve``: one pin per package name, for one target."""

    target: TargetPlatform
    """The platform the versions were chosen for."""
    pins: tuple[Pin, ...]
    """One pin per package, sorted by name."""


# -- the public function ---------------------------------------------------------------------


def resolve(
    roots: Sequence[Requirement],
    *,
    index: PackageIndex,
    target: TargetPlatform,
    prereleases: bool = False,
    preferences: Mapping[NormalizedName, Version] = {},
    origins: Mapping[str, str] | None = None,
    reporter: Reporter | None = None,
) -> Resolution:
    """Choose one version of every package ``roots`` need on ``target``.

    ``roots`` markers are evaluated for the target (with ``extra = ""``); false ones are
    dropped. ``preferences`` (typically the current lock) are tried first wherever they still
    satisfy the requirements. ``origins`` maps ``str(requirement)`` to where it was declared,
    for messages (default ``pyproject.toml``). Pre-releases are considered only with
    ``prereleases``, when a specifier names one, or when nothing final matches.

    Raises ``ResolutionError`` when the requirements cannot be met together, when a package
    has no usable version for the target, or when a needed sdist's metadata can't be read.
    """
    reporter = reporter or NullReporter()
    origins = origins or {}
    requested = _requested(roots, target, origins)
    provider = Provider(
        index=index,
        target=target,
        prereleases=prereleases,
        preferences=preferences,
        roots=frozenset(r.identifier for r in requested),
        reporter=reporter,
    )
    reporter.step(f"resolving {len(roots)} requirement(s) for {target.describe()}")
    index.prefetch(sorted({NormalizedName(r.name) for r in requested}))
    counter = RoundCounter()
    resolver: Resolver[Requirement_, Candidate, str] = Resolver(provider, counter)
    provider.warm(roots)
    try:
        result = resolver.resolve(requested, max_rounds=_MAX_ROUNDS)
    except ResolutionImpossible as exc:
        lines, hint = _explain(exc.causes, provider, _root_origins(roots, origins))
        raise ResolutionError("; ".join(lines), hint=hint) from exc
    except ResolutionTooDeep as exc:
        raise ResolutionError(
            f"gave up resolving after {exc.round_count} rounds of backtracking "
            f"for {target.describe()}",
            hint="narrow the requirements (for example pin the packages that conflict)",
        ) from exc
    finally:
        provider.close()

    pins = _pins(result.mapping.values(), provider)
    reporter.step(
        f"resolved {len(pins)} package(s) in {counter.rounds} round(s)"
        + (f", {counter.backtracks} backtrack(s)" if counter.backtracks else "")
    )
    return Resolution(target=target, pins=tuple(pins))


def _requested(
    roots: Sequence[Requirement], target: TargetPlatform, origins: Mapping[str, str]
) -> list[Requirement_]:
    """The roots whose markers hold on ``target``, split for extras, without duplicates."""
    environment = {**target.marker_environment(), "extra": ""}
    requested: list[Requirement_] = []
    for root in roots:
        if root.marker is not None and not root.marker.evaluate(environment):
            continue
        origin = origins.get(str(root), _DEFAULT_ORIGIN)
        requested.extend(split_requirement(root, f"from {origin}"))
    return list(dict.fromkeys(requested))


def _root_origins(
    roots: Sequence[Requirement], origins: Mapping[str, str]
) -> dict[Requirement_, str]:
    """Where each root requirement (split for extras) was declared, for messages."""
    root_origins: dict[Requirement_, str] = {}
    for root in roots:
        for req in split_requirement(root, ""):
            root_origins.setdefault(req, origins.get(str(root), _DEFAULT_ORIGIN))
    return root_origins


def _pins(chosen_candidates: Iterable[Candidate], provider: Provider) -> list[Pin]:
    """One pin per package from resolvelib's mapping, sorted by name."""
    # The base candidate and its extras' candidates, per package.
    chosen: dict[NormalizedName, list[Candidate]] = {}
    for candidate in chosen_candidates:
        if candidate.release is not None:
            chosen.setdefault(NormalizedName(candidate.name), []).append(candidate)
    pins: list[Pin] = []
    for name, candidates in chosen.items():
        base = next(c for c in candidates if c.extra is None)
        assert base.release is not None
        deps = {NormalizedName(d.name) for c in candidates for d in provider.get_dependencies(c)}
        pins.append(
            Pin(
                name=name,
                version=base.version,
                files=base.release.files,
                dependencies=tuple(sorted(deps - {name, NormalizedName(PYTHON)})),
                extras=tuple(sorted(c.extra for c in candidates if c.extra is not None)),
            )
        )
    pins.sort(key=lambda p: p.name)
    return pins


# -- messages --------------------------------------------------------------------------------


_Sources = tuple[Requirement_, list[str]]
_Entries = list[tuple[str, _Sources]]


def _explain(
    causes: Iterable[RequirementInformation[Requirement_, Candidate]],
    provider: Provider,
    root_origins: Mapping[Requirement_, str],
) -> tuple[list[str], str]:
    """Readable lines for a ``ResolutionImpossible``, grouped by package, and a hint."""
    groups, roots = _group_causes(causes, root_origins)
    lines: list[str] = []
    hints: list[str] = []
    for name in sorted(groups):
        # Dependencies before roots (the root is usually what the user will change), by text.
        entries = sorted(groups[name].items(), key=lambda kv: (kv[0] in roots, kv[0]))
        if name == PYTHON:
            more, hint = (
                [_python_line(entries, provider)],
                ("use a base image with a newer Python, or require an older version"),
            )
        else:
            more, hint = _package_lines(NormalizedName(name), entries, provider)
        lines += more
        hints.append(hint)
    return list(dict.fromkeys(lines)), hints[0] if hints else "relax the requirements"


def _group_causes(
    causes: Iterable[RequirementInformation[Requirement_, Candidate]],
    root_origins: Mapping[Requirement_, str],
) -> tuple[dict[str, dict[str, _Sources]], set[str]]:
    """Group the causes by package.

    Returns package name -> requirement as shown -> (the requirement, where it came from),
    and the requirements (as shown) that are roots.
    """
    groups: dict[str, dict[str, _Sources]] = {}
    roots: set[str] = set()
    for info in causes:
        req = info.requirement
        entry = groups.setdefault(req.name, {}).setdefault(req.shown, (req, []))
        if info.parent is None:
            where = f"from {root_origins.get(info.requirement, _DEFAULT_ORIGIN)}"
            roots.add(req.shown)
        else:
            where = f"required by {info.parent}"
        if where not in entry[1]:
            entry[1].append(where)
    return groups, roots


def _described(shown: str, sources: list[str]) -> str:
    # "required by a 1.0, a 2.0": one verb for several parents.
    parents = [s.removeprefix("required by ") for s in sources if s.startswith("required")]
    others = [s for s in sources if not s.startswith("required")]
    parts = ([f"required by {', '.join(sorted(parents))}"] if parents else []) + others
    return f"{shown} ({'; '.join(parts)})" if len(parts) > 1 else f"{shown} ({parts[0]})"


def _python_line(entries: _Entries, provider: Provider) -> str:
    needs = [
        f"{', '.join(sorted(s.removeprefix('required by ') for s in sources))} "
        f"needs Python {req.specifier}"
        for _, (req, sources) in entries
    ]
    target = provider.target.describe()
    return f"{'; '.join(needs)}, but the target {target} has Python {provider.python.version}"


def _package_lines(
    name: NormalizedName, entries: _Entries, provider: Provider
) -> tuple[list[str], str]:
    """Lines and a hint for one package's conflicting requirements."""
    target = provider.target.describe()
    project = provider.project(name)
    if not project.known:
        sources = ", ".join(dict.fromkeys(s for _, (_, ss) in entries for s in ss))
        return [f"no project named {name} on the index ({sources})"], (
            "check the name, or add the index that serves it"
        )
    shown = [_described(text, sources) for text, (_, sources) in entries]
    empty = [
        (req, text)
        for (req, _), text in zip((e for _, e in entries), shown, strict=True)
        if next(provider.matching(name, [req.specifier]), None) is None
    ]
    if empty:
        lines = [_no_match(req, text, project, target) for req, text in empty]
        return lines, "loosen the requirement, or use a base image its releases support"
    hint = "relax one of the conflicting requirements"
    if len(shown) == 1:
        # Alone it has candidates; it failed through what they need (listed too).
        return [f"no version of {name} satisfying {shown[0]} fits with the rest"], hint
    if len(shown) == 2:
        return [f"{shown[0]} conflicts with {shown[1]}"], hint
    return [f"{', '.join(shown[:-1])} and {shown[-1]} cannot all be satisfied"], hint


def _no_match(req: Requirement_, described: str, project: ProjectVersions, target: str) -> str:
    available = [str(r.version) for r in reversed(project.releases)]
    if len(available) > 10:
        available = ["...", *available[-10:]]
    line = (
        f"no version of {req.name} matches {described} for {target} "
        f"(available: {', '.join(available) or 'none'})"
    )
    why = [
        f"{version} {reason}"
        for version, reason in sorted(project.excluded.items(), reverse=True)
        if req.specifier.contains(version, prereleases=True)
    ]
    if why:
        more = f", and {len(why) - 3} more" if len(why) > 3 else ""
        line += f"; {', '.join(why[:3])}{more}"
    return line

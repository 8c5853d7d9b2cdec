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

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version
from resolvelib import (
    AbstractProvider,
    BaseReporter,
    ResolutionImpossible,
    ResolutionTooDeep,
    Resolver,
)

from imagebuild.errors import PackageIndexError, ResolutionError
from imagebuild.index.model import DistMetadata, IndexFile, PackageIndex
from imagebuild.report import NullReporter, Reporter
from imagebuild.target.platform import TargetPlatform

if TYPE_CHECKING:
    from resolvelib.structs import RequirementInformation

__all__ = ["Pin", "Resolution", "resolve"]

# pip's own ceiling: deep enough for real projects, finite for pathological ones.
_MAX_ROUNDS = 200_000
_PYTHON = "<python>"
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


# -- resolvelib's requirement and candidate types -------------------------------------------


@dataclass(frozen=True, slots=True)
class _Release:
    """The usable files of one version of a project on the target."""

    version: Version
    files: tuple[IndexFile, ...]
    """All non-yanked files of the version, sorted by filename."""
    best: IndexFile
    """The file whose metadata stands for the version: best compatible wheel, else an sdist."""


@dataclass(frozen=True, slots=True)
class _Requirement:
    """A requirement on one identifier: a package, one extra of a package, or ``<python>``."""

    name: str
    """Canonical project name, or ``<python>``."""
    extra: NormalizedName | None
    specifier: SpecifierSet
    shown: str = field(compare=False)
    """How messages print it, e.g. ``foo[x]>=1`` (markers already evaluated away)."""

    @property
    def identifier(self) -> str:
        return _identifier(self.name, self.extra)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A version of a package (``extra`` None), of one of its extras, or the target Python."""

    name: str
    version: Version
    extra: NormalizedName | None = None
    release: _Release | None = field(default=None, compare=False)

    @property
    def identifier(self) -> str:
        return _identifier(self.name, self.extra)

    def __str__(self) -> str:
        return f"{self.identifier} {self.version}"


def _identifier(name: str, extra: str | None) -> str:
    return f"{name}[{extra}]" if extra else name


# -- candidate discovery ---------------------------------------------------------------------


class _Project:
    """What the index offers for one name; each version is judged only when asked about.

    Popular projects list tens of thousands of wheels (every version times every platform),
    and the resolver usually looks at the newest one or two versions: parsing and ranking
    every file up front was most of a lock's time.
    """

    def __init__(self, name: NormalizedName, files: Sequence[IndexFile], target: TargetPlatform):
        self.target = target
        self.python = _python_version(target)
        self.files = _by_version(name, files)
        self.known = bool(self.files)
        self.versions = sorted(self.files, reverse=True)
        """Every listed version, newest first."""
        self._judged: dict[Version, _Release | str] = {}

    def release(self, version: Version) -> _Release | None:
        """The usable release of ``version``, or None (the reason goes to ``excluded``)."""
        if version not in self._judged:
            self._judged[version] = self._judge(version)
        judged = self._judged[version]
        return judged if isinstance(judged, _Release) else None

    @property
    def releases(self) -> list[_Release]:
        """Every usable release, newest first (judges them all: for messages)."""
        return [r for v in self.versions if (r := self.release(v)) is not None]

    @property
    def excluded(self) -> dict[Version, str]:
        """Versions left out, with the reason (judges them all: for messages)."""
        self.releases  # noqa: B018 (judge every version)
        return {v: j for v, j in self._judged.items() if isinstance(j, str)}

    def _fits(self, file: IndexFile) -> bool:
        rp = file.requires_python
        return rp is None or rp.contains(self.python, prereleases=True)

    def _judge(self, version: Version) -> _Release | str:
        listed = sorted(self.files[version], key=lambda f: f.filename)
        live = [f for f in listed if f.yanked is None]
        if not live:
            reasons = sorted({f.yanked for f in listed if f.yanked})
            return "is yanked" + (f" ({'; '.join(reasons)})" if reasons else "")
        fitting = [f for f in live if self._fits(f)]
        if not fitting:
            needs = " or ".join(sorted({str(f.requires_python) for f in live}))
            return f"requires Python {needs}"
        wheels = self.target.rank_wheels([f for f in fitting if f.kind == "wheel"])
        # A .tar.gz over a .zip when a release has both (filenames keep it deterministic).
        sdists = sorted(
            (f for f in fitting if f.kind == "sdist"),
            key=lambda f: (not f.filename.endswith(".tar.gz"), f.filename),
        )
        if wheels:
            best = wheels[0]
        elif sdists:
            best = sdists[0]
        else:
            platforms = sorted({f.filename.rsplit("-", 1)[-1].removesuffix(".whl") for f in live})
            return f"has no wheel for the target (only {', '.join(platforms)})"
        return _Release(version=version, files=tuple(live), best=best)


# Grouping a page's files by version does not depend on the target, and each target (and
# the look-ahead pool) asks again: keep the answer per files tuple (indexes memoise theirs).
_GROUPED: dict[int, tuple[Sequence[IndexFile], dict[Version, list[IndexFile]]]] = {}
_GROUPED_LOCK = threading.Lock()


def _by_version(name: NormalizedName, files: Sequence[IndexFile]) -> dict[Version, list[IndexFile]]:
    with _GROUPED_LOCK:
        cached = _GROUPED.get(id(files))
    if cached is not None and cached[0] is files:
        return cached[1]
    by_text: dict[str, list[IndexFile]] = {}
    for file in files:
        text = _version_text(name, file.filename)
        if text is not None:
            by_text.setdefault(text, []).append(file)
    grouped: dict[Version, list[IndexFile]] = {}
    for text, group in by_text.items():
        try:
            grouped.setdefault(Version(text), []).extend(group)
        except InvalidVersion:
            continue
    with _GROUPED_LOCK:
        if len(_GROUPED) > 1024:
            _GROUPED.clear()
        _GROUPED[id(files)] = (files, grouped)  # holding ``files`` keeps its id unique
    return grouped


def _version_text(name: NormalizedName, filename: str) -> str | None:
    """The version part of a wheel or sdist file name of ``name``, without full parsing."""
    if filename.endswith(".whl"):
        parts = filename.split("-")
        # Wheel names are escaped (runs of -_. become _): compare cheaply first.
        if len(parts) < 5 or (
            parts[0].lower() != name.replace("-", "_") and canonicalize_name(parts[0]) != name
        ):
            return None
        return parts[1]
    for suffix in (".tar.gz", ".zip"):
        if filename.endswith(suffix):
            stem = filename.removesuffix(suffix)
            dist, sep, version = stem.rpartition("-")
            if sep and canonicalize_name(dist) == name:
                return version
    return None


def _python_version(target: TargetPlatform) -> Version:
    major, minor = target.python_version
    return Version(target.python_full_version or f"{major}.{minor}.0")


def _allowed(
    project: _Project, specifiers: Sequence[SpecifierSet], prereleases: bool
) -> Iterator[_Release]:
    """The usable releases every specifier admits, newest first, by PEP 440's rules.

    Lazy: a version's files are looked at only when the resolver gets that far.
    """
    # Versions are matched lazily too: a project lists hundreds, the resolver takes one.
    versions = (
        v for v in project.versions if all(s.contains(v, prereleases=True) for s in specifiers)
    )
    if prereleases or any(s.prereleases for s in specifiers):
        for version in versions:
            if (release := project.release(version)) is not None:
                yield release
        return
    final_found = False
    held_back: list[Version] = []
    for version in versions:
        if version.is_prerelease:
            held_back.append(version)
        elif (release := project.release(version)) is not None:
            final_found = True
            yield release
    # Pre-releases only when nothing final satisfies the specifiers (they are then "needed").
    if not final_found:
        for version in held_back:
            if (release := project.release(version)) is not None:
                yield release


# -- the provider ----------------------------------------------------------------------------


class _Provider(AbstractProvider[_Requirement, _Candidate, str]):
    """resolvelib provider over a ``PackageIndex`` for one ``TargetPlatform``."""

    def __init__(
        self,
        *,
        index: PackageIndex,
        target: TargetPlatform,
        prereleases: bool,
        preferences: Mapping[NormalizedName, Version],
        roots: frozenset[str],
        reporter: Reporter,
    ) -> None:
        self.index = index
        self.target = target
        self.prereleases = prereleases
        self.preferences = preferences
        self.roots = roots
        self.reporter = reporter
        self.environment = target.marker_environment()
        self.python = _Candidate(name=_PYTHON, version=_python_version(target))
        self._projects: dict[NormalizedName, _Project] = {}
        self._metadata: dict[IndexFile, DistMetadata] = {}
        self._dependencies: dict[_Candidate, tuple[_Requirement, ...]] = {}
        self._warned: set[tuple[NormalizedName, NormalizedName]] = set()
        # Speculative look-ahead: see ``warm``.
        self._warming = ThreadPoolExecutor(max_workers=8, thread_name_prefix="imgbuild-warm")
        self._warm_seen: set[NormalizedName] = set()
        self._warm_lock = threading.Lock()

    def warm(self, requirements: Iterable[Requirement], extra: str = "") -> None:
        """Fetch, in the background, what resolving these requirements will most likely read.

        The resolver reads one package at a time; each needs its page, then the metadata of
        its newest fitting release, whose dependencies are only then known. Here a pool
        walks that graph ahead of it, assuming the newest release of everything (usually
        what is chosen). Results land in the index's caches; nothing here affects the
        outcome, and errors are left for the resolver to meet.
        """
        for req in requirements:
            if req.marker is not None and not req.marker.evaluate(
                {**self.environment, "extra": extra}
            ):
                continue
            name = canonicalize_name(req.name)
            with self._warm_lock:
                if name in self._warm_seen:
                    continue
                self._warm_seen.add(name)
            try:
                self._warming.submit(self._warm_one, name, req.specifier)
            except RuntimeError:  # shut down: resolution is over
                return

    def _warm_one(self, name: NormalizedName, specifier: SpecifierSet) -> None:
        try:
            project = _Project(name, self.index.files(name), self.target)
            release = next(_allowed(project, [specifier], self.prereleases), None)
            if release is None:
                return
            self.warm(self.index.metadata(release.best).requires_dist)
        except Exception:  # noqa: BLE001 (a hint only; the resolver reports real failures)
            return

    def close(self) -> None:
        """Stop looking ahead."""
        self._warming.shutdown(wait=False, cancel_futures=True)

    # -- data access (memoised: resolvelib asks the same questions many times) --

    def project(self, name: NormalizedName) -> _Project:
        if name not in self._projects:
            self._projects[name] = _Project(name, self.index.files(name), self.target)
        return self._projects[name]

    def metadata(self, release: _Release) -> DistMetadata:
        file = release.best
        if file not in self._metadata:
            try:
                self._metadata[file] = self.index.metadata(file)
            except PackageIndexError as exc:
                if file.kind != "sdist":
                    raise  # the index failed; not a property of the requirements
                raise ResolutionError(
                    f"cannot read the dependencies of {file.name} {release.version}: {exc.message}",
                    hint=exc.hint or "require a version of it that ships a wheel for the target",
                ) from exc
        return self._metadata[file]

    def matching(
        self, name: NormalizedName, specifiers: Sequence[SpecifierSet]
    ) -> Iterator[_Release]:
        return _allowed(self.project(name), specifiers, self.prereleases)

    # -- resolvelib's interface --

    def identify(self, requirement_or_candidate: _Requirement | _Candidate) -> str:
        """``name``, ``name[extra]`` or ``<python>``."""
        return requirement_or_candidate.identifier

    def get_preference(
        self,
        identifier: str,
        resolutions: Mapping[str, _Candidate],
        candidates: Mapping[str, Iterator[_Candidate]],
        information: Mapping[str, Iterator[RequirementInformation[_Requirement, _Candidate]]],
        backtrack_causes: Sequence[RequirementInformation[_Requirement, _Candidate]],
    ) -> tuple[bool, bool, bool, bool, str]:
        """Python first, then recent conflict causes, exact pins, root requirements; by name."""
        infos = list(information[identifier])
        causes = {info.requirement.identifier for info in backtrack_causes}
        causes |= {info.parent.identifier for info in backtrack_causes if info.parent}
        pinned = any(
            spec.operator in ("==", "===") and "*" not in spec.version
            for info in infos
            for spec in info.requirement.specifier
        )
        return (
            identifier != _PYTHON,
            identifier not in causes,
            not pinned,
            identifier not in self.roots,
            identifier,
        )

    def find_matches(
        self,
        identifier: str,
        requirements: Mapping[str, Iterator[_Requirement]],
        incompatibilities: Mapping[str, Iterator[_Candidate]],
    ) -> Callable[[], Iterator[_Candidate]] | list[_Candidate]:
        """Usable versions newest first (a preferred version that still fits goes first)."""
        reqs = list(requirements[identifier])
        if identifier == _PYTHON:
            ok = all(r.specifier.contains(self.python.version, prereleases=True) for r in reqs)
            return [self.python] if ok else []
        name, extra = NormalizedName(reqs[0].name), reqs[0].extra
        if extra is not None:
            # The base package's constraints bind the extra's candidates too (pip does this).
            reqs += list(requirements.get(name, ()))
        bad = {c.version for c in incompatibilities[identifier]}
        specifiers = [r.specifier for r in reqs]
        preferred = self.preferences.get(name)
        project = self.project(name)
        first = None
        if (
            preferred is not None
            and preferred in project.files
            and preferred not in bad
            and all(s.contains(preferred, prereleases=True) for s in specifiers)
            and (
                not preferred.is_prerelease
                or self.prereleases
                or any(s.prereleases for s in specifiers)
            )
        ):
            first = project.release(preferred)

        def candidates() -> Iterator[_Candidate]:
            releases = (r for r in self.matching(name, specifiers) if r.version not in bad)
            if first is not None:
                yield _Candidate(name=name, version=first.version, extra=extra, release=first)
            hinted = False
            for release in releases:
                if first is not None and release.version == first.version:
                    continue
                if not hinted:
                    self.index.prefetch_metadata([release.best])
                    hinted = True
                yield _Candidate(name=name, version=release.version, extra=extra, release=release)

        # resolvelib accepts a callable returning an iterator, and re-calls it when it needs
        # the candidates again: versions are judged only as far as the resolver looks.
        return candidates

    def is_satisfied_by(self, requirement: _Requirement, candidate: _Candidate) -> bool:
        """Whether the version is in the specifier (pre-releases were filtered already)."""
        return requirement.specifier.contains(candidate.version, prereleases=True)

    def get_dependencies(self, candidate: _Candidate) -> tuple[_Requirement, ...]:
        """Requirements active on the target for this candidate (its extra, if any)."""
        if candidate.release is None:  # <python>
            return ()
        if candidate not in self._dependencies:
            deps = self._compute_dependencies(candidate, candidate.release)
            self._dependencies[candidate] = deps
            names = sorted(
                {NormalizedName(d.name) for d in deps if d.name not in (candidate.name, _PYTHON)}
            )
            if names:
                self.index.prefetch(names)
        return self._dependencies[candidate]

    def _compute_dependencies(
        self, candidate: _Candidate, release: _Release
    ) -> tuple[_Requirement, ...]:
        name = NormalizedName(candidate.name)
        meta = self.metadata(release)
        parent = f"{name} {release.version}"
        out: list[_Requirement] = []
        if candidate.extra is None:
            if meta.requires_python is not None:
                out.append(
                    _Requirement(
                        _PYTHON, None, meta.requires_python, f"Python{meta.requires_python}"
                    )
                )
            active = [r for r in meta.requires_dist if self._active(r, "")]
        else:
            pin = f"=={release.version}"
            out.append(_Requirement(name, None, SpecifierSet(pin), f"{name}{pin}"))
            missing = (name, candidate.extra)
            if candidate.extra not in meta.provides_extra and missing not in self._warned:
                self._warned.add(missing)  # once per package, not once per version tried
                self.reporter.warn(f"{parent} does not provide the extra {candidate.extra!r}")
            # Only what the extra adds; the base candidate carries the unconditional ones.
            active = [
                r
                for r in meta.requires_dist
                if self._active(r, candidate.extra) and not self._active(r, "")
            ]
        for req in active:
            out.extend(_split(req, f"required by {candidate}"))
        return tuple(dict.fromkeys(out))

    def _active(self, req: Requirement, extra: str) -> bool:
        if req.marker is None:
            return True
        return req.marker.evaluate({**self.environment, "extra": extra})


def _split(req: Requirement, where: str) -> list[_Requirement]:
    """``foo[x,y]>=1`` -> ``foo>=1``, ``foo[x]>=1``, ``foo[y]>=1``."""
    if req.url:
        raise ResolutionError(
            f"{req} ({where}): direct URL requirements are not supported",
            hint="depend on a released version from the index instead",
        )
    name = canonicalize_name(req.name)
    spec = str(req.specifier)
    out = [_Requirement(name, None, req.specifier, f"{name}{spec}")]
    for extra in sorted({canonicalize_name(e) for e in req.extras}):
        out.append(_Requirement(name, extra, req.specifier, f"{name}[{extra}]{spec}"))
    return out


class _RoundCounter(BaseReporter[_Requirement, _Candidate, str]):
    """Counts rounds and backtracks for the closing progress line."""

    def __init__(self) -> None:
        self.rounds = 0
        self.backtracks = 0

    def starting_round(self, index: int) -> None:
        self.rounds = index + 1

    def rejecting_candidate(self, criterion: object, candidate: _Candidate) -> None:
        self.backtracks += 1


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
    provider = _Provider(
        index=index,
        target=target,
        prereleases=prereleases,
        preferences=preferences,
        roots=frozenset(r.identifier for r in requested),
        reporter=reporter,
    )
    reporter.step(f"resolving {len(roots)} requirement(s) for {target.describe()}")
    index.prefetch(sorted({NormalizedName(r.name) for r in requested}))
    counter = _RoundCounter()
    resolver: Resolver[_Requirement, _Candidate, str] = Resolver(provider, counter)
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
) -> list[_Requirement]:
    """The roots whose markers hold on ``target``, split for extras, without duplicates."""
    environment = {**target.marker_environment(), "extra": ""}
    requested: list[_Requirement] = []
    for root in roots:
        if root.marker is not None and not root.marker.evaluate(environment):
            continue
        origin = origins.get(str(root), _DEFAULT_ORIGIN)
        requested.extend(_split(root, f"from {origin}"))
    return list(dict.fromkeys(requested))


def _root_origins(
    roots: Sequence[Requirement], origins: Mapping[str, str]
) -> dict[_Requirement, str]:
    """Where each root requirement (split for extras) was declared, for messages."""
    root_origins: dict[_Requirement, str] = {}
    for root in roots:
        for req in _split(root, ""):
            root_origins.setdefault(req, origins.get(str(root), _DEFAULT_ORIGIN))
    return root_origins


def _pins(chosen_candidates: Iterable[_Candidate], provider: _Provider) -> list[Pin]:
    """One pin per package from resolvelib's mapping, sorted by name."""
    # The base candidate and its extras' candidates, per package.
    chosen: dict[NormalizedName, list[_Candidate]] = {}
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
                dependencies=tuple(sorted(deps - {name, NormalizedName(_PYTHON)})),
                extras=tuple(sorted(c.extra for c in candidates if c.extra is not None)),
            )
        )
    pins.sort(key=lambda p: p.name)
    return pins


# -- messages --------------------------------------------------------------------------------


_Sources = tuple[_Requirement, list[str]]
_Entries = list[tuple[str, _Sources]]


def _explain(
    causes: Iterable[RequirementInformation[_Requirement, _Candidate]],
    provider: _Provider,
    root_origins: Mapping[_Requirement, str],
) -> tuple[list[str], str]:
    """Readable lines for a ``ResolutionImpossible``, grouped by package, and a hint."""
    groups, roots = _group_causes(causes, root_origins)
    lines: list[str] = []
    hints: list[str] = []
    for name in sorted(groups):
        # Dependencies before roots (the root is usually what the user will change), by text.
        entries = sorted(groups[name].items(), key=lambda kv: (kv[0] in roots, kv[0]))
        if name == _PYTHON:
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
    causes: Iterable[RequirementInformation[_Requirement, _Candidate]],
    root_origins: Mapping[_Requirement, str],
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


def _python_line(entries: _Entries, provider: _Provider) -> str:
    needs = [
        f"{', '.join(sorted(s.removeprefix('required by ') for s in sources))} "
        f"needs Python {req.specifier}"
        for _, (req, sources) in entries
    ]
    target = provider.target.describe()
    return f"{'; '.join(needs)}, but the target {target} has Python {provider.python.version}"


def _package_lines(
    name: NormalizedName, entries: _Entries, provider: _Provider
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


def _no_match(req: _Requirement, described: str, project: _Project, target: str) -> str:
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

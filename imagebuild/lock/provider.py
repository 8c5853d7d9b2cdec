"""The resolvelib provider: a ``PackageIndex`` and a ``TargetPlatform`` seen as resolvelib wants.

It never talks HTTP itself; the index does. Extras follow the usual resolvelib recipe (pip's
``ExtrasCandidate``): a requirement ``foo[x]>=1`` becomes ``foo>=1`` plus ``foo[x]>=1``, and the
candidate ``foo[x] 1.0`` depends on ``foo==1.0`` and on the requirements its metadata gates
behind ``extra == "x"``. A metadata ``Requires-Python`` the target does not meet is a dependency
on the virtual ``<python>`` package, whose only candidate is the target's interpreter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version
from resolvelib import (
    AbstractProvider,
    BaseReporter,
)

from imagebuild.errors import PackageIndexError, ResolutionError
from imagebuild.index.model import DistMetadata, IndexFile, PackageIndex
from imagebuild.lock.candidates import (
    Candidate,
    ProjectVersions,
    Release,
    Requirement_,
    allowed_releases,
    target_python,
)
from imagebuild.report import Reporter
from imagebuild.target.platform import TargetPlatform

if TYPE_CHECKING:
    from resolvelib.structs import RequirementInformation

PYTHON = "<python>"
"""The virtual package that stands for the target's interpreter."""


# -- the provider ----------------------------------------------------------------------------


class Provider(AbstractProvider[Requirement_, Candidate, str]):
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
        self.python = Candidate(name=PYTHON, version=target_python(target))
        self._projects: dict[NormalizedName, ProjectVersions] = {}
        self._metadata: dict[IndexFile, DistMetadata] = {}
        self._dependencies: dict[Candidate, tuple[Requirement_, ...]] = {}
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
            project = ProjectVersions(name, self.index.files(name), self.target)
            release = next(allowed_releases(project, [specifier], self.prereleases), None)
            if release is None:
                return
            self.warm(self.index.metadata(release.best).requires_dist)
        except Exception:  # noqa: BLE001 (a hint only; the resolver reports real failures)
            return

    def close(self) -> None:
        """Stop looking ahead."""
        self._warming.shutdown(wait=False, cancel_futures=True)

    # -- data access (memoised: resolvelib asks the same questions many times) --

    def project(self, name: NormalizedName) -> ProjectVersions:
        """What the index offers for ``name`` (memoised)."""
        if name not in self._projects:
            self._projects[name] = ProjectVersions(name, self.index.files(name), self.target)
        return self._projects[name]

    def metadata(self, release: Release) -> DistMetadata:
        """The core metadata standing for ``release`` (memoised)."""
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
    ) -> Iterator[Release]:
        """Releases of ``name`` that every specifier admits (pre-releases as allowed)."""
        return allowed_releases(self.project(name), specifiers, self.prereleases)

    # -- resolvelib's interface --

    def identify(self, requirement_or_candidate: Requirement_ | Candidate) -> str:
        """``name``, ``name[extra]`` or ``<python>``."""
        return requirement_or_candidate.identifier

    def get_preference(
        self,
        identifier: str,
        resolutions: Mapping[str, Candidate],
        candidates: Mapping[str, Iterator[Candidate]],
        information: Mapping[str, Iterator[RequirementInformation[Requirement_, Candidate]]],
        backtrack_causes: Sequence[RequirementInformation[Requirement_, Candidate]],
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
            identifier != PYTHON,
            identifier not in causes,
            not pinned,
            identifier not in self.roots,
            identifier,
        )

    def find_matches(
        self,
        identifier: str,
        requirements: Mapping[str, Iterator[Requirement_]],
        incompatibilities: Mapping[str, Iterator[Candidate]],
    ) -> Callable[[], Iterator[Candidate]] | list[Candidate]:
        """Usable versions newest first (a preferred version that still fits goes first)."""
        reqs = list(requirements[identifier])
        if identifier == PYTHON:
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

        def candidates() -> Iterator[Candidate]:
            releases = (r for r in self.matching(name, specifiers) if r.version not in bad)
            if first is not None:
                yield Candidate(name=name, version=first.version, extra=extra, release=first)
            hinted = False
            for release in releases:
                if first is not None and release.version == first.version:
                    continue
                if not hinted:
                    self.index.prefetch_metadata([release.best])
                    hinted = True
                yield Candidate(name=name, version=release.version, extra=extra, release=release)

        # resolvelib accepts a callable returning an iterator, and re-calls it when it needs
        # the candidates again: versions are judged only as far as the resolver looks.
        return candidates

    def is_satisfied_by(self, requirement: Requirement_, candidate: Candidate) -> bool:
        """Whether the version is in the specifier (pre-releases were filtered already)."""
        return requirement.specifier.contains(candidate.version, prereleases=True)

    def get_dependencies(self, candidate: Candidate) -> tuple[Requirement_, ...]:
        """Requirements active on the target for this candidate (its extra, if any)."""
        if candidate.release is None:  # <python>
            return ()
        if candidate not in self._dependencies:
            deps = self._compute_dependencies(candidate, candidate.release)
            self._dependencies[candidate] = deps
            names = sorted(
                {NormalizedName(d.name) for d in deps if d.name not in (candidate.name, PYTHON)}
            )
            if names:
                self.index.prefetch(names)
        return self._dependencies[candidate]

    def _compute_dependencies(
        self, candidate: Candidate, release: Release
    ) -> tuple[Requirement_, ...]:
        name = NormalizedName(candidate.name)
        meta = self.metadata(release)
        parent = f"{name} {release.version}"
        out: list[Requirement_] = []
        if candidate.extra is None:
            if meta.requires_python is not None:
                out.append(
                    Requirement_(
                        PYTHON, None, meta.requires_python, f"Python{meta.requires_python}"
                    )
                )
            active = [r for r in meta.requires_dist if self._active(r, "")]
        else:
            pin = f"=={release.version}"
            out.append(Requirement_(name, None, SpecifierSet(pin), f"{name}{pin}"))
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
            out.extend(split_requirement(req, f"required by {candidate}"))
        return tuple(dict.fromkeys(out))

    def _active(self, req: Requirement, extra: str) -> bool:
        if req.marker is None:
            return True
        return req.marker.evaluate({**self.environment, "extra": extra})


def split_requirement(req: Requirement, where: str) -> list[Requirement_]:
    """``foo[x,y]>=1`` -> ``foo>=1``, ``foo[x]>=1``, ``foo[y]>=1``."""
    if req.url:
        raise ResolutionError(
            f"{req} ({where}): direct URL requirements are not supported",
            hint="depend on a released version from the index instead",
        )
    name = canonicalize_name(req.name)
    spec = str(req.specifier)
    out = [Requirement_(name, None, req.specifier, f"{name}{spec}")]
    for extra in sorted({canonicalize_name(e) for e in req.extras}):
        out.append(Requirement_(name, extra, req.specifier, f"{name}[{extra}]{spec}"))
    return out


class RoundCounter(BaseReporter[Requirement_, Candidate, str]):
    """Counts rounds and backtracks for the closing progress line."""

    def __init__(self) -> None:
        self.rounds = 0
        self.backtracks = 0

    def starting_round(self, index: int) -> None:
        """Count a round."""
        self.rounds = index + 1

    def rejecting_candidate(self, criterion: object, candidate: Candidate) -> None:
        """Count a backtrack."""
        self.backtracks += 1

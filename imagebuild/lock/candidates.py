"""What the resolver chooses among: releases, requirements and candidates, from an index's files.

A project's files are grouped by version once, and each version is judged for the target only
when asked about (its best file: the most specific compatible wheel, else the sdist).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.index.model import IndexFile
from imagebuild.target.platform import TargetPlatform

if TYPE_CHECKING:
    pass


# -- resolvelib's requirement and candidate types -------------------------------------------


@dataclass(frozen=True, slots=True)
class Release:
    """The usable files of one version of a project on the target."""

    version: Version
    files: tuple[IndexFile, ...]
    """All non-yanked files of the version, sorted by filename."""
    best: IndexFile
    """The file whose metadata stands for the version: best compatible wheel, else an sdist."""


@dataclass(frozen=True, slots=True)
class Requirement_:
    """A requirement on one identifier: a package, one extra of a package, or ``<python>``."""

    name: str
    """Canonical project name, or ``<python>``."""
    extra: NormalizedName | None
    specifier: SpecifierSet
    shown: str = field(compare=False)
    """How messages print it, e.g. ``foo[x]>=1`` (markers already evaluated away)."""

    @property
    def identifier(self) -> str:
        """The resolvelib identifier: ``name`` or ``name[extra]``."""
        return _identifier(self.name, self.extra)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A version of a package (``extra`` None), of one of its extras, or the target Python."""

    name: str
    version: Version
    extra: NormalizedName | None = None
    release: Release | None = field(default=None, compare=False)

    @property
    def identifier(self) -> str:
        """The resolvelib identifier: ``name`` or ``name[extra]``."""
        return _identifier(self.name, self.extra)

    def __str__(self) -> str:
        return f"{self.identifier} {self.version}"


def _identifier(name: str, extra: str | None) -> str:
    return f"{name}[{extra}]" if extra else name


# -- candidate discovery ---------------------------------------------------------------------


class ProjectVersions:
    """What the index offers for one name; each version is judged only when asked about.

    Popular projects list tens of thousands of wheels (every version times every platform),
    and the resolver usually looks at the newest one or two versions: parsing and ranking
    every file up front was most of a lock's time.
    """

    def __init__(self, name: NormalizedName, files: Sequence[IndexFile], target: TargetPlatform):
        self.target = target
        self.python = target_python(target)
        self.files = _by_version(name, files)
        self.known = bool(self.files)
        self.versions = sorted(self.files, reverse=True)
        """Every listed version, newest first."""
        self._judged: dict[Version, Release | str] = {}

    def release(self, version: Version) -> Release | None:
        """The usable release of ``version``, or None (the reason goes to ``excluded``)."""
        if version not in self._judged:
            self._judged[version] = self._judge(version)
        judged = self._judged[version]
        return judged if isinstance(judged, Release) else None

    @property
    def releases(self) -> list[Release]:
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

    def _judge(self, version: Version) -> Release | str:
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
        return Release(version=version, files=tuple(live), best=best)


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


def target_python(target: TargetPlatform) -> Version:
    """The target's interpreter version (its full release when the base says it)."""
    major, minor = target.python_version
    return Version(target.python_full_version or f"{major}.{minor}.0")


def allowed_releases(
    project: ProjectVersions, specifiers: Sequence[SpecifierSet], prereleases: bool
) -> Iterator[Release]:
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

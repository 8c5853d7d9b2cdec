"""Lock values: packages, their files and sources, and what a lock recorded about its making.

Both readers (``lock.uvlock`` for uv.lock, ``lock.pylock`` for PEP 751 files) produce these
values; selection, staleness checks and the build consume them and never re-read the file.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from packaging.markers import Marker
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, parse_wheel_filename
from packaging.version import Version

from imagebuild.digest import Digest
from imagebuild.target.platform import TargetPlatform

SourceKind = Literal["registry", "directory", "editable", "virtual", "path", "url", "git"]
LockKind = Literal["uv", "pylock"]

UV_LOCK = "uv.lock"
PYLOCK = "pylock.toml"
RELOCK_HINT = "run 'uv lock' (or drop --locked)"
"""The fix for a uv.lock that does not fit: uv writes it, imgbuild only reads it."""

__all__ = [
    "PYLOCK",
    "RELOCK_HINT",
    "UV_LOCK",
    "Dependency",
    "Digest",
    "Lock",
    "LockInputs",
    "LockKind",
    "LockRequirement",
    "LockedPackage",
    "PackageSource",
    "RecordedLock",
    "SdistFile",
    "SourceKind",
    "UvProjectMetadata",
    "WheelFile",
    "file_url",
    "sort_packages",
    "sort_targets",
    "url_filename",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class WheelFile:
    """One wheel a lock pins: where to get it and what its bytes must hash to."""

    filename: str
    """The wheel file name; its tags decide compatibility."""
    url: str
    """Absolute ``https://``/``http://`` URL, or a ``file://`` URL for local wheels."""
    sha256: Digest
    """The recorded digest the downloaded bytes must match."""
    size: int | None = None
    """The recorded size in bytes, if the lock has one."""
    upload_time: str | None = None
    """When the index received the file (ISO 8601, UTC), if recorded."""

    @property
    def name(self) -> NormalizedName:
        """The distribution name from the file name (canonical)."""
        return parse_wheel_filename(self.filename)[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class SdistFile:
    """A source distribution a lock records (imgbuild never builds it, but reports it)."""

    filename: str
    """The sdist file name."""
    url: str
    """Absolute URL or ``file://`` URL."""
    sha256: Digest | None = None
    """The recorded digest, if any."""
    size: int | None = None
    """The recorded size in bytes, if any."""
    upload_time: str | None = None
    """Upload time (ISO 8601, UTC), if recorded."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PackageSource:
    """Where a locked package comes from, as the lock spells it."""

    kind: SourceKind
    """registry, directory, editable, virtual, path, url or git."""
    location: str
    """Index URL, path relative to the lock file, URL, or git URL with ``?rev=…#<sha>``."""
    subdirectory: str | None = None
    """Subdirectory inside a URL or git source."""

    def describe(self) -> str:
        """A short human form such as ``git https://host/repo?rev=main#abc``."""
        names = {
            "registry": "index",
            "directory": "local directory",
            "editable": "editable directory",
            "virtual": "virtual project",
            "path": "local file",
            "url": "URL",
            "git": "git",
        }
        return f"{names[self.kind]} {self.location}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Dependency:
    """An edge of uv's dependency graph (pylock's ``dependencies`` are audit-only)."""

    name: NormalizedName
    """The dependency's canonical name."""
    extras: tuple[NormalizedName, ...] = ()
    """Extras of the dependency this edge activates, sorted."""
    marker: Marker | None = None
    """When the edge applies (uv has already folded in the forks)."""
    version: Version | None = None
    """Present only when the name alone is ambiguous in the lock."""
    source: PackageSource | None = None
    """Present only when name and version are still ambiguous."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LockedPackage:
    """One ``[[package]]``/``[[packages]]`` entry."""

    name: NormalizedName
    """Canonical name."""
    version: Version | None
    """The pinned version (``None`` for source trees with a dynamic version)."""
    source: PackageSource
    """Where it comes from."""
    wheels: tuple[WheelFile, ...] = ()
    """Every wheel the lock lists, sorted by file name."""
    sdist: SdistFile | None = None
    """The sdist the lock lists, if any."""
    dependencies: tuple[Dependency, ...] = ()
    """uv: unconditional dependency edges."""
    optional_dependencies: Mapping[NormalizedName, tuple[Dependency, ...]] = field(
        default_factory=dict, hash=False
    )
    """uv: extra -> edges followed when the extra is requested."""
    dependency_groups: Mapping[NormalizedName, tuple[Dependency, ...]] = field(
        default_factory=dict, hash=False
    )
    """uv: dependency group (``[package.dev-dependencies]``) -> edges."""
    marker: Marker | None = None
    """pylock: when this entry applies (may use ``extras``/``dependency_groups``)."""
    requires_python: SpecifierSet | None = None
    """pylock: Python versions the entry supports (an error if the target is outside)."""
    resolution_markers: tuple[Marker, ...] = ()
    """uv: the forks this version belongs to (empty: every fork)."""

    def describe(self) -> str:
        """``name version`` or just ``name``."""
        return f"{self.name} {self.version}" if self.version is not None else str(self.name)


@dataclass(frozen=True, kw_only=True, slots=True)
class LockRequirement:
    """One requirement as uv records the project's inputs (``[package.metadata]``)."""

    name: NormalizedName
    """Canonical name."""
    extras: tuple[NormalizedName, ...] = ()
    """Requested extras, sorted."""
    specifier: str = ""
    """The version specifier as written by uv (may be empty)."""
    marker: str | None = None
    """The marker as written by uv."""
    source: tuple[tuple[str, str], ...] = ()
    """uv's lowered source keys (``index``, ``editable``, ``git`` …), sorted."""


@dataclass(frozen=True, kw_only=True, slots=True)
class UvProjectMetadata:
    """What uv recorded about the root project's inputs, compared by ``--locked``."""

    requires_dist: tuple[LockRequirement, ...] = ()
    """Dependencies and optional dependencies (the latter with ``extra == '…'`` markers)."""
    provides_extras: tuple[NormalizedName, ...] = ()
    """Extras the project declares."""
    requires_dev: Mapping[NormalizedName, tuple[LockRequirement, ...]] = field(
        default_factory=dict, hash=False
    )
    """Dependency group -> its requirements (includes expanded)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Lock:
    """A parsed lock file of either kind."""

    kind: LockKind
    """``uv`` for uv.lock, ``pylock`` for PEP 751 files."""
    path: Path
    """The file it was read from."""
    requires_python: SpecifierSet | None = None
    """Python versions the whole lock supports."""
    root: NormalizedName | None = None
    """The project at the lock's own directory (built separately), if the lock has it."""
    packages: tuple[LockedPackage, ...] = ()
    """Every entry, sorted by name then version."""
    revision: int | None = None
    """uv.lock's ``revision`` (minor format version)."""
    root_metadata: UvProjectMetadata | None = None
    """uv: the root package's ``[package.metadata]``."""
    local_metadata: Mapping[NormalizedName, UvProjectMetadata] = field(
        default_factory=dict, hash=False
    )
    """uv: every local package's ``[package.metadata]`` (workspace members), by name."""
    manifest: Mapping[str, tuple[LockRequirement, ...]] = field(default_factory=dict, hash=False)
    """uv: ``[manifest]`` requirement lists (``constraints``, ``overrides`` …)."""
    environments: tuple[Marker, ...] = ()
    """pylock ``environments`` / uv ``supported-markers``: where the lock applies."""
    extras: tuple[NormalizedName, ...] | None = None
    """pylock: extras the lock can install (``None`` when the file does not say)."""
    dependency_groups: tuple[str, ...] | None = None
    """pylock: groups the lock can install (``None`` when the file does not say)."""
    default_groups: tuple[str, ...] = ()
    """pylock: groups selected when none are requested."""
    recorded: RecordedLock | None = None
    """pylock written by imgbuild: its ``[tool.imgbuild]`` record (inputs, pins, bases)."""

    @property
    def filename(self) -> str:
        """The lock's file name, for messages."""
        return self.path.name


def sort_packages(packages: Iterable[LockedPackage]) -> tuple[LockedPackage, ...]:
    """Entries by name, then version (source trees without one first), then location."""

    def key(p: LockedPackage) -> tuple[str, int, Version, str]:
        return (p.name, p.version is not None, p.version or Version("0"), p.source.location)

    return tuple(sorted(packages, key=key))


def sort_targets(targets: Sequence[TargetPlatform]) -> tuple[TargetPlatform, ...]:
    """Targets in a stable order (Python, then architecture, then libc)."""
    return tuple(
        sorted(set(targets), key=lambda t: (t.python_version, t.arch, t.libc, t.libc_version))
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class LockInputs:
    """Everything a lock is a function of, besides the index's contents."""

    requires_python: str | None
    """``project.requires-python`` as written (normalised specifier)."""
    requirements: tuple[tuple[str, tuple[str, ...]], ...]
    """Origin -> requirement strings, sorted: ``""`` for dependencies, ``extra:x``, ``group:g``."""
    indexes: tuple[str, ...]
    """Index URLs, primary first."""
    prereleases: bool
    """Whether pre-releases were allowed everywhere."""
    targets: tuple[TargetPlatform, ...]
    """The targets the lock covers, sorted."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordedLock:
    """What an imgbuild pylock.toml says about how it was made."""

    inputs: LockInputs
    """The recorded inputs."""
    pins: Mapping[NormalizedName, tuple[Version, ...]]
    """Locked versions per package name."""
    bases: Mapping[str, Digest] = field(default_factory=dict)
    """Base image reference (as configured) -> the digest the lock was made for."""
    debian: Mapping[str, Any] | None = None
    """A built base's lock (``[tool.imgbuild.debian]``), as decoded TOML: the debian stage
    reads it (``imagebuild.debian.baselock``)."""

    def preferences(self) -> dict[NormalizedName, Version]:
        """The newest locked version of each package, for keeping pins when re-locking."""
        return {name: max(versions) for name, versions in self.pins.items()}


def file_url(lock_dir: Path, relative: str) -> str:
    """The ``file://`` URL of ``relative`` (a path written in a lock) from ``lock_dir``."""
    return (lock_dir / relative).resolve().as_uri()


def url_filename(url: str) -> str:
    """The file name a URL ends in, unquoted."""
    return unquote(posixpath.basename(urlsplit(url).path))

"""The index stage's values and contracts.

``IndexFile`` and ``DistMetadata``, the ``PackageIndex`` protocol the resolver reads, and
the ``SdistMetadataReader`` the build stage hands in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import httpx
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

FileKind = Literal["wheel", "sdist"]


@dataclass(frozen=True, kw_only=True, slots=True)
class IndexFile:
    """One distribution file listed on a project page."""

    filename: str
    """The file name (wheel or sdist)."""
    url: str
    """Absolute download URL (relative URLs on the page are resolved against it)."""
    sha256: str | None
    """Lowercase hex sha256 from the page's ``hashes``, if given."""
    size: int | None = None
    """Size in bytes, if the page gives it (mandatory from API v1.1)."""
    upload_time: str | None = None
    """``yyyy-mm-ddThh:mm:ss[.ffffff]Z`` as served, if given."""
    requires_python: SpecifierSet | None = None
    """The file's ``requires-python``; the resolver skips files the target does not meet."""
    yanked: str | None = None
    """``None`` if not yanked, else the reason (empty string when none was given)."""
    core_metadata: str | bool = False
    """PEP 658/714: False (none), True (served, no hash) or the metadata file's sha256 hex."""
    index_url: str = ""
    """The Simple API base URL this file was listed on (pylock ``index``)."""

    @property
    def kind(self) -> FileKind:
        """``wheel`` or ``sdist`` by file name."""
        return "wheel" if self.filename.endswith(".whl") else "sdist"

    @property
    def name(self) -> NormalizedName:
        """Canonical project name from the file name."""
        if self.kind == "wheel":
            return parse_wheel_filename(self.filename)[0]
        return parse_sdist_filename(self.filename)[0]

    @property
    def version(self) -> Version:
        """Version from the file name."""
        if self.kind == "wheel":
            return parse_wheel_filename(self.filename)[1]
        return parse_sdist_filename(self.filename)[1]


@dataclass(frozen=True, kw_only=True, slots=True)
class DistMetadata:
    """The parts of a distribution's core metadata that resolution needs."""

    name: NormalizedName
    """Canonical name."""
    version: Version
    """Version."""
    requires_dist: tuple[Requirement, ...] = ()
    """``Requires-Dist`` entries, in file order (markers may use ``extra``)."""
    requires_python: SpecifierSet | None = None
    """``Requires-Python``."""
    provides_extra: tuple[NormalizedName, ...] = ()
    """``Provides-Extra``, canonicalised."""


class PackageIndex(Protocol):
    """What the resolver asks of an index (one or several, merged)."""

    def files(self, name: NormalizedName) -> tuple[IndexFile, ...]:
        """Every file of project ``name`` (all versions); empty if the project is unknown.

        Files whose name does not parse are left out. Order: as listed by the index.
        Raises ``PackageIndexError`` when the index fails (not for a 404, which is empty).
        """

    def metadata(self, file: IndexFile) -> DistMetadata:
        """Core metadata of ``file`` (PEP 658 file when served, else from the wheel itself).

        Raises ``PackageIndexError`` when it cannot be had (for example an sdist whose
        build backend fails).
        """

    def prefetch(self, names: Iterable[NormalizedName]) -> None:
        """Start fetching these project pages in the background (a hint; may do nothing)."""

    def prefetch_metadata(self, files: Iterable[IndexFile]) -> None:
        """Start fetching metadata for these files in the background (a hint)."""


class SdistMetadataReader(Protocol):
    """Core metadata of an sdist from its PEP 517 backend (``build.sdist.sdist_metadata``)."""

    def __call__(
        self, http: httpx.Client, file: IndexFile, cache_dir: Path, *, indexes: Sequence[str]
    ) -> bytes:
        """The ``METADATA`` bytes of ``file``; build requirements come from ``indexes``."""
        ...

"""Values shared by the Debian stage: archive sources, index entries, locked packages."""

from __future__ import annotations

from dataclasses import dataclass

from imagebuild.digest import Digest


@dataclass(frozen=True, kw_only=True, slots=True)
class ArchiveSource:
    """One suite of a Debian archive, e.g. ``http://deb.debian.org/debian`` ``bookworm``."""

    mirror: str
    """The archive root URL, no trailing slash (a snapshot mirror for old locks)."""
    suite: str
    """The suite or codename, e.g. ``bookworm``, ``bookworm-updates``, ``bookworm-security``."""
    components: tuple[str, ...] = ("main",)
    """Components read, e.g. ``("main",)``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class IndexedPackage:
    """One binary package paragraph of a Packages index."""

    name: str
    version: str
    architecture: str
    """``amd64``, ``arm64`` or ``all``."""
    filename: str
    """Path of the .deb below the mirror root (``pool/main/...``)."""
    sha256: Digest
    size: int
    mirror: str
    """The mirror root the index came from (URL = mirror + "/" + filename)."""
    depends: str = ""
    """The raw ``Depends`` field."""
    pre_depends: str = ""
    """The raw ``Pre-Depends`` field."""
    provides: str = ""
    """The raw ``Provides`` field."""
    essential: bool = False
    multi_arch: str = ""
    source: str = ""
    """The ``Source`` field (source package name, maybe with a version in parentheses)."""

    @property
    def url(self) -> str:
        """Where the .deb is fetched."""
        return f"{self.mirror}/{self.filename}"


@dataclass(frozen=True, kw_only=True, slots=True)
class LockedDeb:
    """A .deb a base lock pins: rebuilt later from exactly these bytes."""

    name: str
    version: str
    architecture: str
    """The package's architecture (``amd64``, ``arm64`` or ``all``)."""
    url: str
    """Where it was fetched (mirror + pool path); another mirror serves the same pool path."""
    sha256: Digest
    size: int

    @property
    def pool_path(self) -> str:
        """The part of ``url`` below the mirror root (``pool/...``)."""
        index = self.url.find("/pool/")
        return self.url[index + 1 :] if index >= 0 else self.url

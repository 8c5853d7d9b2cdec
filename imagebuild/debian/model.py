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


@dataclass(frozen=True, kw_only=True, slots=True)
class VersionNeed:
    """The symbol versions a file needs from one library (``.gnu.version_r``)."""

    library: str
    """The needed library's file name, as in DT_NEEDED (``libc.so.6``)."""
    versions: tuple[str, ...]
    """Version names the loader insists on, sorted (``GLIBC_2.34``, ``GLIBCXX_3.4.30``).
    Weak needs (``VER_FLG_WEAK``) are left out: the loader only warns when they are absent."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ElfInfo:
    """What the dynamic loader needs to load one ELF file."""

    machine: str
    """The CPU it runs on, as ``uname -m`` names it: ``x86_64``, ``aarch64``, ``ppc64le``, ..."""
    elf_class: int
    """32 or 64."""
    shared: bool
    """An ``ET_DYN`` object: a shared library, an extension module or a PIE executable."""
    interpreter: str | None = None
    """The PT_INTERP path of an executable (``/lib64/ld-linux-x86-64.so.2``), else None."""
    soname: str | None = None
    """DT_SONAME, when set."""
    needed: tuple[str, ...] = ()
    """DT_NEEDED entries in file order (the order the loader searches them in)."""
    rpath: tuple[str, ...] = ()
    """DT_RPATH directories in order (``$ORIGIN`` left as written)."""
    runpath: tuple[str, ...] = ()
    """DT_RUNPATH directories in order."""
    version_needs: tuple[VersionNeed, ...] = ()
    """Symbol versions needed, one entry per library, sorted by library."""
    version_defs: tuple[str, ...] = ()
    """Symbol versions this file defines, sorted (the base entry, its own soname, left out)."""
    python_module: bool | None = None
    """Whether Python can import the file: it names the init function of the module its file
    name makes (``PyInit__C`` for ``_C.cpython-311-x86_64-linux-gnu.so``). None when that
    was not asked (a base's library, a file whose name Python would not import)."""

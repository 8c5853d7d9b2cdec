"""TargetPlatform: the image's Python, libc and CPU (never the host's), with tags and markers."""

from __future__ import annotations

import functools
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Protocol, TypeVar, get_args

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from imagebuild.errors import TargetError

Libc = Literal["glibc", "musl"]
Arch = Literal["x86_64", "aarch64", "i686", "armv7l", "ppc64le", "s390x", "riscv64"]

# OCI/Go architecture names (plus variant) -> the names wheel platform tags use.
_OCI_ARCH: dict[tuple[str, str | None], Arch] = {
    ("amd64", None): "x86_64",
    ("arm64", None): "aarch64",
    ("arm64", "v8"): "aarch64",
    ("386", None): "i686",
    ("arm", "v7"): "armv7l",
    ("ppc64le", None): "ppc64le",
    ("s390x", None): "s390x",
    ("riscv64", None): "riscv64",
}

# PEP 513/571/599 names, each emitted straight after the manylinux_2_N tag it equals, and
# only on the architectures those policies defined.
_LEGACY_MANYLINUX: dict[tuple[int, int], tuple[str, frozenset[str]]] = {
    (2, 17): (
        "manylinux2014",
        frozenset({"x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x"}),
    ),
    (2, 12): ("manylinux2010", frozenset({"x86_64", "i686"})),
    (2, 5): ("manylinux1", frozenset({"x86_64", "i686"})),
}


def arch_from_oci(architecture: str, variant: str | None = None) -> Arch:
    """Map an OCI ``architecture`` (and ``variant``) to a wheel-tag arch (amd64 -> x86_64)."""
    key = (architecture, variant or None)
    if key in _OCI_ARCH:
        return _OCI_ARCH[key]
    if architecture != "arm" and (architecture, None) in _OCI_ARCH:
        return _OCI_ARCH[(architecture, None)]
    known = ", ".join(sorted({a if v is None else f"{a}/{v}" for a, v in _OCI_ARCH}))
    shown = f"{architecture}/{variant}" if variant else architecture
    raise TargetError(f"unsupported image architecture {shown!r} (supported: {known})")


class HasFilename(Protocol):
    """Anything naming a wheel file (lock and index file values both do)."""

    @property
    def filename(self) -> str:
        """The wheel's file name, e.g. ``numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.whl``."""
        ...


_W = TypeVar("_W", bound=HasFilename)


@dataclass(frozen=True, slots=True)
class _Named:
    filename: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetPlatform:
    """The interpreter and platform wheels are chosen for: the image's, not the host's."""

    python_version: tuple[int, int]
    """Major and minor version of the image's CPython, e.g. ``(3, 11)``."""
    python_full_version: str | None = None
    """The full version (``"3.11.9"``) when known; markers otherwise assume ``X.Y.0``."""
    implementation: Literal["cpython"] = "cpython"
    """The interpreter implementation; only CPython images are supported."""
    libc: Libc = "glibc"
    """The C library family of the image: ``glibc`` (manylinux) or ``musl`` (musllinux)."""
    libc_version: tuple[int, int]
    """The libc's version, e.g. ``(2, 36)`` for Debian bookworm or ``(1, 2)`` for musl."""
    arch: Arch
    """The CPU architecture as wheel tags spell it (``x86_64``, ``aarch64``)."""

    def __post_init__(self) -> None:
        if len(self.python_version) != 2 or self.python_version[0] != 3:
            raise TargetError(f"unsupported Python version {self.python_version!r} (need 3.x)")
        if self.implementation != "cpython":
            raise TargetError(f"unsupported Python implementation {self.implementation!r}")
        if self.libc not in get_args(Libc):
            raise TargetError(f"unknown libc {self.libc!r} (expected glibc or musl)")
        if self.arch not in get_args(Arch):
            raise TargetError(f"unsupported architecture {self.arch!r}")
        if self.python_full_version is not None:
            parts = self.python_full_version.split(".")
            if tuple(int(p) for p in parts[:2] if p.isdigit()) != self.python_version:
                raise TargetError(
                    f"python_full_version {self.python_full_version!r} does not match "
                    f"python_version {self.python_version[0]}.{self.python_version[1]}"
                )

    @classmethod
    def from_oci(
        cls,
        *,
        architecture: str,
        variant: str | None = None,
        python_version: tuple[int, int],
        python_full_version: str | None = None,
        libc: Libc = "glibc",
        libc_version: tuple[int, int],
    ) -> TargetPlatform:
        """Build a target from an OCI platform (``amd64``/``arm64``) and the image's facts."""
        return cls(
            python_version=python_version,
            python_full_version=python_full_version,
            libc=libc,
            libc_version=libc_version,
            arch=arch_from_oci(architecture, variant),
        )

    @property
    def interpreter(self) -> str:
        """The interpreter tag, e.g. ``cp311``."""
        return f"cp{self.python_version[0]}{self.python_version[1]}"

    def platforms(self) -> tuple[str, ...]:
        """Platform tags, best first (PEP 600/656 order, legacy aliases after their twin)."""
        major, minor = self.libc_version
        out: list[str] = []
        if self.libc == "musl":
            out += [f"musllinux_{major}_{m}_{self.arch}" for m in range(minor, -1, -1)]
        else:
            floor = 5 if self.arch in ("x86_64", "i686") else 17
            for m in range(minor, floor - 1, -1):
                out.append(f"manylinux_{major}_{m}_{self.arch}")
                legacy = _LEGACY_MANYLINUX.get((major, m))
                if legacy and self.arch in legacy[1]:
                    out.append(f"{legacy[0]}_{self.arch}")
        out.append(f"linux_{self.arch}")
        return tuple(out)

    def tags(self) -> tuple[Tag, ...]:
        """Supported wheel tags for the target, best first, without duplicates."""
        return _tags(self)

    def tag_ranks(self) -> Mapping[Tag, int]:
        """Tag -> its rank in ``tags()`` (0 is best); computed once per target."""
        return _tag_ranks(self)

    def marker_environment(self) -> dict[str, str]:
        """The PEP 508 environment of the target, for ``Marker.evaluate``."""
        full = self.python_full_version or f"{self.python_version[0]}.{self.python_version[1]}.0"
        return {
            "implementation_name": "cpython",
            "implementation_version": full,
            "os_name": "posix",
            "platform_machine": self.arch,
            "platform_python_implementation": "CPython",
            # Kernel facts belong to whichever host runs the container; leave them empty.
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": full,
            "python_version": f"{self.python_version[0]}.{self.python_version[1]}",
            "sys_platform": "linux",
        }

    def describe(self) -> str:
        """A short human form, e.g. ``cp311 manylinux_2_36 x86_64``."""
        family = "musllinux" if self.libc == "musl" else "manylinux"
        major, minor = self.libc_version
        return f"{self.interpreter} {family}_{major}_{minor} {self.arch}"

    def rank_wheels(self, files: Sequence[_W]) -> list[_W]:
        """The compatible wheels among ``files``, best first.

        Ranked by the best supported tag each wheel carries, then by the higher build tag,
        then by input order. Files whose names are not wheel names are ignored.
        """
        ranks = self.tag_ranks()
        scored: list[tuple[int, tuple[int, tuple[int, str]], _W]] = []
        for file in files:
            try:
                _, _, build, tags = parse_wheel_filename(file.filename)
            except InvalidWheelFilename:
                continue
            best = min((ranks[t] for t in tags if t in ranks), default=None)
            if best is not None:
                scored.append((best, (1, build) if build else (0, (0, "")), file))
        # Stable sorts: higher build tag first, then lower tag rank first.
        scored.sort(key=lambda s: s[1], reverse=True)
        scored.sort(key=lambda s: s[0])
        return [s[2] for s in scored]

    def check_built(self, filename: str, source: str) -> None:
        """Refuse a wheel this machine built from ``source`` that the image cannot import.

        The project, a path or a git dependency: its backend runs on the build host's
        interpreter, so extension modules come out for the host's Python and CPU (a
        ``cp311-cp311-linux_x86_64`` wheel), which an image of another Python or CPU cannot
        import. Pure-Python wheels (``py3-none-any``) fit every target.
        """
        if self.rank_wheels([_Named(filename)]):
            return
        major, minor = sys.version_info[:2]
        host = f"CPython {major}.{minor} on {platform.machine()}"
        fixes = []
        if (major, minor) != self.python_version:
            fixes.append(f"give the image this machine's Python (--python {major}.{minor})")
        if platform.machine() != self.arch:
            fixes.append(f"build on a {self.arch} machine")
        raise TargetError(
            f"{source}: its wheel {filename} holds extension modules built for this machine "
            f"({host}), which the image ({self.describe()}) cannot import",
            hint=" or ".join(fixes or ["build on a machine of the image's C library"])
            + ": imgbuild runs build backends on the Python it runs on",
        )

    def choose_wheel(self, package_name: str, files: Sequence[_W]) -> _W:
        """The best wheel of ``package_name`` for this target; ``TargetError`` when none fits."""
        ranked = self.rank_wheels(files)
        if ranked:
            return ranked[0]
        name = canonicalize_name(package_name)
        names = ", ".join(sorted(f.filename for f in files)) or "none"
        raise TargetError(
            f"no wheel of {name} fits the target {self.describe()} (available: {names})",
            hint="use a base image whose Python/libc/arch these wheels support, "
            "or lock a version that ships a matching wheel",
        )


# Targets are frozen and hashable, and their tag lists are long (about 900 entries) and
# asked for on every wheel choice: compute each once.
@functools.cache
def _tags(target: TargetPlatform) -> tuple[Tag, ...]:
    platforms = target.platforms()
    ordered = [
        *cpython_tags(target.python_version, abis=[target.interpreter], platforms=platforms),
        *compatible_tags(target.python_version, target.interpreter, platforms),
    ]
    return tuple(dict.fromkeys(ordered))


@functools.cache
def _tag_ranks(target: TargetPlatform) -> Mapping[Tag, int]:
    ranks: dict[Tag, int] = {}
    for i, tag in enumerate(_tags(target)):
        ranks.setdefault(tag, i)
    return MappingProxyType(ranks)

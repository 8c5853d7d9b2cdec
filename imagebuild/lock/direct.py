"""Directly sourced packages in a lock: git commits and direct archives.

``DirectPackage`` is what ``imgbuild lock`` learnt about one (its version and requirements
from its own metadata, the commit or hash that pins it); the writer records it as a PEP 751
``vcs`` or ``archive`` entry. Git sources are spelled in a lock's ``PackageSource`` as uv
spells them, ``<url>?<tag|branch|rev>=<value>&subdirectory=<dir>#<commit>``, whichever file
they were read from (``parse_git_location`` takes that apart).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from imagebuild.errors import LockError
from imagebuild.project.sources import DirectSource


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectPackage:
    """A package a project takes from git or a direct archive, as locked."""

    source: DirectSource
    """Where the project said it comes from."""
    version: Version
    """Its version (from its metadata)."""
    requires_dist: tuple[Requirement, ...] = ()
    """Its ``Requires-Dist`` (markers may use ``extra``)."""
    requires_python: SpecifierSet | None = None
    """Its ``Requires-Python``."""
    commit: str | None = None
    """git: the full commit id the revision resolved to."""
    sha256: str | None = None
    """Archives: the hex digest of the bytes fetched (checked against the ``#sha256=``)."""
    size: int | None = None
    """Archives: the size in bytes."""
    markers: Mapping[str, tuple[Marker | None, ...]] = field(default_factory=dict, hash=False)
    """Origin (``""``, ``extra:x``, ``group:g``) -> the markers of the requirements on it."""

    @property
    def name(self) -> NormalizedName:
        """The package's canonical name."""
        return self.source.name


@dataclass(frozen=True, kw_only=True, slots=True)
class GitLocation:
    """A git source as a lock records it."""

    url: str
    """The repository URL."""
    commit: str
    """The commit id the lock pins (verified when fetched)."""
    requested: str | None = None
    """The revision the project asked for (tag, branch or rev), if any."""
    subdirectory: str | None = None
    """The project's directory in the repository."""


def git_location(url: str, commit: str, requested: str | None, subdirectory: str | None) -> str:
    """The uv-style spelling of a git source: ``url?rev=…&subdirectory=…#commit``."""
    query = [("rev", requested)] if requested else []
    if subdirectory:
        query.append(("subdirectory", subdirectory))
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode(query), fragment=commit))


def parse_git_location(location: str, *, where: str) -> GitLocation:
    """Take a uv-style git location apart; ``LockError`` when it pins no commit."""
    parts = urlsplit(location)
    if not parts.fragment:
        raise LockError(
            f"{where}: git source {location} records no commit",
            hint="re-lock so the lock pins the commit",
        )
    query = dict(parse_qsl(parts.query))
    requested = query.get("rev") or query.get("tag") or query.get("branch")
    return GitLocation(
        url=urlunsplit(parts._replace(query="", fragment="")),
        commit=parts.fragment,
        requested=requested,
        subdirectory=query.get("subdirectory") or None,
    )


def requirements_for(
    package: DirectPackage, extras: Collection[str], marker: Marker | None
) -> list[Requirement]:
    """What ``package`` requires with ``extras``, each under ``marker`` (the edge to it).

    A ``Requires-Dist`` gated by an extra keeps the rest of its marker: ``extra == 'x' and
    sys_platform == 'linux'`` becomes ``sys_platform == 'linux'`` when ``x`` is requested.
    """
    wanted = {canonicalize_name(e) for e in extras}
    out: list[Requirement] = []
    for req in package.requires_dist:
        rest, gate = _split_extra(req, package)
        if gate is not None and gate not in wanted:
            continue
        combined = Requirement(str(req).split(";")[0])
        clauses = [str(m) for m in (marker, rest) if m is not None]
        combined.marker = Marker(" and ".join(f"({c})" for c in clauses)) if clauses else None
        out.append(combined)
    return out


def _split_extra(req: Requirement, package: DirectPackage) -> tuple[Marker | None, str | None]:
    """A requirement's marker without its ``extra == '…'`` clause, and that extra."""
    if req.marker is None or "extra" not in str(req.marker):
        return req.marker, None
    # packaging keeps a marker as a list of (variable, op, value) atoms and "and"/"or".
    atoms = req.marker._markers
    gates = [a for a in atoms if isinstance(a, tuple) and "extra" in (str(a[0]), str(a[2]))]
    rest = [a for a in atoms if not (isinstance(a, tuple) and a in gates)]
    if len(gates) != 1 or any(a == "or" for a in rest) or str(gates[0][1]) != "==":
        raise LockError(
            f"{package.source.where}: {package.name} requires '{req}', whose extra marker "
            "imgbuild cannot split",
            hint="depend on a released version from an index",
        )
    gate = gates[0]
    extra = str(gate[2] if str(gate[0]) == "extra" else gate[0])
    text = " and ".join(_atom_text(a) for a in rest if a != "and")
    return (Marker(text) if text else None), canonicalize_name(extra)


def _atom_text(atom: object) -> str:
    if isinstance(atom, tuple):
        left, op, right = atom
        return f"{left.serialize()} {op.serialize()} {right.serialize()}"
    if isinstance(atom, list):
        return "(" + " ".join(_atom_text(a) for a in atom) + ")"
    return str(atom)

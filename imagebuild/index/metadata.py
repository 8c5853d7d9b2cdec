"""Core metadata (``METADATA``) -> ``DistMetadata``, from a metadata file or a wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

from packaging.metadata import parse_email
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.errors import PackageIndexError
from imagebuild.index.model import DistMetadata, IndexFile
from imagebuild.net.transfer import one_line as _one_line


def parse_metadata(data: bytes, file: IndexFile) -> DistMetadata:
    """Core metadata bytes -> ``DistMetadata``, checked against the file's name and version."""
    where = f"{file.kind} {file.filename}: metadata"
    hint = "this release's metadata is broken; exclude it or pin another version"
    raw, _unparsed = parse_email(data)
    name, version = raw.get("name"), raw.get("version")
    if not name or not version:
        raise PackageIndexError(f"{where} has no Name or Version", hint=hint)
    try:
        parsed_version = Version(version)
    except InvalidVersion as exc:
        raise PackageIndexError(f"{where}: invalid Version {version!r}", hint=hint) from exc
    if canonicalize_name(name) != file.name or parsed_version != file.version:
        raise PackageIndexError(
            f"{where} says {name} {version}, the file name says {file.name} {file.version}",
            hint=hint,
        )
    requires: list[Requirement] = []
    for line in raw.get("requires_dist", []):
        try:
            requires.append(Requirement(line))
        except InvalidRequirement as exc:
            raise PackageIndexError(
                f"{where}: invalid Requires-Dist {line!r} ({_one_line(exc)})", hint=hint
            ) from exc
    requires_python: SpecifierSet | None = None
    if raw.get("requires_python", "").strip():
        try:
            requires_python = SpecifierSet(raw["requires_python"])
        except InvalidSpecifier:
            requires_python = None  # as pip does: ignore an unreadable Requires-Python
    extras = dict.fromkeys(canonicalize_name(extra) for extra in raw.get("provides_extra", []))
    return DistMetadata(
        name=canonicalize_name(name),
        version=parsed_version,
        requires_dist=tuple(requires),
        requires_python=requires_python,
        provides_extra=tuple(extras),
    )


def wheel_metadata(path: Path, file: IndexFile) -> bytes:
    """The ``*.dist-info/METADATA`` of the wheel at ``path`` (the one named for the file)."""
    subject = f"wheel {file.filename}"
    try:
        with zipfile.ZipFile(path) as archive:
            candidates = []
            for member in archive.namelist():
                parts = member.split("/")
                if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
                    candidates.append(parts[0])
            wanted = [c for c in candidates if _dist_info_name(c) == file.name]
            chosen = wanted or candidates
            if len(chosen) != 1:
                raise PackageIndexError(
                    f"{subject}: expected one .dist-info/METADATA, found {len(chosen)}",
                    hint="the wheel is malformed; use another version",
                )
            return archive.read(f"{chosen[0]}/METADATA")
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        raise PackageIndexError(
            f"{subject}: cannot read it as a zip archive ({_one_line(exc)})",
            hint="the download was damaged or the wheel is malformed; retry later",
        ) from exc


def _dist_info_name(directory: str) -> NormalizedName:
    return canonicalize_name(directory.removesuffix(".dist-info").rpartition("-")[0])

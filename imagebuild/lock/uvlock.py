"""uv.lock -> ``Lock``: uv's own lock format (version 1), validated with dotted-path errors."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urljoin

from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import Version

from imagebuild.digest import Digest, parse_digest
from imagebuild.errors import LockError
from imagebuild.lock.model import (
    Dependency,
    Lock,
    LockedPackage,
    LockRequirement,
    PackageSource,
    SdistFile,
    SourceKind,
    UvProjectMetadata,
    WheelFile,
    file_url,
    sort_packages,
    url_filename,
)
from imagebuild.project.fields import Fields


def parse_uv_lock(data: Mapping[str, object], *, path: Path) -> Lock:
    """Validate decoded uv.lock data (``path`` is used for messages and relative paths)."""
    f = Fields(path.name, LockError)
    version = data.get("version")
    if version != 1:
        f.fail(
            "version",
            f"lock format version {version!r} is not supported (imgbuild reads version 1)",
            hint="re-lock with a uv release that writes version 1, or upgrade imgbuild",
        )
    revision = data.get("revision", 0)
    if not isinstance(revision, int):
        f.fail("revision", "must be an integer")
    requires_python = f.optional_specifier(data.get("requires-python"), "requires-python")
    environments = tuple(
        f.marker(m, f"supported-markers[{i}]")
        for i, m in enumerate(f.array(data.get("supported-markers", []), "supported-markers"))
    )
    raw_packages = f.array(data.get("package", []), "package")
    lock_dir = path.parent
    packages: list[LockedPackage] = []
    root: NormalizedName | None = None
    local_metadata: dict[NormalizedName, UvProjectMetadata] = {}
    for i, raw in enumerate(raw_packages):
        key = f"package[{i}]"
        table = f.table(raw, key)
        package = _uv_package(f, table, key, lock_dir)
        packages.append(package)
        if package.source.kind in ("editable", "virtual", "directory"):
            # Workspace members are judged by ``--locked`` as the root is.
            local_metadata[package.name] = _uv_metadata(
                f, table.get("metadata", {}), f"{key}.metadata"
            )
            if posixpath.normpath(package.source.location) == ".":
                root = package.name

    return Lock(
        kind="uv",
        path=path,
        requires_python=requires_python,
        root=root,
        packages=sort_packages(packages),
        revision=revision,
        root_metadata=local_metadata.get(root) if root is not None else None,
        local_metadata=dict(sorted(local_metadata.items())),
        manifest=_uv_manifest(f, data.get("manifest", {})),
        environments=environments,
    )


def _uv_manifest(f: Fields, raw: object) -> dict[str, tuple[LockRequirement, ...]]:
    """``[manifest]``: requirement lists uv records beside the root (constraints …)."""
    manifest: dict[str, tuple[LockRequirement, ...]] = {}
    raw_manifest = f.table(raw, "manifest")
    for name in ("constraints", "overrides", "build-constraints", "requirements"):
        if name in raw_manifest:
            manifest[name] = _lock_requirements(f, raw_manifest[name], f"manifest.{name}")
    if "members" in raw_manifest:
        members = f.array(raw_manifest["members"], "manifest.members")
        manifest["members"] = tuple(
            LockRequirement(name=canonicalize_name(str(m))) for m in sorted(map(str, members))
        )
    return manifest


def _uv_source(f: Fields, raw: object, key: str) -> PackageSource:
    table = f.table(raw, key)
    kinds = [
        k
        for k in ("registry", "git", "url", "path", "directory", "editable", "virtual")
        if k in table
    ]
    if len(kinds) != 1:
        f.fail(key, f"expected exactly one source kind, found {sorted(table) or 'none'}")
    kind = cast(SourceKind, kinds[0])
    location = table[kind]
    if not isinstance(location, str):
        f.fail(f"{key}.{kind}", "must be a string")
    subdirectory = table.get("subdirectory")
    if subdirectory is not None and not isinstance(subdirectory, str):
        f.fail(f"{key}.subdirectory", "must be a string")
    return PackageSource(kind=kind, location=location, subdirectory=subdirectory)


def _uv_package(f: Fields, table: Mapping[str, object], key: str, lock_dir: Path) -> LockedPackage:
    name = f.name(table.get("name"), f"{key}.name")
    version = f.optional_version(table.get("version"), f"{key}.version")
    if "source" not in table:
        f.fail(f"{key}.source", "missing")
    source = _uv_source(f, table["source"], f"{key}.source")
    label = f"{name} {version}" if version is not None else str(name)
    where = _Where(key=key, label=label, source=source, lock_dir=lock_dir)
    wheels = [
        _uv_wheel(f, raw, where.at(f"wheels[{j}]"), name, version)
        for j, raw in enumerate(f.array(table.get("wheels", []), f"{key}.wheels"))
    ]
    sdist = _uv_sdist(f, table["sdist"], where.at("sdist")) if "sdist" in table else None
    dev_key = "dev-dependencies" if "dev-dependencies" in table else "dependency-groups"
    resolution_markers = tuple(
        f.marker(m, f"{key}.resolution-markers[{n}]")
        for n, m in enumerate(
            f.array(table.get("resolution-markers", []), f"{key}.resolution-markers")
        )
    )
    return LockedPackage(
        name=name,
        version=version,
        source=source,
        wheels=tuple(sorted(wheels, key=lambda w: w.filename)),
        sdist=sdist,
        dependencies=_uv_edges(f, table.get("dependencies", []), f"{key}.dependencies"),
        optional_dependencies=_uv_edge_table(f, table, "optional-dependencies", key),
        dependency_groups=_uv_edge_table(f, table, dev_key, key),
        resolution_markers=resolution_markers,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Where:
    """A wheel or sdist entry's context: its key, its package and where files resolve."""

    key: str
    label: str
    source: PackageSource
    lock_dir: Path

    def at(self, child: str) -> _Where:
        return _Where(
            key=f"{self.key}.{child}", label=self.label, source=self.source, lock_dir=self.lock_dir
        )


def _uv_wheel(
    f: Fields, raw: object, where: _Where, name: NormalizedName, version: Version | None
) -> WheelFile:
    wkey = where.key
    wtable = f.table(raw, wkey)
    filename, url = _uv_artifact_location(f, wtable, where)
    try:
        wname, wversion, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        f.fail(wkey, f"invalid wheel filename {filename!r}")
    if wname != name:
        f.fail(wkey, f"wheel {filename} does not belong to package {name}")
    if version is not None and Version(wversion.public) != Version(version.public):
        f.fail(wkey, f"wheel {filename} does not match version {version}")
    return WheelFile(
        filename=filename,
        url=url,
        sha256=_uv_wheel_hash(f, wtable, wkey, where.label),
        size=f.optional_size(wtable.get("size"), f"{wkey}.size"),
        upload_time=f.optional_string(wtable.get("upload-time"), f"{wkey}.upload-time"),
    )


def _uv_sdist(f: Fields, raw: object, where: _Where) -> SdistFile:
    key = where.key
    stable = f.table(raw, key)
    filename, url = _uv_artifact_location(f, stable, where)
    return SdistFile(
        filename=filename,
        url=url,
        sha256=_uv_hash(f, stable, key, where.label),
        size=f.optional_size(stable.get("size"), f"{key}.size"),
        upload_time=f.optional_string(stable.get("upload-time"), f"{key}.upload-time"),
    )


def _uv_edges(f: Fields, raw: object, key: str) -> tuple[Dependency, ...]:
    return tuple(_uv_dependency(f, item, f"{key}[{n}]") for n, item in enumerate(f.array(raw, key)))


def _uv_edge_table(
    f: Fields, table: Mapping[str, object], name: str, key: str
) -> dict[NormalizedName, tuple[Dependency, ...]]:
    """``optional-dependencies`` / ``dev-dependencies``: name -> edges, sorted by name."""
    edges = {
        canonicalize_name(label): _uv_edges(f, deps, f"{key}.{name}.{label}")
        for label, deps in f.table(table.get(name, {}), f"{key}.{name}").items()
    }
    return dict(sorted(edges.items()))


def _uv_artifact_location(f: Fields, table: Mapping[str, object], where: _Where) -> tuple[str, str]:
    """(file name, absolute URL) of a wheel or sdist entry in uv.lock."""
    key, source, lock_dir = where.key, where.source, where.lock_dir
    if "url" in table:
        url = f.string(table["url"], f"{key}.url")
        return f.optional_string(table.get("filename"), f"{key}.filename") or url_filename(url), url
    if "path" in table:
        rel = f.string(table["path"], f"{key}.path")
        base = source.location if source.kind == "registry" and not _is_url(source.location) else ""
        return posixpath.basename(rel), file_url(lock_dir, posixpath.join(base, rel))
    if "filename" in table:
        filename = f.string(table["filename"], f"{key}.filename")
        if source.kind == "registry":
            if _is_url(source.location):
                return filename, urljoin(source.location.rstrip("/") + "/", filename)
            return filename, file_url(lock_dir, posixpath.join(source.location, filename))
        if source.kind == "path":
            return filename, file_url(lock_dir, source.location)
        if source.kind == "url":
            return filename, source.location
        f.fail(key, f"cannot locate {filename} for a {source.kind} source")
    if source.kind in ("url", "path"):
        # A direct archive's sdist (uv writes only its hash): the source is the file.
        location = source.location if source.kind == "url" else file_url(lock_dir, source.location)
        return url_filename(source.location), location
    f.fail(key, "needs 'url', 'path' or 'filename'")


def _uv_hash(f: Fields, table: Mapping[str, object], key: str, label: str) -> Digest | None:
    raw = table.get("hash")
    if raw is None:
        return None
    text = f.string(raw, f"{key}.hash")
    try:
        # uv spells hashes "sha256:<hex>"; a bare "<hex>" is not something it writes.
        return parse_digest(text if ":" in text else f"unknown:{text}", bare_hex=True)
    except ValueError:
        f.fail(
            f"{key}.hash",
            f"package {label}: unsupported hash {text!r} (imgbuild needs sha256)",
            hint="re-lock with uv's default hash algorithm (sha256)",
        )


def _uv_wheel_hash(f: Fields, table: Mapping[str, object], key: str, label: str) -> Digest:
    digest = _uv_hash(f, table, key, label)
    if digest is None:
        f.fail(
            f"{key}.hash",
            f"package {label}: wheel has no hash",
            hint="re-lock with 'uv lock' so every wheel is pinned by hash",
        )
    return digest


def _uv_dependency(f: Fields, raw: object, key: str) -> Dependency:
    table = f.table(raw, key)
    extras = f.array(table.get("extra", []), f"{key}.extra")
    source = _uv_source(f, table["source"], f"{key}.source") if "source" in table else None
    return Dependency(
        name=f.name(table.get("name"), f"{key}.name"),
        extras=tuple(sorted(canonicalize_name(str(e)) for e in extras)),
        marker=f.marker(table["marker"], f"{key}.marker") if "marker" in table else None,
        version=f.optional_version(table.get("version"), f"{key}.version"),
        source=source,
    )


def _uv_metadata(f: Fields, raw: object, key: str) -> UvProjectMetadata:
    table = f.table(raw, key)
    requires_dist = _lock_requirements(f, table.get("requires-dist", []), f"{key}.requires-dist")
    provides = f.array(table.get("provides-extras", []), f"{key}.provides-extras")
    dev_key = "requires-dev" if "requires-dev" in table else "dependency-groups"
    requires_dev = {
        canonicalize_name(group): _lock_requirements(f, reqs, f"{key}.{dev_key}.{group}")
        for group, reqs in f.table(table.get(dev_key, {}), f"{key}.{dev_key}").items()
    }
    return UvProjectMetadata(
        requires_dist=requires_dist,
        provides_extras=tuple(canonicalize_name(str(e)) for e in provides),
        requires_dev=dict(sorted(requires_dev.items())),
    )


def _lock_requirements(f: Fields, raw: object, key: str) -> tuple[LockRequirement, ...]:
    out: list[LockRequirement] = []
    for i, item in enumerate(f.array(raw, key)):
        ikey = f"{key}[{i}]"
        table = f.table(item, ikey)
        extras = f.array(table.get("extras", []), f"{ikey}.extras")
        marker = f.optional_string(table.get("marker"), f"{ikey}.marker")
        source = tuple(
            sorted(
                (k, str(v))
                for k, v in table.items()
                if k not in ("name", "specifier", "extras", "marker")
            )
        )
        out.append(
            LockRequirement(
                name=f.name(table.get("name"), f"{ikey}.name"),
                extras=tuple(sorted(canonicalize_name(str(e)) for e in extras)),
                specifier=f.optional_string(table.get("specifier"), f"{ikey}.specifier") or "",
                marker=marker,
                source=source,
            )
        )
    return tuple(out)


def _is_url(text: str) -> bool:
    return "://" in text

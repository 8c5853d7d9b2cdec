"""Lock values: read uv.lock and pylock.toml, select what to install, check staleness."""

from __future__ import annotations

import itertools
import posixpath
import re
import tomllib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NoReturn, cast
from urllib.parse import unquote, urljoin, urlsplit

from packaging.markers import InvalidMarker, Marker
from packaging.pylock import (
    Package,
    PackageArchive,
    PackageSdist,
    PackageWheel,
    Pylock,
    PylockValidationError,
    is_valid_pylock_path,
)
from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, Specifier, SpecifierSet
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from imagebuild.digest import Digest
from imagebuild.errors import LockError
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.platform import TargetPlatform

"""A content digest, always spelled ``sha256:<64 lowercase hex>``."""

SourceKind = Literal["registry", "directory", "editable", "virtual", "path", "url", "git"]
LockKind = Literal["uv", "pylock"]

UV_LOCK = "uv.lock"
PYLOCK = "pylock.toml"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RELOCK_HINT = "run 'uv lock' (or drop --locked)"


# --------------------------------------------------------------------------------------
# Values


def parse_sha256(hex_or_digest: str) -> Digest:
    """Normalise ``<hex>`` or ``sha256:<hex>`` to a ``Digest``; ``ValueError`` if malformed."""
    algorithm, sep, value = hex_or_digest.partition(":")
    if not sep:
        algorithm, value = "sha256", hex_or_digest
    value = value.lower()
    if algorithm.lower() != "sha256" or not _HEX64.match(value):
        raise ValueError(f"not a sha256 digest: {hex_or_digest!r}")
    return Digest(f"sha256:{value}")


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

    @property
    def filename(self) -> str:
        """The lock's file name, for messages."""
        return self.path.name


def _sort_packages(packages: Iterable[LockedPackage]) -> tuple[LockedPackage, ...]:
    def key(p: LockedPackage) -> tuple[str, int, Version, str]:
        return (p.name, p.version is not None, p.version or Version("0"), p.source.location)

    return tuple(sorted(packages, key=key))


# --------------------------------------------------------------------------------------
# Loading


def find_lock(project_dir: Path) -> Path | None:
    """The lock file next to the project: ``pylock.toml`` first, then ``uv.lock``."""
    for name in (PYLOCK, UV_LOCK):
        candidate = project_dir / name
        if candidate.is_file():
            return candidate
    return None


def load_lock(path: Path) -> Lock:
    """Read ``uv.lock`` or a ``pylock[.name].toml`` into a ``Lock``; ``LockError`` if invalid."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LockError(f"{path}: no such lock file", hint="run 'uv lock' to create one") from None
    except OSError as exc:
        raise LockError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise LockError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{path}: invalid TOML: {exc}") from exc
    if path.name == UV_LOCK or ("package" in data and "lock-version" not in data):
        return parse_uv_lock(data, path=path)
    if is_valid_pylock_path(path) or "lock-version" in data:
        return parse_pylock(data, path=path)
    raise LockError(
        f"{path}: not a lock file imgbuild knows",
        hint="use uv.lock or pylock.toml (PEP 751)",
    )


class _Fail:
    """Raises ``LockError`` lines that name the file and the dotted key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, key: str, message: str, *, hint: str | None = None) -> NoReturn:
        where = f"{self.path.name}: {key}: " if key else f"{self.path.name}: "
        raise LockError(where + message, hint=hint)


def _file_url(lock_dir: Path, relative: str) -> str:
    return (lock_dir / relative).resolve().as_uri()


def _url_filename(url: str) -> str:
    return unquote(posixpath.basename(urlsplit(url).path))


def _is_url(text: str) -> bool:
    return "://" in text


# -- uv.lock ---------------------------------------------------------------------------


def parse_uv_lock(data: Mapping[str, object], *, path: Path) -> Lock:
    """Validate decoded uv.lock data (``path`` is used for messages and relative paths)."""
    fail = _Fail(path)
    version = data.get("version")
    if version != 1:
        fail(
            "version",
            f"lock format version {version!r} is not supported (imgbuild reads version 1)",
            hint="re-lock with a uv release that writes version 1, or upgrade imgbuild",
        )
    revision = data.get("revision", 0)
    if not isinstance(revision, int):
        fail("revision", "must be an integer")
    requires_python = _spec_or_none(fail, data.get("requires-python"), "requires-python")
    environments = tuple(
        _marker(fail, m, f"supported-markers[{i}]")
        for i, m in enumerate(_list(fail, data.get("supported-markers", []), "supported-markers"))
    )
    raw_packages = _list(fail, data.get("package", []), "package")
    lock_dir = path.parent
    packages: list[LockedPackage] = []
    root: NormalizedName | None = None
    root_metadata: UvProjectMetadata | None = None
    for i, raw in enumerate(raw_packages):
        key = f"package[{i}]"
        table = _table(fail, raw, key)
        package = _uv_package(fail, table, key, lock_dir)
        packages.append(package)
        if package.source.kind in ("editable", "virtual", "directory") and (
            posixpath.normpath(package.source.location) == "."
        ):
            root = package.name
            root_metadata = _uv_metadata(fail, table.get("metadata", {}), f"{key}.metadata")

    manifest: dict[str, tuple[LockRequirement, ...]] = {}
    raw_manifest = _table(fail, data.get("manifest", {}), "manifest")
    for name in ("constraints", "overrides", "build-constraints", "requirements"):
        if name in raw_manifest:
            manifest[name] = _lock_requirements(fail, raw_manifest[name], f"manifest.{name}")
    if "members" in raw_manifest:
        members = _list(fail, raw_manifest["members"], "manifest.members")
        manifest["members"] = tuple(
            LockRequirement(name=canonicalize_name(str(m))) for m in sorted(map(str, members))
        )
    return Lock(
        kind="uv",
        path=path,
        requires_python=requires_python,
        root=root,
        packages=_sort_packages(packages),
        revision=revision,
        root_metadata=root_metadata,
        manifest=manifest,
        environments=environments,
    )


def _uv_source(fail: _Fail, raw: object, key: str) -> PackageSource:
    table = _table(fail, raw, key)
    kinds = [
        k
        for k in ("registry", "git", "url", "path", "directory", "editable", "virtual")
        if k in table
    ]
    if len(kinds) != 1:
        fail(key, f"expected exactly one source kind, found {sorted(table) or 'none'}")
    kind = cast(SourceKind, kinds[0])
    location = table[kind]
    if not isinstance(location, str):
        fail(f"{key}.{kind}", "must be a string")
    subdirectory = table.get("subdirectory")
    if subdirectory is not None and not isinstance(subdirectory, str):
        fail(f"{key}.subdirectory", "must be a string")
    return PackageSource(kind=kind, location=location, subdirectory=subdirectory)


def _uv_package(
    fail: _Fail, table: Mapping[str, object], key: str, lock_dir: Path
) -> LockedPackage:
    name = _name(fail, table.get("name"), f"{key}.name")
    version = _version_or_none(fail, table.get("version"), f"{key}.version")
    if "source" not in table:
        fail(f"{key}.source", "missing")
    source = _uv_source(fail, table["source"], f"{key}.source")
    label = f"{name} {version}" if version is not None else str(name)

    wheels: list[WheelFile] = []
    for j, raw in enumerate(_list(fail, table.get("wheels", []), f"{key}.wheels")):
        wkey = f"{key}.wheels[{j}]"
        wtable = _table(fail, raw, wkey)
        filename, url = _uv_artifact_location(fail, wtable, wkey, source, lock_dir)
        try:
            wname, wversion, _, _ = parse_wheel_filename(filename)
        except InvalidWheelFilename:
            fail(wkey, f"invalid wheel filename {filename!r}")
        if wname != name:
            fail(wkey, f"wheel {filename} does not belong to package {name}")
        if version is not None and Version(wversion.public) != Version(version.public):
            fail(wkey, f"wheel {filename} does not match version {version}")
        wheels.append(
            WheelFile(
                filename=filename,
                url=url,
                sha256=_uv_wheel_hash(fail, wtable, wkey, label),
                size=_int_or_none(fail, wtable.get("size"), f"{wkey}.size"),
                upload_time=_str_or_none(fail, wtable.get("upload-time"), f"{wkey}.upload-time"),
            )
        )

    sdist: SdistFile | None = None
    if "sdist" in table:
        stable = _table(fail, table["sdist"], f"{key}.sdist")
        filename, url = _uv_artifact_location(fail, stable, f"{key}.sdist", source, lock_dir)
        digest = _uv_hash(fail, stable, f"{key}.sdist", label)
        sdist = SdistFile(
            filename=filename,
            url=url,
            sha256=digest,
            size=_int_or_none(fail, stable.get("size"), f"{key}.sdist.size"),
            upload_time=_str_or_none(fail, stable.get("upload-time"), f"{key}.sdist.upload-time"),
        )

    def edges(raw: object, ekey: str) -> tuple[Dependency, ...]:
        return tuple(
            _uv_dependency(fail, item, f"{ekey}[{n}]")
            for n, item in enumerate(_list(fail, raw, ekey))
        )

    optional = {
        canonicalize_name(extra): edges(deps, f"{key}.optional-dependencies.{extra}")
        for extra, deps in _table(
            fail, table.get("optional-dependencies", {}), f"{key}.optional-dependencies"
        ).items()
    }
    dev_key = "dev-dependencies" if "dev-dependencies" in table else "dependency-groups"
    groups = {
        canonicalize_name(group): edges(deps, f"{key}.{dev_key}.{group}")
        for group, deps in _table(fail, table.get(dev_key, {}), f"{key}.{dev_key}").items()
    }
    resolution_markers = tuple(
        _marker(fail, m, f"{key}.resolution-markers[{n}]")
        for n, m in enumerate(
            _list(fail, table.get("resolution-markers", []), f"{key}.resolution-markers")
        )
    )
    return LockedPackage(
        name=name,
        version=version,
        source=source,
        wheels=tuple(sorted(wheels, key=lambda w: w.filename)),
        sdist=sdist,
        dependencies=edges(table.get("dependencies", []), f"{key}.dependencies"),
        optional_dependencies=dict(sorted(optional.items())),
        dependency_groups=dict(sorted(groups.items())),
        resolution_markers=resolution_markers,
    )


def _uv_artifact_location(
    fail: _Fail,
    table: Mapping[str, object],
    key: str,
    source: PackageSource,
    lock_dir: Path,
) -> tuple[str, str]:
    """(file name, absolute URL) of a wheel or sdist entry in uv.lock."""
    if "url" in table:
        url = _str(fail, table["url"], f"{key}.url")
        return _str_or_none(fail, table.get("filename"), f"{key}.filename") or _url_filename(
            url
        ), url
    if "path" in table:
        rel = _str(fail, table["path"], f"{key}.path")
        base = source.location if source.kind == "registry" and not _is_url(source.location) else ""
        return posixpath.basename(rel), _file_url(lock_dir, posixpath.join(base, rel))
    if "filename" in table:
        filename = _str(fail, table["filename"], f"{key}.filename")
        if source.kind == "registry":
            if _is_url(source.location):
                return filename, urljoin(source.location.rstrip("/") + "/", filename)
            return filename, _file_url(lock_dir, posixpath.join(source.location, filename))
        if source.kind == "path":
            return filename, _file_url(lock_dir, source.location)
        if source.kind == "url":
            return filename, source.location
        fail(key, f"cannot locate {filename} for a {source.kind} source")
    fail(key, "needs 'url', 'path' or 'filename'")


def _uv_hash(fail: _Fail, table: Mapping[str, object], key: str, label: str) -> Digest | None:
    raw = table.get("hash")
    if raw is None:
        return None
    text = _str(fail, raw, f"{key}.hash")
    try:
        # uv spells hashes "sha256:<hex>"; a bare "<hex>" is not something it writes.
        return parse_sha256(text if ":" in text else f"unknown:{text}")
    except ValueError:
        fail(
            f"{key}.hash",
            f"package {label}: unsupported hash {text!r} (imgbuild needs sha256)",
            hint="re-lock with uv's default hash algorithm (sha256)",
        )


def _uv_wheel_hash(fail: _Fail, table: Mapping[str, object], key: str, label: str) -> Digest:
    digest = _uv_hash(fail, table, key, label)
    if digest is None:
        fail(
            f"{key}.hash",
            f"package {label}: wheel has no hash",
            hint="re-lock with 'uv lock' so every wheel is pinned by hash",
        )
    return digest


def _uv_dependency(fail: _Fail, raw: object, key: str) -> Dependency:
    table = _table(fail, raw, key)
    extras = _list(fail, table.get("extra", []), f"{key}.extra")
    source = _uv_source(fail, table["source"], f"{key}.source") if "source" in table else None
    return Dependency(
        name=_name(fail, table.get("name"), f"{key}.name"),
        extras=tuple(sorted(canonicalize_name(str(e)) for e in extras)),
        marker=_marker(fail, table["marker"], f"{key}.marker") if "marker" in table else None,
        version=_version_or_none(fail, table.get("version"), f"{key}.version"),
        source=source,
    )


def _uv_metadata(fail: _Fail, raw: object, key: str) -> UvProjectMetadata:
    table = _table(fail, raw, key)
    requires_dist = _lock_requirements(fail, table.get("requires-dist", []), f"{key}.requires-dist")
    provides = _list(fail, table.get("provides-extras", []), f"{key}.provides-extras")
    dev_key = "requires-dev" if "requires-dev" in table else "dependency-groups"
    requires_dev = {
        canonicalize_name(group): _lock_requirements(fail, reqs, f"{key}.{dev_key}.{group}")
        for group, reqs in _table(fail, table.get(dev_key, {}), f"{key}.{dev_key}").items()
    }
    return UvProjectMetadata(
        requires_dist=requires_dist,
        provides_extras=tuple(canonicalize_name(str(e)) for e in provides),
        requires_dev=dict(sorted(requires_dev.items())),
    )


def _lock_requirements(fail: _Fail, raw: object, key: str) -> tuple[LockRequirement, ...]:
    out: list[LockRequirement] = []
    for i, item in enumerate(_list(fail, raw, key)):
        ikey = f"{key}[{i}]"
        table = _table(fail, item, ikey)
        extras = _list(fail, table.get("extras", []), f"{ikey}.extras")
        marker = _str_or_none(fail, table.get("marker"), f"{ikey}.marker")
        source = tuple(
            sorted(
                (k, str(v))
                for k, v in table.items()
                if k not in ("name", "specifier", "extras", "marker")
            )
        )
        out.append(
            LockRequirement(
                name=_name(fail, table.get("name"), f"{ikey}.name"),
                extras=tuple(sorted(canonicalize_name(str(e)) for e in extras)),
                specifier=_str_or_none(fail, table.get("specifier"), f"{ikey}.specifier") or "",
                marker=marker,
                source=source,
            )
        )
    return tuple(out)


# -- pylock.toml -----------------------------------------------------------------------


def parse_pylock(data: Mapping[str, object], *, path: Path) -> Lock:
    """Validate decoded PEP 751 data with ``packaging.pylock`` and convert it."""
    fail = _Fail(path)
    try:
        pylock = Pylock.from_dict(data)
    except PylockValidationError as exc:
        fail(exc.context or "", exc.message[:1].lower() + exc.message[1:])
    lock_dir = path.parent
    packages: list[LockedPackage] = []
    root: NormalizedName | None = None
    for i, package in enumerate(pylock.packages):
        converted = _pylock_package(fail, package, f"packages[{i}]", lock_dir)
        packages.append(converted)
        if converted.source.kind in ("directory", "editable") and (
            posixpath.normpath(converted.source.location) == "."
        ):
            root = converted.name
    return Lock(
        kind="pylock",
        path=path,
        requires_python=pylock.requires_python,
        root=root,
        packages=_sort_packages(packages),
        environments=tuple(pylock.environments or ()),
        extras=tuple(pylock.extras) if pylock.extras is not None else None,
        dependency_groups=(
            tuple(pylock.dependency_groups) if pylock.dependency_groups is not None else None
        ),
        default_groups=tuple(pylock.default_groups or ()),
    )


def _pylock_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def _pylock_location(
    fail: _Fail, key: str, url: str | None, path: str | None, lock_dir: Path
) -> str:
    # PEP 751: fetch from path when given, else from url.
    if path is not None:
        return (
            Path(path).resolve().as_uri() if Path(path).is_absolute() else _file_url(lock_dir, path)
        )
    if url is not None:
        return url
    fail(key, "needs 'url' or 'path'")


def _pylock_digest(fail: _Fail, hashes: Mapping[str, str], key: str, label: str) -> Digest:
    if "sha256" not in hashes:
        fail(
            f"{key}.hashes",
            f"package {label}: no sha256 hash (has {', '.join(sorted(hashes))})",
            hint="regenerate the lock with sha256 hashes",
        )
    try:
        return parse_sha256(hashes["sha256"])
    except ValueError:
        fail(f"{key}.hashes.sha256", f"package {label}: malformed sha256 {hashes['sha256']!r}")


def _pylock_wheel(
    fail: _Fail,
    wheel: PackageWheel | PackageArchive,
    filename: str,
    key: str,
    label: str,
    lock_dir: Path,
) -> WheelFile:
    return WheelFile(
        filename=filename,
        url=_pylock_location(fail, key, wheel.url, wheel.path, lock_dir),
        sha256=_pylock_digest(fail, wheel.hashes, key, label),
        size=wheel.size,
        upload_time=_pylock_time(wheel.upload_time),
    )


def _pylock_package(fail: _Fail, package: Package, key: str, lock_dir: Path) -> LockedPackage:
    label = f"{package.name} {package.version}" if package.version else str(package.name)
    wheels: list[WheelFile] = []
    if package.vcs is not None:
        vcs = package.vcs
        location = f"{vcs.url or vcs.path}@{vcs.commit_id}"
        source = PackageSource(kind="git", location=location, subdirectory=vcs.subdirectory)
    elif package.directory is not None:
        kind: SourceKind = "editable" if package.directory.editable else "directory"
        source = PackageSource(
            kind=kind, location=package.directory.path, subdirectory=package.directory.subdirectory
        )
    elif package.archive is not None:
        archive = package.archive
        location = archive.url or archive.path or ""
        source = PackageSource(
            kind="url" if archive.url else "path",
            location=location,
            subdirectory=archive.subdirectory,
        )
        filename = _url_filename(location)
        if filename.endswith(".whl") and not archive.subdirectory:
            wheels.append(_pylock_wheel(fail, archive, filename, f"{key}.archive", label, lock_dir))
    else:
        source = PackageSource(kind="registry", location=package.index or "")
        for j, wheel in enumerate(package.wheels or ()):
            wheels.append(
                _pylock_wheel(fail, wheel, wheel.filename, f"{key}.wheels[{j}]", label, lock_dir)
            )
    sdist: SdistFile | None = None
    if package.sdist is not None:
        s: PackageSdist = package.sdist
        sdist = SdistFile(
            filename=s.filename,
            url=_pylock_location(fail, f"{key}.sdist", s.url, s.path, lock_dir),
            sha256=_pylock_digest(fail, s.hashes, f"{key}.sdist", label),
            size=s.size,
            upload_time=_pylock_time(s.upload_time),
        )
    return LockedPackage(
        name=package.name,
        version=package.version,
        source=source,
        wheels=tuple(sorted(wheels, key=lambda w: w.filename)),
        sdist=sdist,
        marker=package.marker,
        requires_python=package.requires_python,
    )


# -- small typed accessors ---------------------------------------------------------------


def _table(fail: _Fail, value: object, key: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        fail(key, "must be a table")
    return value


def _list(fail: _Fail, value: object, key: str) -> list[object]:
    if not isinstance(value, list):
        fail(key, "must be an array")
    return value


def _str(fail: _Fail, value: object, key: str) -> str:
    if not isinstance(value, str):
        fail(key, "must be a string")
    return value


def _str_or_none(fail: _Fail, value: object, key: str) -> str | None:
    return None if value is None else _str(fail, value, key)


def _int_or_none(fail: _Fail, value: object, key: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        fail(key, "must be a non-negative integer")
    return value


def _name(fail: _Fail, value: object, key: str) -> NormalizedName:
    if not isinstance(value, str) or not value:
        fail(key, "missing or not a string")
    return canonicalize_name(value)


def _version_or_none(fail: _Fail, value: object, key: str) -> Version | None:
    if value is None:
        return None
    try:
        return Version(_str(fail, value, key))
    except InvalidVersion:
        fail(key, f"invalid version {value!r}")


def _spec_or_none(fail: _Fail, value: object, key: str) -> SpecifierSet | None:
    if value is None:
        return None
    try:
        return SpecifierSet(_str(fail, value, key))
    except InvalidSpecifier:
        fail(key, f"invalid specifier {value!r}")


def _marker(fail: _Fail, value: object, key: str) -> Marker:
    try:
        return Marker(_str(fail, value, key))
    except InvalidMarker:
        fail(key, f"invalid marker {value!r}")


# --------------------------------------------------------------------------------------
# Selection


def select_packages(
    lock: Lock,
    *,
    root: str | None = None,
    target: TargetPlatform,
    extras: Collection[str] = frozenset(),
    groups: Collection[str] = frozenset(),
) -> tuple[LockedPackage, ...]:
    """The packages to install for ``target``: never the root project, never virtual ones.

    uv.lock: walk the graph from ``root`` (default ``lock.root``) through its dependencies,
    the requested extras' optional dependencies and the requested groups, following edges
    whose markers hold on the target. pylock.toml: evaluate each entry's marker with
    ``extras``/``dependency_groups`` set. Every selected package must be installable: from a
    wheel the lock lists, its sdist, or a local directory; otherwise ``LockError`` says which
    and how to fix it.
    """
    env = target.marker_environment()
    full = env["python_full_version"]
    if lock.requires_python is not None and not lock.requires_python.contains(
        full, prereleases=True
    ):
        raise LockError(
            f"{lock.filename} requires Python {lock.requires_python} but the target is {full}",
            hint="use a base image with a Python the lock supports",
        )
    root_name = canonicalize_name(root) if root is not None else lock.root
    if lock.kind == "uv":
        chosen = _select_uv(lock, root_name, env, extras, groups)
    else:
        chosen = _select_pylock(lock, root_name, env, extras, groups)
    for package in chosen:
        _check_installable(lock, package)
    return _sort_packages(chosen)


def _check_installable(lock: Lock, package: LockedPackage) -> None:
    """Wheels install as they are; local directories (workspace members, path sources) and
    sdists are built into wheels at image build time; anything else is refused here.
    """
    where = f"{lock.filename}: package {package.describe()}"
    if package.wheels or package.sdist is not None:
        return
    source = package.source
    if source.kind in ("directory", "editable"):
        return
    if source.kind == "git":
        raise LockError(
            f"{where} comes from {source.describe()}, which imgbuild cannot install",
            hint="depend on a released version from an index instead",
        )
    raise LockError(
        f"{where} ({source.describe()}) lists no wheel to install",
        hint="re-lock so the package is pinned to a wheel",
    )


def _select_uv(
    lock: Lock,
    root: NormalizedName | None,
    env: Mapping[str, str],
    extras: Collection[str],
    groups: Collection[str],
) -> list[LockedPackage]:
    if lock.environments and not any(m.evaluate(dict(env)) for m in lock.environments):
        shown = " | ".join(str(m) for m in lock.environments)
        raise LockError(
            f"{lock.filename}: the target is outside the lock's supported environments ({shown})",
            hint="add the image's platform to [tool.uv] environments and run 'uv lock'",
        )
    by_name: dict[NormalizedName, list[LockedPackage]] = {}
    for package in lock.packages:
        by_name.setdefault(package.name, []).append(package)
    if root is None:
        raise LockError(
            f"{lock.filename} has no project package at its own directory",
            hint="run imgbuild in the directory that holds the uv.lock",
        )
    roots = by_name.get(root, [])
    local_roots = [p for p in roots if p.source.kind in ("editable", "virtual", "directory")]
    roots = local_roots or roots
    if len(roots) != 1:
        raise LockError(
            f"{lock.filename} has {'no' if not roots else 'several'} package {root!r} to start from",
            hint=_RELOCK_HINT,
        )
    root_package = roots[0]

    want_extras = {canonicalize_name(e) for e in extras}
    unknown = sorted(want_extras - set(root_package.optional_dependencies))
    if unknown:
        known = ", ".join(root_package.optional_dependencies) or "none"
        raise LockError(
            f"{lock.filename}: {root} has no extra {unknown[0]!r} (extras: {known})",
            hint="check the extra's name, or run 'uv lock' after adding it",
        )
    want_groups = {canonicalize_name(g) for g in groups}
    unknown = sorted(want_groups - set(root_package.dependency_groups))
    if unknown:
        known = ", ".join(root_package.dependency_groups) or "none"
        raise LockError(
            f"{lock.filename}: {root} has no dependency group {unknown[0]!r} (groups: {known})",
            hint="check the group's name, or run 'uv lock' after adding it",
        )

    def resolve(dep: Dependency, parent: LockedPackage) -> LockedPackage:
        candidates = by_name.get(dep.name, [])
        if dep.version is not None:
            candidates = [p for p in candidates if p.version == dep.version]
        if dep.source is not None:
            candidates = [p for p in candidates if p.source == dep.source]
        if len(candidates) > 1:
            # A forked resolution: keep the versions whose fork includes the target.
            candidates = [
                p
                for p in candidates
                if not p.resolution_markers
                or any(m.evaluate(dict(env)) for m in p.resolution_markers)
            ]
        if len(candidates) == 1:
            return candidates[0]
        what = "no entry" if not candidates else "several entries"
        wanted = f"{dep.name} {dep.version}" if dep.version is not None else str(dep.name)
        raise LockError(
            f"{lock.filename}: {parent.describe()} depends on {wanted}, but the lock has {what} "
            "for it on this target",
            hint=_RELOCK_HINT,
        )

    def key(p: LockedPackage) -> tuple[str, str, str, str]:
        return (p.name, str(p.version), p.source.kind, p.source.location)

    seen: dict[tuple[str, str, str, str], LockedPackage] = {}
    activated: dict[tuple[str, str, str, str], set[NormalizedName]] = {}
    work: list[tuple[LockedPackage, set[NormalizedName], bool]] = [
        (root_package, want_extras, True)
    ]
    while work:
        package, new_extras, is_root = work.pop()
        k = key(package)
        first_visit = k not in seen
        seen[k] = package
        done = activated.setdefault(k, set())
        pending = (new_extras - done) if not first_visit else set(new_extras)
        done |= pending
        edges: list[tuple[Dependency, str]] = []
        if first_visit:
            edges += [(d, "") for d in package.dependencies]
            if is_root:
                for group in sorted(want_groups):
                    edges += [(d, "") for d in package.dependency_groups[group]]
        for extra in sorted(pending):
            edges += [(d, extra) for d in package.optional_dependencies.get(extra, ())]
        for dep, edge_extra in edges:
            if dep.marker is not None and not dep.marker.evaluate({**env, "extra": edge_extra}):
                continue
            child = resolve(dep, package)
            child_key = key(child)
            if child_key not in seen or not set(dep.extras) <= activated.get(child_key, set()):
                work.append((child, set(dep.extras), False))
    return [p for p in seen.values() if p is not root_package and p.source.kind != "virtual"]


def _select_pylock(
    lock: Lock,
    root: NormalizedName | None,
    env: Mapping[str, str],
    extras: Collection[str],
    groups: Collection[str],
) -> list[LockedPackage]:
    if lock.environments and not any(m.evaluate(dict(env)) for m in lock.environments):
        shown = " | ".join(str(m) for m in lock.environments)
        raise LockError(
            f"{lock.filename}: the target matches none of the lock's environments ({shown})",
            hint="lock for the image's platform",
        )
    full = env["python_full_version"]
    lock_env: dict[str, str | frozenset[str]] = {
        **env,
        "extras": frozenset(canonicalize_name(e) for e in extras),
        "dependency_groups": frozenset(groups),
    }
    selected: dict[NormalizedName, LockedPackage] = {}
    for package in lock.packages:
        if package.marker is not None and not package.marker.evaluate(
            lock_env,
            context="lock_file",
        ):
            continue
        if package.requires_python is not None and not package.requires_python.contains(
            full, prereleases=True
        ):
            raise LockError(
                f"{lock.filename}: package {package.describe()} requires Python "
                f"{package.requires_python} but the target is {full}",
                hint="use a base image with a Python the lock supports",
            )
        if package.name in selected:
            raise LockError(
                f"{lock.filename}: two entries for {package.name} apply to the target "
                f"({selected[package.name].describe()} and {package.describe()})",
                hint="regenerate the lock so the entries' markers do not overlap",
            )
        selected[package.name] = package
    return [p for name, p in selected.items() if name != root]


# --------------------------------------------------------------------------------------
# Staleness (--locked)


def check_locked(lock: Lock, project: ProjectSpec) -> None:
    """Raise ``LockError`` if ``lock`` no longer records ``project``'s inputs.

    For uv.lock this compares what uv records for the root package (``requires-dist``,
    ``provides-extras``, ``requires-dev``), its version and virtual/editable kind, the
    ``[manifest]`` constraints and overrides, and ``requires-python`` with pyproject.toml,
    normalised the way uv normalises them (canonical names and extras, specifiers compared
    by version, markers compared by meaning within ``requires-python``, duplicates merged).
    Inputs the project declares dynamic cannot be read without a build and are skipped.
    A pylock.toml records no inputs; only its declared extras and groups are compared.
    """
    problem = (
        _uv_difference(lock, project) if lock.kind == "uv" else _pylock_difference(lock, project)
    )
    if problem is not None:
        raise LockError(
            f"{lock.filename} is out of date with pyproject.toml: {problem}",
            hint=_RELOCK_HINT if lock.kind == "uv" else "regenerate the lock (or drop --locked)",
        )


def _pylock_difference(lock: Lock, project: ProjectSpec) -> str | None:
    if lock.extras is not None:
        diff = _set_difference("extra", set(project.optional_dependencies), set(lock.extras))
        if diff:
            return diff
    if lock.dependency_groups is not None:
        in_lock = {canonicalize_name(g) for g in (*lock.dependency_groups, *lock.default_groups)}
        diff = _set_difference("dependency group", set(project.dependency_groups), in_lock)
        if diff:
            return diff
    return None


def _set_difference(what: str, project: Collection[str], lock: Collection[str]) -> str | None:
    added = sorted(set(project) - set(lock))
    if added:
        return f"{what} {_q(added[0])} was added"
    removed = sorted(set(lock) - set(project))
    if removed:
        return f"{what} {_q(removed[0])} was removed"
    return None


def _uv_difference(lock: Lock, project: ProjectSpec) -> str | None:
    roots = [
        p
        for p in lock.packages
        if p.name == project.name and p.source.kind in ("editable", "virtual", "directory")
    ]
    if not roots or lock.root != project.name or lock.root_metadata is None:
        return f"project {_q(project.name)} is not the locked project"
    root = roots[0]
    if project.version is not None and root.version != project.version:
        was = str(root.version) if root.version is not None else "dynamic"
        return f"project version changed from {_q(was)} to {_q(str(project.version))}"
    if project.version is None and "version" in project.dynamic and root.version is not None:
        return "project version is now dynamic"

    package_flag = project.tool_uv.get("package")
    packaged = package_flag if isinstance(package_flag, bool) else project.has_build_system
    if root.source.kind == "virtual" and packaged:
        return "project is now packaged (it was locked as virtual)"
    if root.source.kind == "editable" and not packaged:
        return "project is now virtual (it was locked as a package)"

    requires_python = project.requires_python
    if requires_python is not None and (
        lock.requires_python is None
        or not _specifiers_equivalent(requires_python, lock.requires_python)
    ):
        was = str(lock.requires_python) if lock.requires_python is not None else "unset"
        return f"requires-python changed from {_q(was)} to {_q(str(requires_python))}"
    domain = requires_python or lock.requires_python
    lowering = _Lowering(project)
    meta = lock.root_metadata

    dynamic = set(project.dynamic)
    if not dynamic & {"dependencies", "optional-dependencies"}:
        ours = [lowering.lower(r) for r in project.dependencies]
        for extra, reqs in project.optional_dependencies.items():
            ours += [lowering.lower(r, extra=extra) for r in reqs]
        diff = _compare_requirements("dependency", ours, list(meta.requires_dist), domain)
        if diff:
            return diff
    if "optional-dependencies" not in dynamic:
        diff = _set_difference(
            "extra", set(project.optional_dependencies), set(meta.provides_extras)
        )
        if diff:
            return diff

    diff = _set_difference(
        "dependency group", set(project.dependency_groups), set(meta.requires_dev)
    )
    if diff:
        return diff
    for group, reqs in project.dependency_groups.items():
        ours = [lowering.lower(r) for r in reqs]
        diff = _compare_requirements(
            f"dependency group {group!r}: dependency", ours, list(meta.requires_dev[group]), domain
        )
        if diff:
            return diff

    for manifest_key, tool_key, what in (
        ("constraints", "constraint-dependencies", "constraint"),
        ("overrides", "override-dependencies", "override"),
        ("build-constraints", "build-constraint-dependencies", "build constraint"),
    ):
        raw = project.tool_uv.get(tool_key, [])
        texts = [str(r) for r in raw] if isinstance(raw, list) else []
        ours = [lowering.lower(Requirement(t), lower_sources=False) for t in texts]
        diff = _compare_requirements(what, ours, list(lock.manifest.get(manifest_key, ())), domain)
        if diff:
            return diff
    return None


# -- requirement normalisation --------------------------------------------------------------

_WILDCARD_SOURCE = (("*", "*"),)


class _Lowering:
    """Turns pyproject requirements into uv's recorded form (``LockRequirement``)."""

    def __init__(self, project: ProjectSpec) -> None:
        raw_sources = project.tool_uv.get("sources", {})
        self.sources: Mapping[str, object] = raw_sources if isinstance(raw_sources, dict) else {}
        self.indexes: dict[str, str] = {}
        raw_indexes = project.tool_uv.get("index", [])
        for item in raw_indexes if isinstance(raw_indexes, list) else []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                self.indexes[str(item["name"])] = str(item.get("url", ""))
        self.root = project.root

    def lower(
        self, req: Requirement, *, extra: str | None = None, lower_sources: bool = True
    ) -> LockRequirement:
        marker = str(req.marker) if req.marker is not None else None
        if extra is not None:
            extra_marker = f"extra == '{extra}'"
            marker = f"({marker}) and {extra_marker}" if marker else extra_marker
        name = canonicalize_name(req.name)
        source: tuple[tuple[str, str], ...] = ()
        if req.url:
            source = _WILDCARD_SOURCE
        elif lower_sources:
            source = self._source(name)
        return LockRequirement(
            name=name,
            extras=tuple(sorted(canonicalize_name(e) for e in req.extras)),
            specifier=_uv_specifier_text(req.specifier),
            marker=marker,
            source=source,
        )

    def _source(self, name: NormalizedName) -> tuple[tuple[str, str], ...]:
        entry: object = None
        for key, value in self.sources.items():
            if canonicalize_name(key) == name:
                entry = value
        if entry is None:
            return ()
        if not isinstance(entry, dict):
            return _WILDCARD_SOURCE  # a list of marker-split sources: not compared
        index = entry.get("index")
        if isinstance(index, str):
            return (("index", self.indexes.get(index, index)),)
        if isinstance(entry.get("path"), str):
            path = posixpath.normpath(entry["path"])
            if entry.get("editable") is True:
                return (("editable", path),)
            kind = "directory" if (self.root / path).is_dir() else "path"
            return ((kind, path),)
        if isinstance(entry.get("url"), str):
            items = [("url", entry["url"])]
            if isinstance(entry.get("subdirectory"), str):
                items.append(("subdirectory", entry["subdirectory"]))
            return tuple(sorted(items))
        if isinstance(entry.get("git"), str):
            return (("git", entry["git"]),)
        return _WILDCARD_SOURCE


def _uv_specifier_text(specifiers: SpecifierSet) -> str:
    """Specifiers ordered by version, as uv writes them (``>=1.0,<3``)."""

    def key(spec: Specifier) -> tuple[int, Version, str]:
        text = spec.version.removesuffix(".*")
        return (
            (0, Version(text), spec.operator) if _valid_version(text) else (1, Version("0"), text)
        )

    return ",".join(str(s) for s in sorted(specifiers, key=key))


def _q(text: str) -> str:
    return f"'{text}'"


def _specifiers_equivalent(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether two specifier sets admit the same versions (uv stores requires-python as a
    range, so ``~=3.9`` and ``>=3.9, <4`` are the same to it).
    """
    candidates: set[str] = {"0", "3.0", "3.99", "99"}
    for spec in (*a, *b):
        text = spec.version.removesuffix(".*")
        if not _valid_version(text):
            return _spec_key(str(a)) == _spec_key(str(b))
        release = list(Version(text).release)
        for i in range(len(release) + 1):
            for delta in (-1, 0, 1):
                bumped = release[:i] + [max(release[i] + delta, 0)] if i < len(release) else release
                candidates |= {".".join(map(str, bumped)), ".".join(map(str, [*bumped, 99]))}
    return all(
        a.contains(v, prereleases=True) == b.contains(v, prereleases=True) for v in candidates
    )


def _version_key(text: str) -> str:
    """A version spelled so that uv-equal versions compare equal (1.0 == 1)."""
    try:
        v = Version(text)
    except InvalidVersion:
        return text
    release = list(v.release)
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    out = (f"{v.epoch}!" if v.epoch else "") + ".".join(map(str, release))
    if v.pre is not None:
        out += f"{v.pre[0]}{v.pre[1]}"
    if v.post is not None:
        out += f".post{v.post}"
    if v.dev is not None:
        out += f".dev{v.dev}"
    if v.local is not None:
        out += f"+{v.local}"
    return out


def _spec_key(text: str) -> frozenset[tuple[str, str]]:
    try:
        specs = SpecifierSet(text)
    except InvalidSpecifier:
        return frozenset({("raw", text)})
    out: set[tuple[str, str]] = set()
    for spec in specs:
        assert isinstance(spec, Specifier)
        if spec.operator == "===" or spec.version.endswith(".*"):
            out.add((spec.operator, spec.version))
        else:
            out.add((spec.operator, _version_key(spec.version)))
    return frozenset(out)


def _source_key(source: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in source:
        if k == "index":
            v = v.rstrip("/")
        elif k == "git":
            v = v.split("#", 1)[0].split("?", 1)[0]
        elif k in ("editable", "directory", "path"):
            v = posixpath.normpath(v)
        out.append((k, v))
    return tuple(sorted(out))


def _render(req: LockRequirement) -> str:
    text = req.name + (f"[{','.join(req.extras)}]" if req.extras else "")
    text += req.specifier
    if req.marker:
        text += f"; {_marker_text(req.marker)}"
    if req.source and req.source != _WILDCARD_SOURCE:
        text += " (" + ", ".join(f"{k} {v}" for k, v in req.source) + ")"
    return text


def _marker_text(marker: str) -> str:
    """A marker in packaging's spelling, so both sides of a message read alike."""
    try:
        return str(Marker(marker))
    except InvalidMarker:
        return marker


def _valid_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Group:
    name: NormalizedName
    extras: tuple[NormalizedName, ...]
    spec: frozenset[tuple[str, str]]
    source: tuple[tuple[str, str], ...]


def _group(reqs: Sequence[LockRequirement]) -> dict[_Group, list[LockRequirement]]:
    out: dict[_Group, list[LockRequirement]] = {}
    for req in reqs:
        source = _WILDCARD_SOURCE if req.source == _WILDCARD_SOURCE else _source_key(req.source)
        key = _Group(req.name, req.extras, _spec_key(req.specifier), source)
        out.setdefault(key, []).append(req)
    return out


def _compare_requirements(
    what: str,
    ours: Sequence[LockRequirement],
    theirs: Sequence[LockRequirement],
    requires_python: SpecifierSet | None,
) -> str | None:
    """Describe the first difference between two requirement lists, uv-style, or None."""
    mine, locked = _group(ours), _group(theirs)
    # Sources we cannot lower (workspace members, marker-split sources, direct URLs) match
    # whatever source uv recorded for the same name, extras and specifier.
    for key in [k for k in mine if k.source == _WILDCARD_SOURCE]:
        match = next(
            (
                other
                for other in locked
                if (other.name, other.extras, other.spec) == (key.name, key.extras, key.spec)
                and other not in mine
            ),
            None,
        )
        if match is not None:
            mine[match] = mine.pop(key)
    added = [k for k in mine if k not in locked]
    removed = [k for k in locked if k not in mine]
    changed = [
        k
        for k in mine
        if k in locked
        and not _markers_equivalent(
            [r.marker for r in mine[k]], [r.marker for r in locked[k]], requires_python
        )
    ]
    # A changed specifier (same name on both sides) reads best as one change.
    for key in added:
        for old in removed:
            if old.name == key.name:
                was, now = _render(locked[old][0]), _render(mine[key][0])
                return f"{what} {_q(was)} changed to {_q(now)}"
    if added:
        return f"{what} {_q(_render(mine[added[0]][0]))} was added"
    if removed:
        return f"{what} {_q(_render(locked[removed[0]][0]))} was removed"
    if changed:
        key = changed[0]
        mine_always = any(r.marker is None for r in mine[key])
        locked_always = any(r.marker is None for r in locked[key])
        plain = _render(
            LockRequirement(
                name=key.name, extras=mine[key][0].extras, specifier=mine[key][0].specifier
            )
        )
        if mine_always and not locked_always:
            return f"{what} {_q(plain)} was added"
        if locked_always and not mine_always:
            return f"{what} {_q(plain)} is no longer unconditional"
        was = _or_markers([r.marker for r in locked[key]])
        now = _or_markers([r.marker for r in mine[key]])
        return f"{what} {_q(plain)} changed marker from {_q(was)} to {_q(now)}"
    return None


def _or_markers(markers: Sequence[str | None]) -> str:
    if any(m is None for m in markers):
        return "always"
    texts = [_marker_text(m) for m in markers if m is not None]
    return " or ".join(f"({m})" if len(texts) > 1 else m for m in texts)


# -- marker equivalence ------------------------------------------------------------------

_QUOTED = re.compile(r"""'([^']*)'|"([^"]*)\"""")
_IDENT = re.compile(r"\b([a-z_][a-z_.]*)\b")
_VERSION_VARS = ("python_version", "python_full_version", "implementation_version")
_MAX_ENVIRONMENTS = 50_000


def _markers_equivalent(
    a: Sequence[str | None], b: Sequence[str | None], requires_python: SpecifierSet | None
) -> bool:
    """Whether ``any(a)`` and ``any(b)`` hold in the same environments.

    uv keeps markers as decision diagrams, so two markers that mean the same thing are
    the same marker to it, and it drops what ``requires-python`` already implies. We check
    the same by evaluating both on every combination of the literals they mention (and
    neighbours of each version literal), restricted to Pythons ``requires-python`` allows.
    """
    if any(m is None for m in a) or any(m is None for m in b):
        a = [None] if any(m is None for m in a) else a
        b = [None] if any(m is None for m in b) else b
    texts = [m for m in (*a, *b) if m is not None]
    try:
        ma = [Marker(m) if m is not None else None for m in a]
        mb = [Marker(m) if m is not None else None for m in b]
    except InvalidMarker:
        return sorted(map(str, a)) == sorted(map(str, b))
    environments = _sample_environments(texts, requires_python)
    if environments is None:
        return sorted(str(m) for m in ma) == sorted(str(m) for m in mb)

    def holds(markers: Sequence[Marker | None], env: dict[str, str]) -> bool:
        return any(m is None or m.evaluate(env) for m in markers)

    return all(holds(ma, env) == holds(mb, env) for env in environments)


def _sample_environments(
    markers: Sequence[str], requires_python: SpecifierSet | None
) -> list[dict[str, str]] | None:
    literals: set[str] = set()
    variables: set[str] = set()
    for text in markers:
        for single, double in _QUOTED.findall(text):
            literals.add(single or double)
        unquoted = _QUOTED.sub(" ", text)
        variables |= set(_IDENT.findall(unquoted)) - {"and", "or", "not", "in"}
    pythons = _python_candidates(literals, requires_python)
    axes: list[list[tuple[str, str]]] = []
    if variables & set(_VERSION_VARS):
        axes.append([("python", full) for full in pythons])
    for var in sorted(variables - set(_VERSION_VARS)):
        axes.append([(var, v) for v in sorted(literals | {"", "~other~"})])
    count = 1
    for axis in axes:
        count *= max(len(axis), 1)
    if count > _MAX_ENVIRONMENTS:
        return None
    base_full = pythons[0] if pythons else "3.12.0"
    out = []
    for combo in itertools.product(*axes):
        env = _base_env(base_full)
        for var, value in combo:
            if var == "python":
                env.update(_python_env(value))
            else:
                env[var] = value
        out.append(env)
    return out


def _python_env(full: str) -> dict[str, str]:
    major, minor = full.split(".")[:2]
    return {
        "python_full_version": full,
        "python_version": f"{major}.{minor}",
        "implementation_version": full,
    }


def _base_env(full: str) -> dict[str, str]:
    return {
        "implementation_name": "cpython",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "sys_platform": "linux",
        "extra": "",
        **_python_env(full),
    }


def _python_candidates(literals: Iterable[str], requires_python: SpecifierSet | None) -> list[str]:
    minors: set[tuple[int, int]] = {(3, 8), (3, 12)}
    patches: set[int] = {0, 1, 99}
    if requires_python is not None:
        literals = [*literals, *(s.version for s in requires_python)]
    for literal in literals:
        text = literal.removesuffix(".*")
        if not _valid_version(text):
            continue
        release = Version(text).release
        major = release[0]
        minor = release[1] if len(release) > 1 else 0
        if major != 3:
            minors |= {(3, 0), (3, 99)} if major < 3 else {(3, 99)}
            continue
        minors |= {(3, max(minor - 1, 0)), (3, minor), (3, minor + 1)}
        if len(release) > 2:
            patches |= {max(release[2] - 1, 0), release[2], release[2] + 1}
    out = [f"{a}.{b}.{p}" for (a, b) in sorted(minors) for p in sorted(patches)]
    if requires_python is not None:
        out = [v for v in out if requires_python.contains(v, prereleases=True)]
    return out or ["3.12.0"]

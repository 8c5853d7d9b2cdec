"""pylock.toml (PEP 751) -> ``Lock``, with the ``[tool.imgbuild]`` record read in the same pass.

The standard part is validated by ``packaging.pylock`` (its errors already carry the dotted
field path, e.g. ``packages[3].wheels[0].hashes``). Two readers stay our own, and why:

- converting ``packaging.pylock`` values into ``Lock`` values, because selection and the
  build need file URLs resolved against the lock's directory, ``sha256:`` digests and one
  source kind per package, which ``Pylock`` leaves to its consumer;
- ``[tool.imgbuild]``, which PEP 751 leaves to each tool (``Pylock`` keeps it as a raw
  mapping): the inputs the lock was made from, its pins and the base digests.
"""

from __future__ import annotations

import posixpath
import tomllib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packaging.pylock import (
    Package,
    PackageArchive,
    PackageSdist,
    PackageWheel,
    Pylock,
    PylockValidationError,
)
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.digest import Digest, is_digest, parse_digest
from imagebuild.errors import LockError
from imagebuild.lock.direct import git_location
from imagebuild.lock.model import (
    Lock,
    LockedPackage,
    LockInputs,
    PackageSource,
    RecordedLock,
    SdistFile,
    SourceKind,
    WheelFile,
    file_url,
    sort_packages,
    sort_targets,
    url_filename,
)
from imagebuild.project.fields import Fields
from imagebuild.target.platform import TargetPlatform

INPUTS_VERSION = 1
"""The version of the ``[tool.imgbuild]`` record this module reads and the writer writes."""


def parse_pylock(data: Mapping[str, object], *, path: Path) -> Lock:
    """Validate decoded PEP 751 data with ``packaging.pylock`` and convert it."""
    f = Fields(path.name, LockError)
    try:
        pylock = Pylock.from_dict(data)
    except PylockValidationError as exc:
        f.fail(exc.context or "", exc.message[:1].lower() + exc.message[1:])
    lock_dir = path.parent
    packages: list[LockedPackage] = []
    root: NormalizedName | None = None
    for i, package in enumerate(pylock.packages):
        converted = _pylock_package(f, package, f"packages[{i}]", lock_dir)
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
        packages=sort_packages(packages),
        environments=tuple(pylock.environments or ()),
        extras=tuple(pylock.extras) if pylock.extras is not None else None,
        dependency_groups=(
            tuple(pylock.dependency_groups) if pylock.dependency_groups is not None else None
        ),
        default_groups=tuple(pylock.default_groups or ()),
        recorded=parse_recorded(data, path=path),
    )


def _pylock_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def _pylock_location(f: Fields, key: str, url: str | None, path: str | None, lock_dir: Path) -> str:
    # PEP 751: fetch from path when given, else from url.
    if path is not None:
        return (
            Path(path).resolve().as_uri() if Path(path).is_absolute() else file_url(lock_dir, path)
        )
    if url is not None:
        return url
    f.fail(key, "needs 'url' or 'path'")


def _pylock_digest(f: Fields, hashes: Mapping[str, str], key: str, label: str) -> Digest:
    if "sha256" not in hashes:
        f.fail(
            f"{key}.hashes",
            f"package {label}: no sha256 hash (has {', '.join(sorted(hashes))})",
            hint="regenerate the lock with sha256 hashes",
        )
    try:
        return parse_digest(hashes["sha256"], bare_hex=True)
    except ValueError:
        f.fail(f"{key}.hashes.sha256", f"package {label}: malformed sha256 {hashes['sha256']!r}")


def _pylock_wheel(
    f: Fields,
    wheel: PackageWheel | PackageArchive,
    filename: str,
    key: str,
    label: str,
    lock_dir: Path,
) -> WheelFile:
    return WheelFile(
        filename=filename,
        url=_pylock_location(f, key, wheel.url, wheel.path, lock_dir),
        sha256=_pylock_digest(f, wheel.hashes, key, label),
        size=wheel.size,
        upload_time=_pylock_time(wheel.upload_time),
    )


def _pylock_package(f: Fields, package: Package, key: str, lock_dir: Path) -> LockedPackage:
    label = f"{package.name} {package.version}" if package.version else str(package.name)
    wheels: list[WheelFile] = []
    sdist_of_archive: SdistFile | None = None
    if package.vcs is not None:
        vcs = package.vcs
        if vcs.type != "git":
            f.fail(f"{key}.vcs.type", f"{vcs.type!r} is not supported (imgbuild builds git)")
        url = vcs.url or _pylock_location(f, f"{key}.vcs", None, vcs.path, lock_dir)
        location = git_location(url, vcs.commit_id, vcs.requested_revision, vcs.subdirectory)
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
        filename = url_filename(location)
        if filename.endswith(".whl") and not archive.subdirectory:
            wheels.append(_pylock_wheel(f, archive, filename, f"{key}.archive", label, lock_dir))
        elif filename.endswith((".tar.gz", ".zip")) and not archive.subdirectory:
            # A direct sdist: built like an index's sdist, checked against the archive's hash.
            archive_sdist = _pylock_wheel(f, archive, filename, f"{key}.archive", label, lock_dir)
            sdist_of_archive = SdistFile(
                filename=filename,
                url=archive_sdist.url,
                sha256=archive_sdist.sha256,
                size=archive.size,
            )
    else:
        source = PackageSource(kind="registry", location=package.index or "")
        for j, wheel in enumerate(package.wheels or ()):
            wheels.append(
                _pylock_wheel(f, wheel, wheel.filename, f"{key}.wheels[{j}]", label, lock_dir)
            )
    sdist: SdistFile | None = sdist_of_archive
    if package.sdist is not None:
        s: PackageSdist = package.sdist
        sdist = SdistFile(
            filename=s.filename,
            url=_pylock_location(f, f"{key}.sdist", s.url, s.path, lock_dir),
            sha256=_pylock_digest(f, s.hashes, f"{key}.sdist", label),
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


def parse_recorded(data: Mapping[str, Any], *, path: Path) -> RecordedLock | None:
    """The ``[tool.imgbuild]`` record of decoded pylock data; None if imgbuild did not write it.

    The record's shape is checked by use: any missing key or wrong type is one error
    (``tool.imgbuild is malformed``), since only imgbuild writes it.
    """
    ours = data.get("tool", {}).get("imgbuild")
    if not isinstance(ours, dict) or ours.get("inputs-version") != INPUTS_VERSION:
        return None
    try:
        return RecordedLock(
            inputs=_recorded_inputs(ours),
            pins=_recorded_pins(data.get("packages", [])),
            bases=_recorded_bases(ours.get("bases", {})),
            debian=dict(ours["debian"]) if isinstance(ours.get("debian"), dict) else None,
        )
    except (KeyError, TypeError, ValueError, InvalidVersion, AttributeError) as exc:
        raise LockError(
            f"{path}: tool.imgbuild is malformed ({exc})", hint="run 'imgbuild lock'"
        ) from exc


def _recorded_inputs(tool: Mapping[str, Any]) -> LockInputs:
    requirements = tuple(
        (("" if origin == "dependencies" else origin), tuple(reqs))
        for origin, reqs in tool["requirements"].items()
    )
    targets = tuple(
        TargetPlatform(
            python_version=_pair(row["python"]),
            libc=row["libc"],
            libc_version=_pair(row["libc-version"]),
            arch=row["arch"],
        )
        for row in tool["targets"]
    )
    return LockInputs(
        requires_python=tool.get("requires-python"),
        requirements=requirements,
        indexes=tuple(tool["indexes"]),
        prereleases=bool(tool["prereleases"]),
        targets=sort_targets(targets),
    )


def _recorded_bases(raw: Mapping[str, Any]) -> dict[str, Digest]:
    bases = {str(ref): Digest(str(digest)) for ref, digest in raw.items()}
    for ref, digest in bases.items():
        if not is_digest(digest):
            raise ValueError(f"bases[{ref!r}] = {digest!r} is not a sha256 digest")
    return bases


def _recorded_pins(
    packages: Iterable[Mapping[str, Any]],
) -> dict[NormalizedName, tuple[Version, ...]]:
    pins: dict[NormalizedName, list[Version]] = {}
    for package in packages:
        if "version" in package:
            name = canonicalize_name(package["name"])
            pins.setdefault(name, []).append(Version(package["version"]))
    return {k: tuple(v) for k, v in pins.items()}


def _pair(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return (int(major), int(minor))


def load_recorded(path: Path) -> RecordedLock | None:
    """Read only the ``[tool.imgbuild]`` record of the pylock at ``path``.

    None when there is no file or imgbuild did not write it. ``imgbuild lock`` reads the
    existing lock through this, once: the rest of the file is about to be replaced.
    """
    return read_recorded(path) if path.is_file() else None


def read_recorded(path: Path) -> RecordedLock | None:
    """The ``[tool.imgbuild]`` inputs of a pylock.toml, or None if imgbuild did not write it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LockError(f"{path}: cannot read ({exc})", hint="run 'imgbuild lock'") from exc
    return parse_recorded(data, path=path)


def recorded_bases(path: Path) -> dict[str, Digest]:
    """The base digests an imgbuild pylock.toml records (reference -> digest), else none.

    A thin wrapper: prefer ``Lock.recorded.bases`` or ``load_recorded(path).bases``.
    """
    recorded = load_recorded(path)
    return dict(recorded.bases) if recorded is not None else {}


def pins_as_preferences(path: Path) -> dict[NormalizedName, Version]:
    """The newest locked version of each package, for keeping pins when re-locking.

    A thin wrapper: prefer ``RecordedLock.preferences()`` on a record read once.
    """
    recorded = load_recorded(path)
    return recorded.preferences() if recorded is not None else {}

"""``imgbuild lock``'s direct sources: git revisions and direct archives, pinned and read.

A requirement met from git (``tool.uv.sources`` or ``name @ git+…``) is resolved to a
commit, and its requirements are read from its own metadata (prepared by its backend);
a direct archive is fetched, hash-checked (``#sha256=`` when given) and read. Their
requirements take their place among the roots the index resolves, as a local project's
do; the packages are recorded as PEP 751 ``vcs`` and ``archive`` entries.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from packaging.markers import Marker
from packaging.metadata import parse_email
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from imagebuild.build.direct import GitCommit, fetch_archive, git_metadata, git_wheel
from imagebuild.build.git import GitMirrors, GitRevision
from imagebuild.build.pep517 import BuildEnvironments
from imagebuild.build.sdist import sdist_metadata
from imagebuild.cache import CacheLayout
from imagebuild.errors import BuildError, FetchError, ImagebuildError, LockError
from imagebuild.index.metadata import wheel_metadata
from imagebuild.index.model import IndexFile
from imagebuild.lock.direct import DirectPackage, parse_git_location, requirements_for
from imagebuild.lock.model import LockedPackage
from imagebuild.project.sources import (
    DirectSource,
    requirement_source,
    strip_userinfo,
    uv_direct_sources,
)
from imagebuild.project.spec import ProjectSpec
from imagebuild.report import Reporter


@dataclass(kw_only=True, slots=True)
class DirectLocking:
    """What pinning direct sources needs, and the packages pinned so far."""

    http: httpx.Client
    cache_dir: Path
    envs: BuildEnvironments
    reporter: Reporter
    pinned: dict[NormalizedName, DirectPackage] = field(default_factory=dict)


def lock_direct(
    project: ProjectSpec,
    roots: Mapping[str, tuple[Requirement, ...]],
    locking: DirectLocking,
) -> tuple[dict[str, tuple[Requirement, ...]], list[DirectPackage]]:
    """The roots with direct sources replaced by their requirements, and those packages."""
    sources = uv_direct_sources(project)
    markers: dict[NormalizedName, dict[str, list[Marker | None]]] = {}
    out_roots: dict[str, tuple[Requirement, ...]] = {}
    for origin, reqs in roots.items():
        out: list[Requirement] = []
        queue = list(reqs)
        seen: set[tuple[NormalizedName, str, str]] = set()
        while queue:
            req = queue.pop(0)
            name = canonicalize_name(req.name)
            source = requirement_source(req, str(project.pyproject)) or sources.get(name)
            if source is None:
                out.append(req)
                continue
            package = _pinned(source, locking)
            key = (name, ",".join(sorted(req.extras)), str(req.marker or ""))
            if key in seen:
                continue
            seen.add(key)
            markers.setdefault(name, {}).setdefault(origin, []).append(req.marker)
            queue.extend(requirements_for(package, req.extras, req.marker))
        out_roots[origin] = tuple(out)
    packages = [
        replace(
            locking.pinned[name],
            markers={o: tuple(m) for o, m in sorted(by_origin.items())},
        )
        for name, by_origin in sorted(markers.items())
    ]
    return out_roots, packages


def _pinned(source: DirectSource, locking: DirectLocking) -> DirectPackage:
    """The package ``source`` names, pinned once per lock (one source per name)."""
    known = locking.pinned.get(source.name)
    if known is not None:
        if known.source.describe() != source.describe():
            raise LockError(
                f"{source.where}: {source.name} is also required from "
                f"{known.source.describe().partition(' @ ')[2]}",
                hint="require it from one source",
            )
        return known
    if source.kind == "git":
        package = _pin_git(source, locking)
    else:
        package = _pin_archive(source, locking)
    locking.pinned[source.name] = package
    return package


def _pin_git(source: DirectSource, locking: DirectLocking) -> DirectPackage:
    kind, value = source.revision or (None, None)
    revision = GitRevision(url=source.url, kind=kind, value=value)
    bucket = CacheLayout(locking.cache_dir).git
    locking.reporter.step(f"git: {revision.describe()}")
    commit = GitMirrors(bucket).resolve(revision)
    at = GitCommit(
        url=source.url, commit=commit, subdirectory=source.subdirectory, where=source.where
    )
    data = git_metadata(bucket, at, locking.envs)
    return _from_metadata(source, data, commit=commit)


def _pin_archive(source: DirectSource, locking: DirectLocking) -> DirectPackage:
    filename = source.filename
    with tempfile.TemporaryDirectory(prefix="imgbuild-direct-") as tmp:
        local = Path(tmp) / filename
        digest = fetch_archive(locking.http, source.url, local, where=source.where)
        if source.sha256 is not None and digest != source.sha256:
            raise FetchError(
                f"{source.where}: sha256 mismatch (asked: {source.sha256}, downloaded: {digest})",
                hint="the archive changed, or the #sha256= is wrong",
            )
        size = local.stat().st_size
        file = IndexFile(filename=filename, url=local.as_uri(), sha256=digest, size=size)
        try:
            if filename.endswith(".whl"):
                if parse_wheel_filename(filename)[0] != source.name:
                    raise LockError(
                        f"{source.where}: {filename} is not a wheel of {source.name}",
                        hint="point the source at that package's archive",
                    )
                data = wheel_metadata(local, file)
            else:
                indexes = locking.envs.indexes
                data = sdist_metadata(locking.http, file, locking.cache_dir, indexes=indexes)
        except ImagebuildError as exc:
            if isinstance(exc, LockError):
                raise
            raise LockError(f"{source.where}: {exc.message}", hint=exc.hint) from exc
    return _from_metadata(source, data, sha256=digest, size=size)


def _from_metadata(
    source: DirectSource,
    data: bytes,
    *,
    commit: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> DirectPackage:
    raw, _ = parse_email(data)
    name, text = raw.get("name"), raw.get("version")
    hint = "check the source names the package it is declared for"
    if not name or canonicalize_name(name) != source.name:
        raise LockError(
            f"{source.where}: the source holds {name or 'no project'}, not {source.name}", hint=hint
        )
    try:
        version = Version(text or "")
        requires = tuple(Requirement(r) for r in raw.get("requires_dist", []))
        python = raw.get("requires_python")
        requires_python = SpecifierSet(python) if python and python.strip() else None
    except (InvalidVersion, InvalidRequirement, InvalidSpecifier) as exc:
        raise LockError(f"{source.where}: its metadata is malformed ({exc})", hint=hint) from exc
    return DirectPackage(
        source=source,
        version=version,
        requires_dist=requires,
        requires_python=requires_python,
        commit=commit,
        sha256=sha256,
        size=size,
    )


def git_package_wheel(
    pkg: LockedPackage, *, bucket: Path, epoch: int, envs: BuildEnvironments, reporter: Reporter
) -> Path:
    """The wheel of a locked git package, built at its locked commit (cached by commit)."""
    where = f"package {pkg.describe()}"
    location = parse_git_location(pkg.source.location, where=where)
    url = strip_userinfo(location.url)
    reporter.step(f"build: {pkg.name} wheel from git {url} at {location.commit[:12]}")
    commit = GitCommit(
        url=location.url,
        commit=location.commit,
        subdirectory=location.subdirectory or pkg.source.subdirectory,
        where=f"{where} (git {url})",
    )
    wheel = git_wheel(bucket, commit, name=pkg.name, epoch=epoch, envs=envs)
    version = parse_wheel_filename(wheel.name)[1]
    if pkg.version is not None and version != pkg.version:
        raise BuildError(
            f"{commit.where}: commit {location.commit} builds version {version}, "
            f"not the locked {pkg.version}",
            hint="re-lock: the lock and the commit disagree",
        )
    return wheel

"""``run_lock``: resolve the project for every target and write (or check) its pylock.

A lock that still fits its recorded inputs is kept as it is (as ``uv lock`` does), with no
resolution and no request; otherwise each target is resolved against the project's
indexes, the current pins preferred, and the pylock is rewritten if its text changed.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from imagebuild.build.pep517 import BuildEnvironments
from imagebuild.cache import CacheLayout, build_envs_memory, write_json
from imagebuild.digest import Digest
from imagebuild.errors import LockError, RegistryError
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.lock.direct import DirectPackage
from imagebuild.lock.inputs import project_roots
from imagebuild.lock.model import LockInputs, RecordedLock
from imagebuild.lock.pylock import load_recorded
from imagebuild.lock.resolve import Resolution, resolve
from imagebuild.lock.staleness import check_recorded
from imagebuild.lock.writer import render_pylock, write_pylock
from imagebuild.net.credentials import IndexCredentials
from imagebuild.pipeline.bases import lock_inputs
from imagebuild.pipeline.debbase import base_lock_problem, base_lock_table
from imagebuild.pipeline.direct import DirectLocking, lock_direct
from imagebuild.pipeline.locate import locate_lock, project_settings
from imagebuild.pipeline.ports import Ports, Registry
from imagebuild.pipeline.requests import LockRequest, LockResult
from imagebuild.project.indexes import index_entries, lock_indexes
from imagebuild.project.settings import ImageSettings
from imagebuild.project.spec import ProjectSpec
from imagebuild.project.workspace import LocalPackage, expand_local
from imagebuild.target.choose import base_reference
from imagebuild.target.platform import TargetPlatform


@dataclass(frozen=True, kw_only=True, slots=True)
class _Resolving:
    """What resolving every target of one lock needs."""

    request: LockRequest
    settings: ImageSettings
    path: Path
    """The lock file."""
    preferences: Mapping[NormalizedName, Version]
    """The pins of the lock being replaced (none with ``--upgrade``)."""
    indexes: tuple[str, ...]
    """The indexes, priority order (their credentials are the HTTP client's auth)."""
    roots: Mapping[str, tuple[Requirement, ...]]
    """The project's requirements by origin (``""``, an extra, a group)."""
    declared_in: Mapping[str, Path]
    """Where a local project's requirement was declared."""


def run_lock(request: LockRequest, *, ports: Ports) -> LockResult:
    """Resolve the project for every target and write (or check) ``pylock.toml``."""
    project, workspace, path = locate_lock(request.project_dir, request.package)
    settings = project_settings(project, base=request.base, python=request.python)
    indexes = request.index_urls or lock_indexes(settings, project, workspace)
    credentials = IndexCredentials(index_entries(indexes, project, workspace))
    ports.http.auth = credentials
    roots, local, declared_in = expand_local(project_roots(project), project, workspace)
    store = BlobStore(CacheLayout(request.cache_dir).blobs)
    recorded = _existing_record(path, upgrade=request.upgrade)
    # The base stays at the digest the lock recorded until --upgrade, like every pin.
    pinned = dict(recorded.bases) if recorded is not None and not request.upgrade else {}
    inputs, targets, digests = lock_inputs(
        settings,
        project,
        indexes=indexes,
        local=[p.project for p in local.values()],
        registry=ports.registry,
        store=store,
        cache=request.cache_dir,
        mirrors=request.mirrors,
        pinned=pinned,
        reporter=ports.reporter,
    )
    described = tuple(t.describe() for t in targets)
    base_problem = base_lock_problem(settings, project, recorded, path.name)
    if request.check:
        return _check_only(path, recorded, inputs, described, base_problem)
    fits = _current(path, recorded, inputs) and base_problem is None
    if not request.upgrade and not request.upgrade_packages and fits:
        ports.reporter.step(f"lock: {path.name} is up to date")
        assert recorded is not None  # a current lock is imgbuild's
        return LockResult(
            path=path, changed=False, packages=len(recorded.preferences()), targets=described
        )
    # The catalog base's digest is recorded for the record only: look it up beside the
    # resolution rather than before it.
    lookup = _catalog_digest(settings, project, pinned, ports.registry, request.mirrors)
    roots, direct = lock_direct(project, roots, _direct_locking(request, indexes, ports))
    resolving = _Resolving(
        request=request,
        settings=settings,
        path=path,
        preferences={} if request.upgrade or recorded is None else recorded.preferences(),
        indexes=tuple(indexes),
        roots=roots,
        declared_in=declared_in,
    )
    resolutions = _resolve_all(resolving, targets, ports)
    digests.update(lookup())
    written = _Written(
        local=local,
        digests=digests,
        direct=direct,
        base_lock=_base_lock(request, settings, project, recorded, ports),
    )
    return _write(resolving, project, inputs, resolutions, written, described)


def _direct_locking(request: LockRequest, indexes: Sequence[str], ports: Ports) -> DirectLocking:
    """Git and archive sources are read through backends from the project's indexes."""
    credentials = ports.http.auth if isinstance(ports.http.auth, IndexCredentials) else None
    envs = BuildEnvironments(
        root=(root := CacheLayout(request.cache_dir).build_envs),
        memory=build_envs_memory(root),
        indexes=tuple(indexes),
        credentials=credentials,
    )
    return DirectLocking(
        http=ports.http, cache_dir=request.cache_dir, envs=envs, reporter=ports.reporter
    )


def _existing_record(path: Path, *, upgrade: bool) -> RecordedLock | None:
    """The lock being replaced, read once (an unreadable one is no matter with ``--upgrade``)."""
    try:
        return load_recorded(path)
    except LockError:
        if upgrade:
            return None
        raise


def _check_only(
    path: Path,
    recorded: RecordedLock | None,
    inputs: LockInputs,
    described: tuple[str, ...],
    base_problem: str | None,
) -> LockResult:
    """``--check``: the lock must exist, be imgbuild's, and fit its inputs and base."""
    if not path.is_file():
        raise LockError(f"{path.parent}: no {path.name}", hint="run 'imgbuild lock'")
    if base_problem is not None:
        raise LockError(base_problem, hint="run 'imgbuild lock'")
    if not check_recorded(recorded, inputs, filename=path.name):
        raise LockError(
            f"{path}: not written by imgbuild, so it cannot be checked",
            hint="run 'imgbuild lock' to replace it",
        )
    return LockResult(path=path, changed=False, packages=0, targets=described)


def _current(path: Path, recorded: RecordedLock | None, inputs: LockInputs) -> bool:
    """Whether the lock at ``path`` still fits ``inputs`` (an unreadable one does not).

    Kept even when it records no digest for the base (the registry was unreachable, or the
    base changed to one with the same targets): ``--upgrade`` records one.
    """
    if not path.is_file():
        return False
    try:
        return check_recorded(recorded, inputs, filename=path.name)
    except LockError:
        return False


def _catalog_digest(
    settings: ImageSettings,
    project: ProjectSpec,
    pinned: Mapping[str, Digest],
    registry: Registry,
    mirrors: Mapping[str, str],
) -> Callable[[], dict[str, str]]:
    """The catalog base's digest to record: pinned, or looked up in the background."""
    entry, reference = base_reference(settings, project)
    if entry is not None and entry.built:
        return dict  # built, not pulled: its packages are recorded instead
    if entry is not None and reference in pinned:
        known = {reference: pinned[reference]}
        return lambda: dict(known)
    if entry is not None:
        return _lookup_digest_in_background(registry, reference, mirrors)
    return dict


def _lookup_digest_in_background(
    registry: Registry, reference: str, mirrors: Mapping[str, str]
) -> Callable[[], dict[str, str]]:
    """Start resolving ``reference`` to a manifest digest; the returned call waits for it."""
    found: dict[str, str] = {}

    def lookup() -> None:
        try:
            ref = ImageReference.parse(reference).with_mirrors(mirrors)
            found[reference] = registry.fetch_manifest(ref)[2]
        except RegistryError:
            pass  # recorded when reachable; the lock does not depend on it

    thread = threading.Thread(target=lookup, name="imgbuild-base-digest", daemon=True)
    thread.start()

    def wait() -> dict[str, str]:
        thread.join(timeout=30)
        return found

    return wait


def _resolve_all(
    resolving: _Resolving, targets: Sequence[TargetPlatform], ports: Ports
) -> list[Resolution]:
    """One resolution per target, the current pins preferred (unless upgraded)."""
    request = resolving.request
    preferences = dict(resolving.preferences)
    for name in request.upgrade_packages:
        preferences.pop(canonicalize_name(name), None)
    lock_dir = resolving.path.parent
    origins = {
        str(req): _declared_where(resolving.declared_in.get(str(req)), lock_dir, origin)
        for origin, reqs in resolving.roots.items()
        for req in reqs
    }
    flat = [req for reqs in resolving.roots.values() for req in reqs]
    hints = _lock_hints_path(request.cache_dir, request.project_dir, resolving.indexes)
    resolutions = []
    with ports.index(
        resolving.indexes, cache_dir=request.cache_dir, reporter=ports.reporter
    ) as index:
        # Every page the last lock of this project needed (and every locked name), fetched
        # at once instead of one dependency level at a time.
        index.prefetch(sorted(set(_read_hints(hints)) | set(preferences)))
        for target in targets:
            ports.reporter.step(f"resolve: {target.describe()}")
            resolutions.append(
                resolve(
                    flat,
                    index=index,
                    target=target,
                    prereleases=resolving.settings.prereleases,
                    preferences=preferences,
                    origins=origins,
                    reporter=ports.reporter,
                )
            )
    write_json(hints, sorted({pin.name for r in resolutions for pin in r.pins}))
    return resolutions


def _base_lock(
    request: LockRequest,
    settings: ImageSettings,
    project: ProjectSpec,
    recorded: RecordedLock | None,
    ports: Ports,
) -> dict[str, Any] | None:
    """A built base's packages for the lock (None for a pulled base)."""
    return base_lock_table(
        settings,
        project,
        recorded,
        upgrade=request.upgrade,
        http=ports.http,
        cache=CacheLayout(request.cache_dir),
        reporter=ports.reporter,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Written:
    """What a pylock records beside the resolutions."""

    local: Mapping[NormalizedName, LocalPackage]
    digests: Mapping[str, str]
    direct: Sequence[DirectPackage]
    base_lock: Mapping[str, Any] | None


def _write(
    resolving: _Resolving,
    project: ProjectSpec,
    inputs: LockInputs,
    resolutions: Sequence[Resolution],
    written: _Written,
    described: tuple[str, ...],
) -> LockResult:
    """Render the pylock and write it when its text changed."""
    path = resolving.path
    direct = written.direct
    text = render_pylock(
        project,
        inputs,
        resolutions,
        roots=resolving.roots,
        lock_dir=path.parent,
        local=written.local,
        base_digests=written.digests,
        direct=direct,
        base_lock=written.base_lock,
    )
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if text != old:
        write_pylock(path, text)
    names = {pin.name for r in resolutions for pin in r.pins} | {p.name for p in direct}
    return LockResult(path=path, changed=text != old, packages=len(names), targets=described)


def _lock_hints_path(cache: Path, project_dir: Path, indexes: Sequence[str]) -> Path:
    """Where the names a project's last lock needed are kept (a speed hint, nothing more)."""
    key = hashlib.sha256("\n".join([str(project_dir), *indexes]).encode()).hexdigest()
    return CacheLayout(cache).lock_hints / f"{key[:32]}.json"


def _read_hints(path: Path) -> list[NormalizedName]:
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return (
        [canonicalize_name(n) for n in names if isinstance(n, str)]
        if isinstance(names, list)
        else []
    )


def _declared_where(pyproject: Path | None, lock_dir: Path, origin: str) -> str:
    """Where a root requirement comes from, for conflict messages.

    The project's own pyproject.toml (with its extra or group), or a local project's,
    relative to the lock.
    """
    if pyproject is not None:
        try:
            return pyproject.relative_to(lock_dir).as_posix()
        except ValueError:
            return str(pyproject)
    return "pyproject.toml" if not origin else f"pyproject.toml {origin}"

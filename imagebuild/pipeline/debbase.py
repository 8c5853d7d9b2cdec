"""Built bases in a build: their packages from the lock (or resolved now), assembled per platform.

A pylock.toml that imgbuild wrote records a built base's packages in
``[tool.imgbuild.debian]``; a build uses them when they were locked for the same recipe and
system packages, and ``--locked`` refuses a lock whose base no longer fits. Without a record
(a uv.lock, or a pylock locked before the base was), the packages are resolved from the
archive at build time and the build says so.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from imagebuild.cache import CacheLayout
from imagebuild.debian.base import BaseRecipe, assemble_base, fetch_releases, resolve_platform
from imagebuild.debian.baselock import BaseLock, PlatformDebs, parse_base_lock, render_base_lock
from imagebuild.errors import LockError
from imagebuild.image.model import BaseImage
from imagebuild.image.store import BlobStore
from imagebuild.lock.model import Lock, RecordedLock
from imagebuild.pipeline.requests import LockMode
from imagebuild.project.settings import ImageSettings
from imagebuild.project.spec import ProjectSpec
from imagebuild.report import Reporter
from imagebuild.target.base import CatalogEntry
from imagebuild.target.choose import base_reference


def base_recipe(entry: CatalogEntry, settings: ImageSettings) -> BaseRecipe:
    """The built base of ``entry``, read from the configured mirrors."""
    assert entry.recipe is not None
    return BaseRecipe(
        flavor=entry.flavor,
        reference=entry.reference,
        interpreter=entry.interpreter,
        user=entry.user,
        recipe=entry.recipe.with_mirrors(settings.debian_mirror, settings.debian_security_mirror),
    )


def recorded_base_lock(lock: Lock) -> BaseLock | None:
    """The built base's packages a pylock recorded, if it did."""
    if lock.recorded is None or lock.recorded.debian is None:
        return None
    return parse_base_lock(lock.recorded.debian, source=lock.filename)


class BuiltBases:
    """One build's built base on each platform, assembled once per architecture."""

    def __init__(
        self,
        base: BaseRecipe,
        *,
        settings: ImageSettings,
        lock: Lock,
        lock_mode: LockMode,
        http: httpx.Client,
        cache: CacheLayout,
        store: BlobStore,
        reporter: Reporter,
    ) -> None:
        self.base = base
        self._system = settings.system_packages
        self._lock = lock
        self._recorded = recorded_base_lock(lock)
        self._mode = lock_mode
        self._http = http
        self._cache = cache
        self._store = store
        self._reporter = reporter
        self._mutex = threading.Lock()
        self._images: dict[str, BaseImage] = {}

    def get(self, arch: str) -> BaseImage:
        """The base for ``arch`` (assembled on first use; threads wait for one another)."""
        with self._mutex:
            if arch not in self._images:
                debs = self._packages(arch)
                self._images[arch] = assemble_base(
                    self._http,
                    self.base,
                    debs,
                    arch=arch,
                    cache=self._cache.debian,
                    store=self._store,
                    reporter=self._reporter,
                )
            return self._images[arch]

    def _packages(self, arch: str) -> PlatformDebs:
        """The lock's packages for ``arch`` when they fit, else resolved from the archive."""
        inputs = self.base.inputs(self._system)
        name = self._lock.filename
        if self._recorded is not None:
            why = self._recorded.stale_for(inputs, arch)
            if why is None:
                return self._recorded.platforms[arch]
            if self._mode == "locked":
                raise LockError(
                    f"{name}: the built base's packages are stale: {why}",
                    hint="run 'imgbuild lock' (or drop --locked)",
                )
            self._reporter.warn(f"{name}: the built base's packages are stale ({why})")
        elif self._mode == "locked" and self._lock.kind == "pylock":
            raise LockError(
                f"{name}: no base packages are locked for base {self.base.flavor!r}",
                hint="run 'imgbuild lock' (or drop --locked)",
            )
        self._reporter.step(
            f"base: resolving {self.base.flavor} ({self.base.recipe.suite}, {arch}) "
            f"from {self.base.recipe.mirror}"
            + (
                ""
                if self._lock.kind == "pylock"
                else f" ({name} cannot record it; 'imgbuild lock' writes a pylock.toml that does)"
            )
        )
        return resolve_platform(
            self._http,
            self.base.recipe,
            arch=arch,
            system_packages=self._system,
            cache=self._cache.debian,
        )


def lock_base(
    base: BaseRecipe,
    *,
    archs: Sequence[str],
    system_packages: Sequence[str],
    http: httpx.Client,
    cache: CacheLayout,
) -> Mapping[str, PlatformDebs]:
    """Each architecture's packages, resolved from the archive for ``imgbuild lock``."""
    releases = fetch_releases(http, base.recipe, cache.debian)
    return {
        arch: resolve_platform(
            http,
            base.recipe,
            arch=arch,
            system_packages=system_packages,
            cache=cache.debian,
            releases=releases,
        )
        for arch in archs
    }


def base_lock_problem(
    settings: ImageSettings, project: ProjectSpec, recorded: RecordedLock | None, filename: str
) -> str | None:
    """Why a lock's built-base packages do not fit (None: they fit, or no base is built)."""
    entry, _ = base_reference(settings, project)
    if entry is None or not entry.built:
        return None
    inputs = base_recipe(entry, settings).inputs(settings.system_packages)
    if recorded is None or recorded.debian is None:
        return f"{filename} locks no packages for base {entry.flavor!r}"
    old = parse_base_lock(recorded.debian, source=filename)
    for arch in _archs(settings):
        why = old.stale_for(inputs, arch)
        if why is not None:
            return f"{filename}: the built base's packages are stale: {why}"
    return None


def base_lock_table(
    settings: ImageSettings,
    project: ProjectSpec,
    recorded: RecordedLock | None,
    *,
    upgrade: bool,
    http: httpx.Client,
    cache: CacheLayout,
    reporter: Reporter,
) -> dict[str, Any] | None:
    """``[tool.imgbuild.debian]`` for a built base (None for a pulled one).

    The recorded packages while they fit (until ``--upgrade``), else resolved now.
    """
    entry, _ = base_reference(settings, project)
    if entry is None or not entry.built:
        return None
    base = base_recipe(entry, settings)
    inputs = base.inputs(settings.system_packages)
    archs = _archs(settings)
    if not upgrade and base_lock_problem(settings, project, recorded, "lock") is None:
        assert recorded is not None and recorded.debian is not None
        old = parse_base_lock(recorded.debian, source="lock")
        return render_base_lock(BaseLock(inputs=inputs, platforms=old.platforms))
    reporter.step(f"lock: base {entry.flavor} packages from {base.recipe.mirror}")
    platforms = lock_base(
        base, archs=archs, system_packages=settings.system_packages, http=http, cache=cache
    )
    return render_base_lock(BaseLock(inputs=inputs, platforms=platforms))


def _archs(settings: ImageSettings) -> list[str]:
    return sorted({platform.partition("/")[2] for platform in settings.platforms})

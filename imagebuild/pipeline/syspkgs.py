"""System packages on a pulled base: a Debian-based image gets them in a layer of its own.

The base's release (``VERSION_CODENAME`` of its os-release) names the suite, and what its
dpkg records as installed is left out of the closure, so the layer holds only what the base
lacks. The archive, keyring and mirrors are the ``debian`` recipe's (or the settings'). The
layer goes on top of the base's, below the Python layers: everything after treats the
result as the base. A base that is not Debian is refused in one line.

On a pulled base the packages are resolved at build time (a pylock records a pulled base's
digest, not these packages); on a built base they are locked with the base's
(``pipeline.debbase``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import httpx

from imagebuild.cache import CacheLayout, write_json
from imagebuild.digest import digest_hex
from imagebuild.errors import ProjectError
from imagebuild.image.model import BaseImage
from imagebuild.image.mutate import stack_layer
from imagebuild.image.store import BlobStore
from imagebuild.project.settings import ImageSettings
from imagebuild.report import Reporter
from imagebuild.target.base import find_entry, load_catalog

if TYPE_CHECKING:
    from imagebuild.debian.release import InstalledRelease


def with_system_packages(
    base: BaseImage,
    *,
    arch: str,
    settings: ImageSettings,
    store: BlobStore,
    cache: CacheLayout,
    http: httpx.Client,
    reporter: Reporter,
) -> BaseImage:
    """``base`` with a layer of ``settings.system_packages`` on top (``base`` if none)."""
    wanted = settings.system_packages
    if not wanted:
        return base
    # Imported when there are packages to add only: the Debian modules cost a build 15 ms.
    from imagebuild.debian.assemble import assemble_layer
    from imagebuild.debian.base import fetch_deb_files, resolve_platform

    release = _release(base, store, cache)
    if release.id != "debian" or not release.codename:
        what = f"{release.id} {release.codename}".strip() or "not a Debian image"
        raise ProjectError(
            f"system-packages {', '.join(wanted)}: base {base.reference} is {what}; they "
            "are Debian packages",
            hint='use a Debian-based base, e.g. base = "debian" (built by imgbuild)',
        )
    recipe = find_entry(load_catalog(), "debian", None).recipe
    assert recipe is not None
    recipe = dataclasses.replace(
        recipe.with_mirrors(settings.debian_mirror, settings.debian_security_mirror),
        suite=release.codename,
        packages=(),
        exclude=tuple(sorted({*recipe.exclude, *release.packages})),
    )
    reporter.step(f"system packages: {', '.join(wanted)} for Debian {release.codename} ({arch})")
    debs = resolve_platform(http, recipe, arch=arch, system_packages=wanted, cache=cache.debian)
    if not debs.system:
        return base  # the base has them all
    paths = fetch_deb_files(http, debs.system, recipe, cache.debian)
    layer = assemble_layer(
        [(deb, paths[deb.sha256]) for deb in debs.system],
        spec=None,
        store=store,
        mtime=0,
        created_by="imgbuild: system packages " + " ".join(sorted(d.name for d in debs.system)),
        status_file=False,
    ).layer
    return stack_layer(base, layer, store)


def _release(base: BaseImage, store: BlobStore, cache: CacheLayout) -> InstalledRelease:
    """The base's release and packages, read off its layers once per manifest digest."""
    from imagebuild.debian.release import InstalledRelease, read_release

    record = cache.bases / f"release-{digest_hex(base.manifest_digest)}.json"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        return InstalledRelease(
            id=data["id"], codename=data["codename"], packages=frozenset(data["packages"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    release = read_release([store.path(d.digest) for d in base.layers])
    write_json(
        record,
        {"id": release.id, "codename": release.codename, "packages": sorted(release.packages)},
    )
    return release

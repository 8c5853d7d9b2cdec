"""No image ships an extension module that cannot load: the ELF link check of a build.

Before any layer is made, every ELF file of the wheels going into the image (extension
modules, bundled libraries, programs) is read, and what each needs (libraries and their
symbol versions) is looked up among the base's libraries, the system packages' and the
ones wheels bundle. A library nothing provides refuses the build in one line naming the
wheel, the file, the library and, on a base imgbuild builds from Debian packages, the
package that ships it. Wheels' and bases' facts are cached, so a warm build reads no ELF.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import httpx

from imagebuild.cache import CacheLayout
from imagebuild.debian.base import BaseRecipe, fetch_releases
from imagebuild.debian.contents import find_providers
from imagebuild.debian.linkcheck import (
    Missing,
    check_links,
    index_base,
    index_wheels,
    missing_line,
    scan_wheel,
)
from imagebuild.debian.release import read_release
from imagebuild.errors import DebianError
from imagebuild.image.model import BaseImage
from imagebuild.image.store import BlobStore
from imagebuild.install.plan import PlannedWheel
from imagebuild.target.base import find_entry, load_catalog


def check_image_links(
    wheels: Sequence[PlannedWheel],
    base: BaseImage,
    *,
    arch: str,
    store: BlobStore,
    cache: CacheLayout,
    http: httpx.Client,
    recipe: BaseRecipe | None,
) -> None:
    """Refuse the image if an ELF file of ``wheels`` needs a library it will not have.

    ``recipe`` is the built base's (None for a pulled base, whose os-release is read then):
    it names the Debian release whose Contents index says which package to add.
    """
    scanned = [
        (
            f"{wheel.name} {wheel.version}",
            scan_wheel(wheel.path, cache=cache.elf, sha256=wheel.sha256),
        )
        for wheel in wheels
    ]
    layers = [(d.digest, store.path(d.digest)) for d in base.layers]
    index = index_base(layers, cache=cache.elf).merged(index_wheels(scanned))
    missing = check_links(scanned, index, arch=arch)
    if not missing:
        return
    recipe = recipe or _pulled_debian(base, store)
    providers = _providers(missing, arch=arch, http=http, cache=cache.debian, recipe=recipe)
    first = missing[0]
    owner = first.provider.package if first.provider is not None else None
    line = missing_line(first, providers.get(first.library) or owner)
    others = sorted({m.library for m in missing[1:]} - {first.library})
    if others:
        line += f" (also missing: {', '.join(others)})"
    raise DebianError(line)


def _pulled_debian(base: BaseImage, store: BlobStore) -> BaseRecipe | None:
    """The debian recipe at a pulled base's release, if the base is Debian."""
    release = read_release([store.path(d.digest) for d in base.layers])
    entry = find_entry(load_catalog(), "debian", None)
    if release.id != "debian" or not release.codename or entry.recipe is None:
        return None
    return BaseRecipe(
        flavor=entry.flavor,
        reference=base.reference,
        interpreter=entry.interpreter,
        user=entry.user,
        recipe=dataclasses.replace(entry.recipe, suite=release.codename),
    )


def _providers(
    missing: Sequence[Missing],
    *,
    arch: str,
    http: httpx.Client,
    cache: Path,
    recipe: BaseRecipe | None,
) -> dict[str, str]:
    """The Debian package shipping each missing library, when the base's release is known."""
    names = {m.library for m in missing if m.version is None}
    if recipe is None or not names:
        return {}
    releases = fetch_releases(http, recipe.recipe, cache)
    return find_providers(http, releases, arch=arch, filenames=names, cache=cache)

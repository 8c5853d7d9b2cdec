"""The base of a build: where it comes from, pulled for one platform, its facts checked.

A pulled base's layers are pulled with it, unless its facts are known without them (the
local cache, or the registry cache: ``pipeline.basecache``); they then arrive on a thread of
their own while the build goes on, and what reads them waits (``ArrivingLayers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.cache import CacheLayout
from imagebuild.errors import ProjectError
from imagebuild.image.model import BaseImage
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore, LayerFiles
from imagebuild.lock.model import Lock
from imagebuild.pipeline.basecache import ArrivingLayers, facts_without_layers
from imagebuild.pipeline.bases import base_facts
from imagebuild.pipeline.layers import RemoteLayers
from imagebuild.pipeline.ports import Ports, Registry
from imagebuild.pipeline.syspkgs import with_system_packages
from imagebuild.project.settings import ImageSettings
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.base import BaseFacts, CatalogEntry
from imagebuild.target.choose import check_base_python

if TYPE_CHECKING:
    # Only for a base built from Debian packages, whose module imports the assembler.
    from imagebuild.pipeline.debbase import BuiltBases


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseSource:
    """The base every platform's image is built on."""

    entry: CatalogEntry | None
    """Its catalog entry, if it is named by flavor."""
    reference: str
    """The base as configured (catalog reference or the user's), before mirrors."""
    pull: ImageReference
    """What is pulled: at its pinned digest, through the mirrors."""
    pinned: bool
    """Whether the lock pins it to a digest."""
    built: BuiltBases | None = None
    """For a base imgbuild builds from Debian packages: the bases, per architecture."""

    def image(
        self, registry: Registry, arch: str, store: BlobStore, *, fetch_layers: bool = True
    ) -> BaseImage:
        """The base for ``arch``: built, or pulled through ``registry``.

        Its layers are pulled too, unless not ``fetch_layers`` (``Registry.pull_layers``).
        """
        if self.built is not None:
            return self.built.get(arch)
        return registry.pull_image(
            self.pull, platform=("linux", arch), store=store, fetch_layers=fetch_layers
        )


def pull_base(
    base: BaseSource,
    platform: str,
    *,
    lock: Lock,
    project: ProjectSpec,
    settings: ImageSettings,
    ports: Ports,
    store: BlobStore,
    layer_files: LayerFiles,
    remote: RemoteLayers | None,
    cache_dir: Path,
) -> tuple[BaseImage, BaseFacts, ArrivingLayers]:
    """The base for ``platform``, its facts, and its layers as they arrive.

    The facts' Python is checked against the settings. The layers (``layer_files``, once
    ``store`` holds them) are pulled now, or meanwhile when the facts are known without
    them and the base gets no system packages (``pipeline.basecache``).
    """
    arch = platform.partition("/")[2]
    if base.pinned:
        note = f" (pinned by {lock.filename})"
    elif lock.kind == "pylock":
        note = (
            f" (not pinned by {lock.filename}: the tag is used; 'imgbuild lock --upgrade' pins it)"
        )
    else:
        note = ""
    if base.built is None:
        ports.reporter.step(f"base: {base.pull} for {platform}{note}")
    registry = ports.registry
    image = base.image(registry, arch, store, fetch_layers=False)
    facts = None
    if base.built is None and not settings.system_packages:
        facts = facts_without_layers(image, cache_dir, remote)
    if facts is not None:
        layers = ArrivingLayers(layer_files, lambda: registry.pull_layers(base.pull, image, store))
    else:
        if base.built is None:
            registry.pull_layers(base.pull, image, store)
        layers = ArrivingLayers(layer_files)
        facts = base_facts(image, layer_files, cache_dir, arch, base.entry)
    wanted = settings.python
    if wanted is not None and facts.python_version != wanted:
        raise ProjectError(
            f"base {base.reference} has Python {'.'.join(map(str, facts.python_version))}, "
            f"not {'.'.join(map(str, wanted))}",
            hint="pick a base with that Python or change --python",
        )
    if base.entry is None:
        check_base_python(project, facts.python_version, base=base.reference)
    if base.built is None:  # a built base carries its system packages already
        image = with_system_packages(
            image,
            arch=arch,
            settings=settings,
            store=store,
            cache=CacheLayout(cache_dir),
            http=ports.http,
            reporter=ports.reporter,
        )
    return image, facts, layers

"""``imgbuild base build``: a built base on its own, for a registry, an engine or a file.

The same assembly a project build uses (``imagebuild.debian.base``), without a project:
its packages resolved from the archive now, each platform's image assembled, an index over
several, and the result handed to the sinks like any image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagebuild.cache import CacheLayout, scratch_tree, sweep_scratch
from imagebuild.debian.base import BaseRecipe, assemble_base, fetch_releases, resolve_platform
from imagebuild.errors import ProjectError
from imagebuild.image.descriptor import OCI_MANIFEST, Descriptor, json_object
from imagebuild.image.model import BaseImage, Image, ImageConfig, ImageIndex
from imagebuild.image.mutate import build_index
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.pipeline.debbase import base_recipe
from imagebuild.pipeline.outputs import write_order
from imagebuild.pipeline.ports import Ports
from imagebuild.pipeline.requests import BuildResult
from imagebuild.project.settings import ImageSettings
from imagebuild.sinks.sink import Finished, Sink
from imagebuild.target.base import find_entry, load_catalog, read_entries


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseBuildRequest:
    """What ``imgbuild base build`` was asked for."""

    flavor: str
    """A catalog base imgbuild builds (``debian``, ``debian-shell``), or a definition file."""
    python: tuple[int, int] | None
    """Its Python (None: the newest the flavor offers)."""
    platforms: tuple[str, ...]
    """``linux/amd64`` and/or ``linux/arm64``."""
    system_packages: tuple[str, ...] = ()
    """Debian packages added in a layer of their own."""
    tags: tuple[str, ...] = ()
    """Tags; empty means ``imgbuild-<flavor>:<python>-<suite>``."""
    cache_dir: Path
    """The cache directory."""
    mirror: str | None = None
    """The Debian archive root (None: the recipe's)."""
    security_mirror: str | None = None
    """The Debian security archive root (None: the recipe's)."""


def run_base_build(
    request: BaseBuildRequest, *, ports: Ports, sinks: Sequence[Sink]
) -> BuildResult:
    """Build the base of ``request`` and hand it to every sink."""
    if request.flavor.endswith(".toml"):
        own = read_entries(Path(request.flavor))
        entry = find_entry(own, own[0].flavor, request.python)
    else:
        entry = find_entry(load_catalog(), request.flavor, request.python)
    if entry.recipe is None:
        raise ProjectError(
            f"base {request.flavor!r} is pulled from a registry, not built by imgbuild",
            hint="build one of the bases built from Debian packages: debian, debian-shell",
        )
    settings = ImageSettings(
        base=request.flavor,
        system_packages=request.system_packages,
        debian_mirror=request.mirror,
        debian_security_mirror=request.security_mirror,
    )
    base = base_recipe(entry, settings)
    cache = CacheLayout(request.cache_dir)
    store = BlobStore(cache.blobs)
    built = _assemble_each(request, base, ports, cache, store)
    images = [
        _as_image(b, store, platform) for b, platform in zip(built, request.platforms, strict=True)
    ]
    image: Image | ImageIndex = images[0] if len(images) == 1 else build_index(images, store)
    default = f"imgbuild-{entry.flavor}:{'.'.join(map(str, entry.python_version))}"
    tags = request.tags or (f"{default}-{base.recipe.suite}",)
    sweep_scratch(cache.tmp)
    with scratch_tree(cache.tmp) as work:
        finished = Finished(
            image=image,
            tags=tuple(ImageReference.parse(tag) for tag in tags),
            work=work,
            base=built[0],
            base_pulled=ImageReference.parse(entry.reference),
            base_upstream=entry.reference,
            layers=(),
            config=ImageConfig(),
            title=f"{entry.flavor} base, Python {'.'.join(map(str, entry.python_version))}",
        )
        written = [
            line for sink in write_order(sinks) for line in sink.write(finished, ports.reporter)
        ]
    blobs = {image.manifest.digest: image.manifest.size}
    for one in images:
        for desc in (one.manifest, one.config, *one.layers):
            blobs[desc.digest] = desc.size
    return BuildResult(
        manifest_digest=image.manifest.digest,
        written=tuple(written),
        tag=tags[0],
        size=sum(blobs.values()),
        layers=sum(len(one.layers) for one in images),
        layers_built=sum(len(one.layers) for one in images),
    )


def _assemble_each(
    request: BaseBuildRequest, base: BaseRecipe, ports: Ports, cache: CacheLayout, store: BlobStore
) -> list[BaseImage]:
    """The base assembled for each platform asked for, its packages resolved now."""
    releases = fetch_releases(ports.http, base.recipe, cache.debian)
    built: list[BaseImage] = []
    for platform in request.platforms:
        arch = platform.partition("/")[2]
        debs = resolve_platform(
            ports.http,
            base.recipe,
            arch=arch,
            system_packages=request.system_packages,
            cache=cache.debian,
            releases=releases,
        )
        built.append(
            assemble_base(
                ports.http,
                base,
                debs,
                arch=arch,
                cache=cache.debian,
                store=store,
                reporter=ports.reporter,
            )
        )
    return built


def _as_image(base: BaseImage, store: BlobStore, platform: str) -> Image:
    """A built base as an image value (its manifest and config are in ``store``)."""
    data = store.read_bytes(base.manifest_digest)
    manifest = json_object(data)
    os_name, _, arch = platform.partition("/")
    return Image(
        manifest=Descriptor(media_type=OCI_MANIFEST, digest=base.manifest_digest, size=len(data)),
        manifest_bytes=data,
        config=Descriptor.from_json(manifest["config"]),
        layers=base.layers,
        store=store,
        platform=(os_name, arch),
    )

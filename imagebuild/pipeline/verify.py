"""``run_verify``: whether the published image really is this checkout and its lock.

The published image (or index) is read from a registry or an OCI layout, the project is
rebuilt from its lock for the same platforms (and, unless ``SOURCE_DATE_EPOCH`` says
otherwise, with the published image's own creation time), and the two are compared:
either the same digest, or the first layer that differs and the files that differ in it
(``image.compare``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.cache import CacheLayout
from imagebuild.digest import Digest
from imagebuild.errors import ImageError, ProjectError
from imagebuild.image.compare import ImageView, LayerDifference, compare_images
from imagebuild.image.descriptor import INDEX_TYPES, Descriptor, json_object
from imagebuild.image.model import Image, ImageIndex
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.pipeline.build import run_build
from imagebuild.pipeline.ports import Ports
from imagebuild.pipeline.requests import BuildRequest

if TYPE_CHECKING:
    from imagebuild.report import Reporter
    from imagebuild.sinks.sink import Finished

_LISTED = 40  # files named per kind of difference; the rest are counted


@dataclass(frozen=True, kw_only=True, slots=True)
class Published:
    """The image to check, as read: its digest and one view per platform."""

    source: str
    """What the user named (``REF`` or ``oci:DIR``)."""
    digest: Digest
    """The manifest's (or index's) digest."""
    images: tuple[ImageView, ...]
    """One per platform, in the index's order."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyResult:
    """The verdict."""

    published: Digest
    """The published image's (or index's) digest."""
    rebuilt: Digest
    """The rebuild's."""
    differences: tuple[LayerDifference, ...]
    """The first difference of each platform that differs (empty when identical)."""

    @property
    def identical(self) -> bool:
        """Whether the rebuild is the published image, byte for byte."""
        return self.published == self.rebuilt

    def report_lines(self, source: str) -> list[str]:
        """What the CLI prints."""
        if self.identical:
            return [f"identical: {source} is {self.published}, and so is the rebuild"]
        lines = [f"differs: {source} is {self.published}, the rebuild is {self.rebuilt}"]
        for diff in self.differences:
            lines.extend(_difference_lines(diff))
        return lines


@dataclass
class _Capture:
    """A sink that keeps the finished image instead of writing it anywhere."""

    finished: list[Finished] = field(default_factory=list)
    kind: str = "verify"
    takes_index: bool = True

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        self.finished.append(finished)
        return ()


def run_verify(
    source: str, request: BuildRequest, *, ports: Ports, epoch_given: bool
) -> VerifyResult:
    """Rebuild ``request``'s project like the image ``source`` names and compare the two.

    ``request.platforms`` is replaced by the published image's; so is its
    ``source_date_epoch`` (by the published creation time) unless ``epoch_given``.
    """
    store = BlobStore(CacheLayout(request.cache_dir).blobs)
    published = load_published(source, request.platforms[0], ports=ports, store=store)
    ports.reporter.step(f"verify: {source} is {published.digest}; rebuilding")
    epoch = request.source_date_epoch if epoch_given else _created(published.images[0])
    rebuild = replace(
        request,
        platforms=tuple(view.platform for view in published.images),
        source_date_epoch=epoch,
        expect_digest=None,
    )
    capture = _Capture()
    result = run_build(rebuild, ports=ports, sinks=(capture,))
    (finished,) = capture.finished
    ours = _views(finished.image)
    differences = tuple(
        diff
        for theirs, mine in zip(published.images, ours, strict=True)
        if (diff := compare_images(theirs, mine)) is not None
    )
    return VerifyResult(
        published=published.digest,
        rebuilt=Digest(result.manifest_digest),
        differences=differences,
    )


def load_published(source: str, platform: str, *, ports: Ports, store: BlobStore) -> Published:
    """The image ``source`` names, every layer in a store: ``oci:DIR`` or a registry reference.

    A single image (not an index) in a registry is pulled for ``platform``.
    """
    if source.startswith("oci:"):
        return _from_layout(source, Path(source.removeprefix("oci:")))
    ref = ImageReference.parse(source)
    data, media_type, digest = ports.registry.fetch_manifest(ref)
    platforms = [platform]
    if media_type in INDEX_TYPES:
        platforms = _index_platforms(json_object(data), source)
    views = []
    for wanted in platforms:
        os_name, _, arch = wanted.partition("/")
        base = ports.registry.pull_image(ref, platform=(os_name, arch), store=store)
        views.append(
            ImageView(
                platform=wanted,
                digest=base.manifest_digest,
                layers=base.layers,
                config=base.config,
                store=store,
            )
        )
    return Published(source=source, digest=digest, images=tuple(views))


def _from_layout(source: str, root: Path) -> Published:
    """An OCI layout's first image (or index), read in place: its blobs are a store."""
    store = BlobStore(root / "blobs")
    try:
        index = json.loads((root / "index.json").read_text(encoding="utf-8"))
        top = Descriptor.from_json(index["manifests"][0], where=f"{source} index.json")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ProjectError(
            f"{source}: not an OCI image layout ({exc})",
            hint="name a directory written by 'imgbuild build --output oci:DIR'",
        ) from exc
    entries = [(top, "")]
    if top.media_type in INDEX_TYPES:
        manifest = json_object(store.read_bytes(top.digest))
        raw = manifest.get("manifests")
        entries = [
            (Descriptor.from_json(entry, where=f"{source} index"), _platform(entry))
            for entry in (raw if isinstance(raw, list) else [])
        ]
    views = []
    for desc, platform in entries:
        manifest = json_object(store.read_bytes(desc.digest))
        config_desc = Descriptor.from_json(manifest.get("config"), where=f"{source} config")
        config = json_object(store.read_bytes(config_desc.digest))
        raw_layers = manifest.get("layers")
        views.append(
            ImageView(
                platform=platform or f"{config.get('os')}/{config.get('architecture')}",
                digest=desc.digest,
                layers=tuple(
                    Descriptor.from_json(layer, where=f"{source} layer")
                    for layer in (raw_layers if isinstance(raw_layers, list) else [])
                ),
                config=config,
                store=store,
            )
        )
    return Published(source=source, digest=top.digest, images=tuple(views))


def _platform(entry: object) -> str:
    platform = entry.get("platform") if isinstance(entry, dict) else None
    if not isinstance(platform, dict):
        return ""
    return f"{platform.get('os')}/{platform.get('architecture')}"


def _index_platforms(index: dict[str, object], source: str) -> list[str]:
    raw = index.get("manifests")
    found = [_platform(entry) for entry in (raw if isinstance(raw, list) else [])]
    platforms = [p for p in found if p and not p.startswith("unknown/")]
    if not platforms:
        raise ImageError(f"{source}: an image index with no platform images")
    return platforms


def _views(image: Image | ImageIndex) -> list[ImageView]:
    images = image.images if isinstance(image, ImageIndex) else (image,)
    return [
        ImageView(
            platform="/".join(one.platform),
            digest=one.digest,
            layers=one.layers,
            config=json_object(one.store.read_bytes(one.config.digest)),
            store=one.store,
        )
        for one in images
    ]


def _created(view: ImageView) -> int:
    """The published image's ``created`` as an epoch (imgbuild writes SOURCE_DATE_EPOCH)."""
    created = view.config.get("created")
    if not isinstance(created, str):
        return 0
    try:
        return int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _difference_lines(diff: LayerDifference) -> list[str]:
    if diff.position == 0:
        keys = ", ".join(diff.config_keys) or "its bytes"
        return [f"{diff.platform}: every layer is the same; the image config differs in {keys}"]
    lines = [
        f"{diff.platform}: first differing layer {diff.position} of {diff.count} "
        f"({diff.created_by}): published {diff.published or 'absent'}, "
        f"rebuilt {diff.rebuilt or 'absent'}"
    ]
    for label, names in (
        ("changed", diff.changed),
        ("only published", diff.only_published),
        ("only rebuilt", diff.only_rebuilt),
    ):
        lines.extend(f"  {label}: {name}" for name in names[:_LISTED])
        if len(names) > _LISTED:
            lines.append(f"  {label}: ... and {len(names) - _LISTED} more")
    return lines

"""An existing image's layer list: each layer's digest, size and what made it.

The rows come from a manifest and its config (``history`` entries that made no layer are
skipped, so the n-th remaining one belongs to the n-th layer); ``read_layout_listing`` reads
both from an OCI layout directory or archive, checking every blob it reads against its digest.
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagebuild.digest import Digest
from imagebuild.errors import ImageError
from imagebuild.image.descriptor import INDEX_TYPES, MANIFEST_TYPES, Descriptor
from imagebuild.image.validate import LayoutReader, layout_reader


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerRow:
    """One layer of an image."""

    digest: Digest
    """The compressed blob's digest, as the manifest names it."""
    size: int
    """The compressed blob's size in bytes."""
    created_by: str
    """Its ``created_by`` in the config's history (empty when the history does not say)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageListing:
    """An image's manifest digest, platform and layers, base layer first."""

    source: str
    """Where it was read: a reference, ``oci:DIR`` or ``oci-archive:FILE``."""
    digest: Digest
    """The image manifest's digest (one platform's, when the source is an index)."""
    platform: str
    """``os/architecture`` from the config."""
    layers: tuple[LayerRow, ...]
    """The layers, base first."""

    @property
    def size(self) -> int:
        """Bytes of every layer blob together."""
        return sum(layer.size for layer in self.layers)


def build_listing(
    manifest: Mapping[str, object], config: Mapping[str, object], *, source: str, digest: Digest
) -> ImageListing:
    """The listing of an image from its parsed manifest and config."""
    raw = manifest.get("layers")
    if not isinstance(raw, list):
        raise ImageError(f"{source}: manifest {digest} has no layers list")
    layers = [Descriptor.from_json(d, where=f"{source}: layers[{i}]") for i, d in enumerate(raw)]
    history = config.get("history")
    made = [
        str(entry.get("created_by", ""))
        for entry in (history if isinstance(history, list) else [])
        if isinstance(entry, dict) and not entry.get("empty_layer", False)
    ]
    if len(made) != len(layers):
        made = [""] * len(layers)
    return ImageListing(
        source=source,
        digest=digest,
        platform=f"{config.get('os', '?')}/{config.get('architecture', '?')}",
        layers=tuple(
            LayerRow(digest=d.digest, size=d.size, created_by=by)
            for d, by in zip(layers, made, strict=True)
        ),
    )


def read_layout_listing(path: Path, *, archive: bool, platform: str, source: str) -> ImageListing:
    """The listing of the image for ``platform`` in an OCI layout directory or archive.

    A layout holding one image gives it whatever its platform; with several, the one whose
    config names ``platform`` (``os/arch``).
    """
    try:
        with layout_reader(path, archive=archive) as reader:
            images = [
                (desc, manifest, _config(reader, manifest, source))
                for desc, manifest in _manifests(reader, reader.index(), source)
            ]
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{source}: cannot read: {exc}") from exc
    if not images:
        raise ImageError(f"{source}: index.json lists no image")
    if len(images) > 1:
        images = [i for i in images if f"{i[2].get('os')}/{i[2].get('architecture')}" == platform]
        if not images:
            raise ImageError(
                f"{source}: no image for {platform}", hint="pick one with --platform os/arch"
            )
    desc, manifest, config = images[0]
    return build_listing(manifest, config, source=source, digest=desc.digest)


def _manifests(
    reader: LayoutReader, index: Mapping[str, object], source: str
) -> list[tuple[Descriptor, dict[str, object]]]:
    """Every image manifest an index reaches (through nested indexes), in index order."""
    entries = index.get("manifests")
    found: list[tuple[Descriptor, dict[str, object]]] = []
    for i, raw in enumerate(entries if isinstance(entries, list) else []):
        desc = Descriptor.from_json(raw, where=f"{source}: manifests[{i}]")
        obj = reader.json_blob(desc, "manifest")
        if desc.media_type in INDEX_TYPES:
            found.extend(_manifests(reader, obj, source))
        elif desc.media_type in MANIFEST_TYPES:
            found.append((desc, obj))
    return found


def _config(reader: LayoutReader, manifest: Mapping[str, object], source: str) -> dict[str, object]:
    desc = Descriptor.from_json(manifest.get("config"), where=f"{source}: manifest config")
    return reader.json_blob(desc, "config")


def layer_table(listing: ImageListing, *, widths: Sequence[int] = (71, 10)) -> list[str]:
    """The listing as text: a heading line, then ``DIGEST  SIZE  CREATED BY`` rows."""
    digest_w, size_w = widths
    lines = [
        f"{listing.source}  {listing.digest}  {listing.platform}  "
        f"{len(listing.layers)} layers, {listing.size} bytes",
        f"{'DIGEST':<{digest_w}}  {'SIZE':>{size_w}}  CREATED BY",
    ]
    for row in listing.layers:
        lines.append(f"{row.digest:<{digest_w}}  {row.size:>{size_w}}  {row.created_by}")
    return lines

"""Images as values: layers, the pulled base, what we set on top of it, images and indexes.

Data flow through ``imagebuild.image``::

    staging dir --tarball.build_layer--> Layer (blob in a store.BlobStore)
    BaseImage + Layers + ImageConfig --mutate.build_image--> Image (config + manifest stored)
    Images, one per platform --mutate.build_index--> ImageIndex
    an OCI layout or archive on disk --validate--> every blob re-hashed

The writers of layouts and archives are sinks (``imagebuild.sinks.layout``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imagebuild.digest import Digest
from imagebuild.image.descriptor import OCI_LAYER_GZIP, Descriptor
from imagebuild.image.store import BlobStore


@dataclass(frozen=True, kw_only=True, slots=True)
class Layer:
    """A filesystem layer stored as a compressed blob."""

    digest: Digest
    """sha256 of the compressed blob (the manifest's layer digest)."""
    diff_id: Digest
    """sha256 of the uncompressed tar (the config's ``rootfs.diff_ids`` entry)."""
    size: int
    """Size of the compressed blob in bytes."""
    media_type: str = OCI_LAYER_GZIP
    """The blob's media type."""
    created_by: str = "imgbuild: layer"
    """What made this layer, recorded in the config history (e.g. ``imgbuild: dependency
    numpy 2.1.0``)."""

    @property
    def descriptor(self) -> Descriptor:
        """The manifest descriptor of this layer."""
        return Descriptor(media_type=self.media_type, digest=self.digest, size=self.size)


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseImage:
    """A pulled base image whose blobs are in a ``BlobStore``."""

    reference: str
    """The reference it was pulled as, e.g. ``docker.io/library/python:3.11-slim``."""
    manifest_digest: Digest
    """Digest of the platform-specific image manifest."""
    config: Mapping[str, object]
    """The image config, as parsed JSON."""
    layers: tuple[Descriptor, ...]
    """The manifest's layer descriptors, base layer first (media types as the registry sent)."""
    diff_ids: tuple[Digest, ...]
    """``rootfs.diff_ids`` from the config, one per layer."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageConfig:
    """What our image sets on top of its base. ``None`` means "inherit from the base"."""

    entrypoint: tuple[str, ...] | None = None
    """Exec-form entrypoint. Setting it without ``cmd`` drops the base's Cmd, as a Dockerfile
    ``ENTRYPOINT`` does, so ``python:*`` images do not pass ``python3`` as an argument."""
    cmd: tuple[str, ...] | None = None
    """Exec-form command (arguments to the entrypoint)."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment as ordered ``(name, value)`` pairs; a name also set by the base replaces the
    base's value (e.g. our ``PATH``), other base variables are kept."""
    user: str | None = None
    """``uid``, ``uid:gid``, ``user`` or ``user:group``."""
    workdir: str | None = None
    """Absolute working directory."""
    labels: tuple[tuple[str, str], ...] = ()
    """Labels merged over the base's labels."""
    exposed_ports: tuple[str, ...] = ()
    """Ports such as ``8000`` or ``53/udp`` (``/tcp`` is implied), added to the base's."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Image:
    """A complete image: config and manifest built, every blob present in ``store``."""

    manifest: Descriptor
    """Descriptor of the image manifest."""
    manifest_bytes: bytes
    """The exact manifest bytes (what a registry stores and the digest covers)."""
    config: Descriptor
    """Descriptor of the config blob."""
    layers: tuple[Descriptor, ...]
    """Layer descriptors in manifest order, base layers first."""
    store: BlobStore
    """Where the config and layer blobs live."""
    platform: tuple[str, str] = ("linux", "amd64")
    """``(os, architecture)`` from the config."""

    @property
    def digest(self) -> Digest:
        """The manifest digest, i.e. what ``name@digest`` pins."""
        return self.manifest.digest

    @property
    def image_id(self) -> Digest:
        """Docker's image ID: the config digest."""
        return self.config.digest


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageIndex:
    """Images of one name for several platforms: an OCI image index over them."""

    manifest: Descriptor
    """Descriptor of the index (what ``name@digest`` pins)."""
    manifest_bytes: bytes
    """The exact index bytes."""
    images: tuple[Image, ...]
    """One image per platform, in the index's order."""
    store: BlobStore
    """Where the index and every image's blobs live."""

    @property
    def digest(self) -> Digest:
        """The index digest."""
        return self.manifest.digest

"""OCI media types and content descriptors: what a blob is, its digest and its size.

Also the one way imgbuild writes JSON (``canonical_json``): sorted keys, compact, UTF-8, so
the same value always gives the same bytes and the same digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from imagebuild.digest import Digest, parse_digest
from imagebuild.errors import ImageError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
"""The media type of the SBOM document (as a referrer's artifact type and its blob)."""
SBOM_FILE = "sbom.cdx.json"
"""The SBOM document's file name, in the image's virtual environment directory."""
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYOUT_VERSION = "1.0.0"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

OCTET_STREAM = "application/octet-stream"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

# Docker and OCI types name the same bytes; images we write always use the OCI names.
DOCKER_TO_OCI_LAYER = {
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_TAR: OCI_LAYER_TAR,
}
LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})


def checked_digest(text: str) -> Digest:
    """``text`` as a ``Digest`` (``imagebuild.digest.parse_digest``), else ``ImageError``."""
    try:
        return parse_digest(text)
    except ValueError:
        raise ImageError(
            f"invalid digest {text!r}: expected sha256:<64 lowercase hex digits>"
        ) from None


def canonical_json(obj: object) -> bytes:
    """Serialise ``obj`` the one way imgbuild ever writes JSON: sorted keys, compact, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, kw_only=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its size."""

    media_type: str
    """The blob's media type, e.g. ``application/vnd.oci.image.layer.v1.tar+gzip``."""
    digest: Digest
    """sha256 of the blob's bytes as stored."""
    size: int
    """Length of the blob in bytes."""
    annotations: tuple[tuple[str, str], ...] = ()
    """Annotations as ``(key, value)`` pairs, sorted by key."""

    def to_json(self) -> dict[str, object]:
        """Return the descriptor as the JSON object the OCI spec defines."""
        obj: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return obj

    @classmethod
    def from_json(cls, obj: object, *, where: str = "descriptor") -> Descriptor:
        """Parse a descriptor JSON object; ``where`` names it in error messages."""
        if not isinstance(obj, dict):
            raise ImageError(f"{where}: expected a JSON object")
        media_type = obj.get("mediaType")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise ImageError(f"{where}: mediaType missing or not a string")
        if not isinstance(digest, str):
            raise ImageError(f"{where}: digest missing or not a string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{where}: size missing or not a non-negative integer")
        raw_annotations = obj.get("annotations") or {}
        if not isinstance(raw_annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_annotations.items()
        ):
            raise ImageError(f"{where}: annotations must map strings to strings")
        try:
            checked = checked_digest(digest)
        except ImageError as exc:
            raise ImageError(f"{where}: {exc.message}") from None
        return cls(
            media_type=media_type,
            digest=checked,
            size=size,
            annotations=tuple(sorted(raw_annotations.items())),
        )


def json_object(data: bytes) -> dict[str, object]:
    """``data`` decoded as a JSON object; ``ValueError`` says what it is instead."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("is not a JSON object")
    return obj

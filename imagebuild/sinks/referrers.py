"""The SBOM attached to a pushed image as an OCI referrer (distribution spec 1.1).

The SBOM goes up as an artifact manifest: an empty config, the document as its one layer,
``artifactType`` the document's media type and ``subject`` the image's manifest. A registry
with the referrers API indexes it by its subject on its own. For one without it (the
``referrers/<digest>`` endpoint answers 404, as Docker's registry 2.x does), the spec's
fallback is kept: an image index tagged ``sha256-<hex of the subject>`` lists the
referrers, and the artifact's descriptor is added to it (an index already there keeps its
entries). Everything is made from content only, so pushing the same image twice changes
nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from imagebuild.digest import Digest
from imagebuild.errors import RegistryError
from imagebuild.image.descriptor import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    json_object,
)
from imagebuild.image.model import Image, ImageIndex
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore

if TYPE_CHECKING:
    from imagebuild.sinks.sink import Finished

OCI_EMPTY = "application/vnd.oci.empty.v1+json"
"""The empty descriptor's media type: an artifact's config that carries nothing (``{}``)."""


class ReferrerRegistry(Protocol):
    """What attaching a referrer asks of a registry client (``RegistryClient``)."""

    def push_image(
        self, image: Image, ref: ImageReference, store: BlobStore | None = None
    ) -> Digest:
        """Push the blobs ``image`` lacks in the repository, then its manifest to ``ref``."""
        ...

    def push_manifest(self, ref: ImageReference, data: bytes, *, media_type: str) -> Digest:
        """PUT ``data`` at ``ref``'s tag or digest."""
        ...

    def fetch_optional(self, ref: ImageReference, path: str) -> bytes | None:
        """GET ``path`` in ``ref``'s repository: the body, or ``None`` when it answers 404."""
        ...


def build_referrer(subject: Descriptor, blob: Descriptor, store: BlobStore) -> Image:
    """The artifact manifest for ``blob`` (in ``store``) referring to ``subject``, stored."""
    config = store.put_bytes(b"{}", media_type=OCI_EMPTY)
    data = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": blob.media_type,
            "config": config.to_json(),
            "layers": [blob.to_json()],
            "subject": Descriptor(
                media_type=subject.media_type, digest=subject.digest, size=subject.size
            ).to_json(),
        }
    )
    manifest = store.put_bytes(data, media_type=OCI_MANIFEST)
    return Image(manifest=manifest, manifest_bytes=data, config=config, layers=(blob,), store=store)


def fallback_tag(subject: Digest) -> str:
    """The referrers tag of the spec's fallback: ``sha256-<hex>``."""
    algorithm, _, hexdigest = subject.partition(":")
    return f"{algorithm}-{hexdigest}"


def merge_referrers(existing: bytes | None, artifact: Image, artifact_type: str) -> bytes:
    """The fallback index with ``artifact`` listed once (``existing`` keeps its entries)."""
    entries: list[object] = []
    if existing is not None:
        try:
            found = json_object(existing).get("manifests")
        except ValueError as exc:
            raise RegistryError(f"the referrers index {exc}") from None
        entries = list(found) if isinstance(found, list) else []
    listed = {e.get("digest") for e in entries if isinstance(e, dict)}
    if artifact.digest not in listed:
        entries.append({**artifact.manifest.to_json(), "artifactType": artifact_type})
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


def attach_referrer(
    client: ReferrerRegistry,
    ref: ImageReference,
    subject: Descriptor,
    blob: Descriptor,
    store: BlobStore,
) -> str:
    """Push ``blob`` as a referrer of ``subject`` in ``ref``'s repository; a line saying where."""
    artifact = build_referrer(subject, blob, store)
    client.push_image(artifact, ref.with_digest(artifact.digest), store)
    if client.fetch_optional(ref, f"referrers/{subject.digest}") is not None:
        return f"attached SBOM {artifact.digest} to {ref.name}@{subject.digest}"
    tag = ref.with_tag(fallback_tag(subject.digest))
    index = merge_referrers(
        client.fetch_optional(tag, f"manifests/{tag.tag}"), artifact, blob.media_type
    )
    client.push_manifest(tag, index, media_type=OCI_INDEX)
    return f"attached SBOM {artifact.digest} to {ref.name}@{subject.digest} (tag {tag.tag})"


def attach_sboms(
    client: ReferrerRegistry, ref: ImageReference, finished: Finished
) -> tuple[str, ...]:
    """Attach each pushed image's SBOM (every platform's, for an index) as its referrer."""
    images = finished.image.images if isinstance(finished.image, ImageIndex) else (finished.image,)
    sboms = dict(finished.sboms)
    return tuple(
        attach_referrer(client, ref, image.manifest, sboms[image.digest], finished.image.store)
        for image in images
        if image.digest in sboms
    )

"""The distribution client: pull a base image, push images and indexes, and the registry sink.

Pulls resolve an index to one platform's manifest and verify every blob while it streams into
the ``BlobStore``. Pushes send the blobs the registry lacks (``sinks.upload``: skipped when
there, mounted from another repository when the client saw them there, whole or in chunks, a
few at a time), then child manifests by digest, then the tag: a push cut short leaves only
complete, digest-checked blobs and manifests behind, so pushing again picks up where it
stopped. Every body is replayable (bytes, or a stream that re-reads its file), so the shared
client's retry transport can send a request again after a 429 or a 5xx. Auth lives in
``sinks.auth``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import httpx

from imagebuild.digest import Digest, digest_bytes
from imagebuild.errors import ImageError, RegistryError
from imagebuild.image.descriptor import (
    CONFIG_TYPES,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
)
from imagebuild.image.model import BaseImage, Image, ImageIndex
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.net.http import client_policy
from imagebuild.net.transfer import body
from imagebuild.report import NullReporter
from imagebuild.sinks.auth import CredentialStore, Op, RegistrySession, error_code
from imagebuild.sinks.pulled import checked_config, descriptor_of, json_object_of, select_platform
from imagebuild.sinks.referrers import attach_sboms
from imagebuild.sinks.upload import (
    BLOBS_UNKNOWN,
    BlobOrigins,
    BlobsUnknown,
    BlobUploader,
    push_then_put,
)

if TYPE_CHECKING:
    from imagebuild.report import Reporter
    from imagebuild.sinks.sink import Finished

MANIFEST_ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"


class RegistryClient:
    """Pulls and pushes images over the OCI distribution API.

    ``http`` is the one client the CLI created (its timeouts, proxies, TLS settings and retry
    transport apply); ``credentials`` supplies logins, or ``None`` for anonymous access only.
    Every failure is a ``RegistryError`` whose message names the reference, the operation and
    a fix.
    """

    def __init__(self, http: httpx.Client, *, credentials: CredentialStore | None = None) -> None:
        self._session = RegistrySession(http, credentials=credentials)
        self._policy = client_policy(http)[0]
        # Where each blob was seen (pulled or pushed): a push to another repository of the
        # same registry mounts it from there instead of sending its bytes.
        self._origins = BlobOrigins()

    # -- pull ----------------------------------------------------------------------------

    def pull_image(
        self,
        ref: ImageReference,
        *,
        platform: Sequence[str] = ("linux", "amd64"),
        store: BlobStore,
        fetch_layers: bool = True,
    ) -> BaseImage:
        """Pull ``ref`` for ``platform`` (``(os, architecture[, variant])``) into ``store``.

        An index or manifest list is resolved to the first entry for the platform. Blobs
        already in ``store`` are not downloaded again; the others are verified while they
        stream in. A digest-pinned reference must match the bytes received. Manifests named
        by digest (the platform's, below an index; a pinned reference's) are kept in
        ``store`` too and read from there: a tag costs one request, a pinned base none.
        ``fetch_layers=False`` pulls the manifest and the config only: ``pull_layers`` brings
        the layers.
        """
        op = Op(ref, "pulling", "pull")
        obj, digest = self._platform_manifest(op, platform, store)
        config_desc = descriptor_of(obj.get("config"), op, "manifest config")
        if config_desc.media_type not in CONFIG_TYPES:
            raise RegistryError(
                f"pulling {ref}: config has media type {config_desc.media_type}, not an image"
            )
        raw_layers = obj.get("layers")
        if not isinstance(raw_layers, list):
            raise RegistryError(f"pulling {ref}: manifest has no layers list")
        layers = tuple(
            descriptor_of(raw, op, f"manifest layers[{i}]") for i, raw in enumerate(raw_layers)
        )
        self._ensure_blob(op, config_desc, store)
        config = json_object_of(store.read_bytes(config_desc.digest), op, "image config")
        diff_ids = checked_config(op, config, platform, len(layers))
        image = BaseImage(
            reference=str(ref),
            manifest_digest=digest,
            config=config,
            layers=layers,
            diff_ids=diff_ids,
        )
        if fetch_layers:
            self.pull_layers(ref, image, store)
        else:
            for layer in layers:  # a push may mount them from here, or fetch them then
                self._origins.remember(ref, layer.digest)
        return image

    def pull_layers(self, ref: ImageReference, image: BaseImage, store: BlobStore) -> None:
        """Bring the layers of ``image`` (pulled from ``ref``) into ``store``, verified."""
        op = Op(ref, "pulling", "pull")
        for layer in image.layers:
            self._ensure_blob(op, layer, store)

    def fetch_image_json(
        self, ref: ImageReference, *, platform: Sequence[str] = ("linux", "amd64")
    ) -> tuple[Digest, dict[str, object], dict[str, object]]:
        """The manifest at ``ref`` for ``platform`` (through an index), its digest, its config.

        Only the manifest and the config are read, the config checked against its digest:
        what ``imgbuild inspect`` shows, with no layer pulled.
        """
        op = Op(ref, "pulling", "pull")
        manifest, digest = self._platform_manifest(op, platform)
        desc = descriptor_of(manifest.get("config"), op, "manifest config")
        url = self._session.url(ref, f"blobs/{desc.digest}")
        resp = self._session.send(op, "GET", url, follow_redirects=True)
        if resp.status_code != 200:
            raise self._session.status_error(op, resp, f"blob {desc.digest}")
        if digest_bytes(resp.content) != desc.digest:
            raise RegistryError(
                f"pulling {ref}: config blob {desc.digest} does not match its digest",
                hint="the registry is serving bad data; retry",
            )
        return digest, manifest, json_object_of(resp.content, op, "image config")

    def _platform_manifest(
        self, op: Op, platform: Sequence[str], store: BlobStore | None = None
    ) -> tuple[dict[str, object], Digest]:
        """The image manifest at ``op.ref`` for ``platform`` (through an index) and its digest.

        With a ``store``, manifests named by digest come from it when it holds them, and go
        into it when fetched.
        """
        ref = op.ref
        data, media_type, digest = self._manifest(ref, None, store)
        if ref.digest is not None and digest != ref.digest:
            raise RegistryError(
                f"pulling {ref}: manifest hashes to {digest}, not the pinned digest",
                hint="the registry served different content; check the mirror or the digest",
            )
        obj = json_object_of(data, op, "manifest")
        if media_type in INDEX_TYPES:
            entry = select_platform(op, obj, platform)
            data, media_type, digest = self._manifest(
                ref.with_digest(entry.digest), entry.media_type, store
            )
            if digest != entry.digest:
                raise RegistryError(
                    f"pulling {ref}: platform manifest hashes to {digest}, "
                    f"the index says {entry.digest}"
                )
            obj = json_object_of(data, op, "manifest")
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(
                f"pulling {ref}: unsupported manifest media type {media_type!r}",
                hint="imgbuild reads OCI and Docker v2 schema 2 images",
            )
        return obj, digest

    # -- push ----------------------------------------------------------------------------

    def push_image(
        self,
        image: Image,
        ref: ImageReference,
        store: BlobStore | None = None,
        *,
        reporter: Reporter | None = None,
    ) -> Digest:
        """Push ``image`` (blobs from ``store``, default ``image.store``) to ``ref``.

        Blobs the repository has are skipped; the others are mounted or uploaded
        (``sinks.upload``), the layers a few at a time, then the config. The manifest goes
        last, to the tag (or the pinned digest), only once every blob is in: a failed blob
        leaves nothing tagged. Returns the manifest digest after checking the registry
        computed the same. ``reporter`` hears ``push`` progress, one count per blob.
        """
        report = reporter or NullReporter()
        store = store or image.store
        if ref.digest is not None and ref.digest != image.digest:
            raise RegistryError(
                f"pushing {ref}: the image's digest is {image.digest}",
                hint="push to a tag, or to the image's own digest",
            )
        unique = {d.digest: d for d in image.layers}.values()
        layers = [d for d in unique if d.digest != image.config.digest]
        total = len(layers) + 1
        report.progress("push", 0, total, "blobs")
        return self.push_with_blobs(
            ref,
            (layers, image.config),
            (image.manifest_bytes, image.manifest.media_type),
            store,
            lambda done: report.progress("push", done, total, "blobs"),
        )

    def push_with_blobs(
        self,
        ref: ImageReference,
        blobs: tuple[Sequence[Descriptor], Descriptor],
        manifest: tuple[bytes, str],
        store: BlobStore,
        progress: Callable[[int], None] | None = None,
    ) -> Digest:
        """Push ``blobs`` (layers, config) from ``store``, then ``manifest`` (bytes, type).

        As ``upload.push_then_put``: a blob taken as held that the registry lacks is sent.
        """
        op = Op(ref, "pushing", "pull,push")
        data, media_type = manifest
        return push_then_put(
            lambda trusting: self._uploader(op, store, trusting=trusting),
            *blobs,
            lambda: self.push_manifest(ref, data, media_type=media_type),
            progress,
        )

    def push_index(
        self, index: ImageIndex, ref: ImageReference, *, reporter: Reporter | None = None
    ) -> Digest:
        """Push every image of ``index`` by digest, then the index itself to ``ref``."""
        for image in index.images:
            self.push_image(image, ref.with_digest(image.digest), index.store, reporter=reporter)
        return self.push_manifest(ref, index.manifest_bytes, media_type=index.manifest.media_type)

    def push_manifest(self, ref: ImageReference, data: bytes, *, media_type: str) -> Digest:
        """PUT manifest (or index) ``data`` at ``ref``'s tag or digest; return its digest.

        The blobs (or child manifests) it references must already be in the repository.
        """
        op = Op(ref, "pushing", "pull,push")
        digest = digest_bytes(data)
        resp = self._session.send(
            op,
            "PUT",
            self._session.url(ref, f"manifests/{ref.reference}"),
            headers={"Content-Type": media_type},
            content=lambda: data,
        )
        if resp.status_code not in (200, 201):
            error = self._session.status_error(op, resp, "manifest upload")
            if error_code(resp) in BLOBS_UNKNOWN:
                raise BlobsUnknown(error.message, hint=error.hint)
            raise error
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise RegistryError(
                f"pushing {ref}: the registry stored the manifest as {returned}, expected {digest}",
                hint="the registry rewrote the manifest; push to a registry that keeps bytes",
            )
        return digest

    def fetch_optional(self, ref: ImageReference, path: str) -> bytes | None:
        """GET ``path`` in ``ref``'s repository (a manifest, ``referrers/<digest>``).

        The body, or ``None`` when the registry answers 404 (no such tag, or no such API).
        """
        op = Op(ref, "pulling", "pull")
        url = self._session.url(ref, path)
        resp = self._session.send(op, "GET", url, headers={"Accept": MANIFEST_ACCEPT})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._session.status_error(op, resp, path)
        return resp.content

    def _manifest(
        self, ref: ImageReference, media_type: str | None, store: BlobStore | None
    ) -> tuple[bytes, str, Digest]:
        """``fetch_manifest``, through ``store`` for a reference by digest.

        A kept manifest's media type is ``media_type`` (its index's word for it), else the one
        it names itself; one that names none is fetched again.
        """
        if store is None or ref.digest is None or not store.has(ref.digest):
            fetched = self.fetch_manifest(ref)
            if store is not None and ref.digest is not None and fetched[2] == ref.digest:
                store.put_bytes(fetched[0])
            return fetched
        data = store.read_bytes(ref.digest)
        if media_type is None:
            try:
                named = json.loads(data).get("mediaType")
            except (ValueError, AttributeError):
                named = None
            media_type = named if isinstance(named, str) and named else None
        if media_type is None:
            return self.fetch_manifest(ref)
        return data, media_type, ref.digest

    def fetch_manifest(self, ref: ImageReference) -> tuple[bytes, str, Digest]:
        """GET the manifest (or index) at ``ref``: ``(bytes, media type, digest of bytes)``."""
        op = Op(ref, "pulling", "pull")
        resp = self._session.send(
            op,
            "GET",
            self._session.url(ref, f"manifests/{ref.reference}"),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if resp.status_code != 200:
            raise self._session.status_error(op, resp, "manifest")
        data = resp.content
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES | INDEX_TYPES:
            # Some registries answer application/json; the document names its own type.
            try:
                declared = json.loads(data).get("mediaType")
            except (ValueError, AttributeError):
                declared = None
            if isinstance(declared, str) and declared:
                media_type = declared
        return data, media_type, digest_bytes(data)

    # -- blobs ---------------------------------------------------------------------------

    def pull_blob(self, ref: ImageReference, desc: Descriptor, store: BlobStore) -> None:
        """Fetch one blob of ``ref``'s repository into ``store`` (verified), unless there."""
        self._ensure_blob(Op(ref, "pulling", "pull"), desc, store)

    def note_blob(self, ref: ImageReference, digest: Digest) -> None:
        """Note that ``ref``'s repository holds ``digest``, its bytes not fetched.

        A manifest read there lists it: a push mounts it from there, or fetches it from
        there when it must send its bytes.
        """
        self._origins.remember(ref, digest)

    def _uploader(self, op: Op, store: BlobStore, *, trusting: bool = True) -> BlobUploader:
        return BlobUploader(
            self._session,
            op,
            store,
            origins=self._origins,
            policy=self._policy,
            fetch=partial(self._fetch_seen, store=store),
            trusting=trusting,
        )

    def _fetch_seen(self, desc: Descriptor, store: BlobStore) -> None:
        """Fetch ``desc`` into ``store`` from the latest repository it was seen in that serves it.

        Nothing when none does: the upload then says it is missing.
        """
        for registry, repository in self._origins.places(desc.digest):
            ref = ImageReference(registry=registry, repository=repository)
            try:
                self._ensure_blob(Op(ref, "pulling", "pull"), desc, store)
            except RegistryError:
                continue
            return

    def _ensure_blob(self, op: Op, desc: Descriptor, store: BlobStore) -> None:
        # The repository's manifest lists it: a later push may mount it from here.
        self._origins.remember(op.ref, desc.digest)
        if store.has(desc.digest):
            return
        url = self._session.url(op.ref, f"blobs/{desc.digest}")
        with self._session.stream(op, "GET", url, size=desc.size) as resp:
            if resp.status_code != 200:
                resp.read()
                raise self._session.status_error(op, resp, f"blob {desc.digest}")
            try:
                store.ingest(
                    body(resp),
                    media_type=desc.media_type,
                    expected=desc.digest,
                    expected_size=desc.size,
                )
            except ImageError as exc:
                raise RegistryError(
                    f"pulling {op.ref}: {exc.message}",
                    hint="the download was corrupted or the registry is serving bad data; retry",
                ) from None
            except httpx.HTTPError as exc:
                raise self._session.transport_error(op, exc) from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistrySink:
    """``--output registry``: push the image (or the index) to every tag."""

    client: RegistryClient
    """The client that pushes (the run's one client, with its logins)."""
    kind: str = field(default="registry", init=False)
    """The ``--output`` kind."""
    takes_index: bool = field(default=True, init=False)
    """A registry takes an image index as well as one image."""

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        """Push to each tag in turn; one ``pushed REF@DIGEST`` line per tag."""
        lines = []
        for ref in finished.tags:
            if isinstance(finished.image, ImageIndex):
                digest = self.client.push_index(finished.image, ref, reporter=reporter)
            else:
                digest = self.client.push_image(finished.image, ref, reporter=reporter)
            lines.append(f"pushed {ref}@{digest}")
            lines.extend(attach_sboms(self.client, ref, finished))
        return tuple(lines)

"""Layers kept in a registry by their cache key: CI's shared cache (``--cache-from/--cache-to``).

A runner that starts with an empty local cache asks the registry for each layer it would
build, by the same key the local layer cache uses (everything the layer's bytes depend
on). Each kept layer is a one-layer OCI image tagged ``<key>`` in the cache repository,
its manifest annotated with the layer's diff ID and history line, so a hit gives back the
very bytes a local build would write, and the image's digest is the same either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imagebuild.digest import Digest
from imagebuild.errors import ImageError
from imagebuild.image.descriptor import (
    LAYER_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    checked_digest,
    json_object,
)
from imagebuild.image.model import Layer
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.report import Reporter
from imagebuild.sinks.referrers import OCI_EMPTY
from imagebuild.sinks.remote import RegistryClient

_KEY = "org.imgbuild.cache.key"
_RECORD = "application/vnd.imgbuild.cache.record.v1+json"
"""The config media type of a kept record: a manifest with no layers, the record its config."""
_DIFF_ID = "org.imgbuild.layer.diff-id"
_CREATED_BY = "org.imgbuild.layer.created-by"
_SET = "application/vnd.imgbuild.cache.layer-set.v1"
"""The artifact type of a set: one manifest naming a plan's layers (``keep_set``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistryLayerCache:
    """Reads layers from ``source`` and keeps new ones in ``target`` (either may be absent)."""

    client: RegistryClient
    """The run's registry client (its logins, retries and timeouts)."""
    store: BlobStore
    """Where a found layer's blob is fetched to."""
    source: ImageReference | None
    """The repository layers are looked up in (``--cache-from``)."""
    target: ImageReference | None
    """The repository new layers are kept in (``--cache-to``)."""
    fetch_blobs: bool = True
    """Whether a found layer's blob is fetched. Not when every output is a registry push:
    the push mounts it from the cache repository, and fetches it only to send its bytes
    (``sinks.upload``)."""

    asked: dict[str, Future[Layer | None]] = field(default_factory=dict, init=False, repr=False)
    """Lookups started ahead by ``ask``, by key."""

    @property
    def keeps(self) -> bool:
        """Whether the ``keep`` methods keep anything: a ``--cache-to`` repository is named."""
        return self.target is not None

    def ask(self, keys: Sequence[str]) -> None:
        """Start looking for ``keys`` now, a few at a time; ``find`` then takes the answers.

        All of them are first looked up as one set (``keep_set``): a runner asking for a
        plan another kept whole gets its layers' manifests in one request, not one each.
        """
        keys = [key for key in keys if key not in self.asked]
        if self.source is None or not keys:
            return
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="imgbuild-ahead")
        whole = pool.submit(self._find_set, keys) if len(keys) > 1 else None
        for key in keys:
            self.asked[key] = pool.submit(self._find_in, key, whole)
        pool.shutdown(wait=False)  # its threads end with the last lookup

    def find(self, key: str) -> Layer | None:
        """The layer kept under ``key``; None if not kept.

        Its blob is fetched and verified, unless not ``fetch_blobs``.
        """
        ahead = self.asked.pop(key, None)
        return ahead.result() if ahead is not None else self._find(key)

    def _find(self, key: str) -> Layer | None:
        if self.source is None:
            return None
        ref = self.source.with_tag(key)
        try:
            data = self.client.fetch_optional(ref, f"manifests/{key}")
            if data is None:
                return None
            layer = _layer_of(json_object(data), key)
        except (ValueError, ImageError):
            return None  # not ours, or damaged: build the layer instead
        self._bring(ref, layer)
        return layer

    def _bring(self, ref: ImageReference, layer: Layer) -> None:
        """Fetch ``layer``'s blob from ``ref``'s repository (or note it is there).

        Not ``fetch_blobs``: only noted, as where a push mounts it from.
        """
        if self.fetch_blobs:
            self.client.pull_blob(ref, _descriptor(layer), self.store)
        else:
            self.client.note_blob(ref, layer.digest)

    def _find_set(self, keys: Sequence[str]) -> dict[str, Layer]:
        """The layers kept as the set of ``keys``, by key (their blobs not fetched yet)."""
        assert self.source is not None
        tag = f"set-{_set_key(keys)}"
        try:
            data = self.client.fetch_optional(self.source.with_tag(tag), f"manifests/{tag}")
            return _layers_of_set(json_object(data), _set_key(keys)) if data is not None else {}
        except (ValueError, ImageError):
            return {}  # not ours, or damaged: each layer is looked up alone

    def _find_in(self, key: str, whole: Future[dict[str, Layer]] | None) -> Layer | None:
        """The layer ``key`` as the set ``whole`` names it (its blob fetched), else alone."""
        layer = whole.result().get(key) if whole is not None else None
        if layer is None or self.source is None:
            return self._find(key)
        try:
            self._bring(self.source.with_tag(key), layer)
        except ImageError:
            return self._find(key)
        return layer

    def keep_set(self, layers: Sequence[tuple[str, Layer]]) -> None:
        """Keep ``layers`` (a plan's, bottom first) as one set, unless it is kept already.

        One manifest naming every layer, with the annotations each layer's own carries; the
        blobs are put in the target repository first (where they are, a HEAD each).
        """
        if self.target is None or len(layers) < 2:
            return
        key = _set_key([layer_key for layer_key, _ in layers])
        ref = self.target.with_tag(f"set-{key}")
        if self.client.fetch_optional(ref, f"manifests/set-{key}") is not None:
            return
        config = self.store.put_bytes(b"{}", media_type=OCI_EMPTY)
        self._push_kept(
            f"set-{key}",
            key,
            _SET,
            config,
            [_descriptor(layer) for _, layer in layers],
            annotations=[
                {_KEY: layer_key, _DIFF_ID: layer.diff_id, _CREATED_BY: layer.created_by}
                for layer_key, layer in layers
            ],
        )

    def find_record(self, key: str) -> bytes | None:
        """The record kept under ``key`` (bytes verified against their digest), or None."""
        config = self._fetch_kept(f"record-{key}", lambda manifest: _record_of(manifest, key))
        return self.store.read_bytes(config.digest) if config is not None else None

    def keep_record(self, key: str, data: bytes) -> None:
        """Keep ``data`` under ``key``: a manifest with no layers whose config is the record."""
        if self.target is None:
            return
        config = self.store.put_bytes(data, media_type=_RECORD)
        self._push_kept(f"record-{key}", key, _RECORD, config, [])

    def find_file(self, key: str, media_type: str) -> Path | None:
        """The file of ``media_type`` kept under ``key`` (in the store, verified), or None."""
        blob = self._fetch_kept(f"file-{key}", lambda manifest: _file_of(manifest, key, media_type))
        return self.store.path(blob.digest) if blob is not None else None

    def keep_file(self, key: str, media_type: str, make: Callable[[Path], None]) -> None:
        """Keep the file ``make`` writes (given a path) under ``key``, unless one is kept.

        The registry is asked first, so a file kept already is not made again.
        """
        if self.target is None:
            return
        tag = f"file-{key}"
        if self.client.fetch_optional(self.target.with_tag(tag), f"manifests/{tag}") is not None:
            return
        with self.store.temp_file() as out:
            make(out)
            blob = self.store.put_file(out, media_type=media_type)
        config = self.store.put_bytes(b"{}", media_type=OCI_EMPTY)
        self._push_kept(tag, key, media_type, config, [blob])

    def _fetch_kept(
        self, tag: str, blob_of: Callable[[dict[str, object]], Descriptor]
    ) -> Descriptor | None:
        """The blob the manifest tagged ``tag`` names (``blob_of``), fetched into the store.

        None when nothing is kept under the tag, or what is kept is not ours or is damaged.
        """
        if self.source is None:
            return None
        ref = self.source.with_tag(tag)
        try:
            data = self.client.fetch_optional(ref, f"manifests/{tag}")
            if data is None:
                return None
            blob = blob_of(json_object(data))
            self.client.pull_blob(ref, blob, self.store)
        except (ValueError, ImageError):
            return None  # do without it: work it out, or build it, instead
        return blob

    def _push_kept(
        self,
        tag: str,
        key: str,
        artifact_type: str,
        config: Descriptor,
        layers: Sequence[Descriptor],
        *,
        annotations: Sequence[dict[str, str]] = (),
    ) -> None:
        """Push ``layers`` and ``config`` (in the store) and a manifest of them, tagged ``tag``.

        ``annotations``: each layer's own, in the manifest's list (none when empty).
        """
        assert self.target is not None
        entries = [desc.to_json() for desc in layers]
        for entry, own in zip(entries, annotations, strict=False):
            entry["annotations"] = own
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": config.to_json(),
            "layers": entries,
            "annotations": {_KEY: key},
        }
        self.client.push_with_blobs(
            self.target.with_tag(tag),
            (layers, config),
            (canonical_json(manifest), OCI_MANIFEST),
            self.store,
        )

    def keep(self, kept: Sequence[tuple[str, Layer]], reporter: Reporter) -> None:
        """Push each ``(key, layer)`` to the target repository, a few at a time."""
        if self.target is None or not kept:
            return
        reporter.step(f"cache: keeping {len(kept)} layer(s) in {self.target.name}")
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="imgbuild-cache") as pool:
            list(pool.map(lambda item: self._keep_one(*item), kept))

    def _keep_one(self, key: str, layer: Layer) -> None:
        assert self.target is not None
        ref = self.target.with_tag(key)
        config = canonical_json(
            {
                "architecture": "unknown",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
            }
        )
        config_desc = self.store.put_bytes(config, media_type=OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [_descriptor(layer).to_json()],
            "annotations": {_KEY: key, _DIFF_ID: layer.diff_id, _CREATED_BY: layer.created_by},
        }
        self.client.push_with_blobs(
            ref,
            ([_descriptor(layer)], config_desc),
            (canonical_json(manifest), OCI_MANIFEST),
            self.store,
        )


def _set_key(keys: Sequence[str]) -> str:
    """The name of the set of the layers ``keys`` name, in their order."""
    return hashlib.sha256("\n".join(["imgbuild layer set 1", *keys]).encode()).hexdigest()


def _layers_of_set(manifest: dict[str, object], key: str) -> dict[str, Layer]:
    """The layers a set's manifest names, by key; ValueError when it is not one for ``key``."""
    annotations, entries = manifest.get("annotations"), manifest.get("layers")
    if not isinstance(annotations, dict) or annotations.get(_KEY) != key:
        raise ValueError("not a set kept under this key")
    if not isinstance(entries, list):
        raise ValueError("a kept set's manifest lists its layers")
    found = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("annotations"), dict):
            raise ValueError("a kept set's layer has no annotations")
        layer_key = entry["annotations"].get(_KEY)
        one = {"annotations": entry["annotations"], "layers": [entry]}
        found[str(layer_key)] = _layer_of(one, str(layer_key))
    return found


def _descriptor(layer: Layer) -> Descriptor:
    return Descriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size)


def _one_blob(
    manifest: dict[str, object], key: str, what: str
) -> tuple[dict[str, object], Descriptor]:
    """The annotations and the one blob of a manifest kept under ``key``.

    ValueError when the manifest is not one of ours for ``key`` (``what``: a layer, a file).
    """
    annotations = manifest.get("annotations")
    layers = manifest.get("layers")
    if not isinstance(annotations, dict) or annotations.get(_KEY) != key:
        raise ValueError(f"not a {what} kept under this key")
    if not isinstance(layers, list) or len(layers) != 1:
        raise ValueError(f"a kept {what}'s manifest has one blob")
    return annotations, Descriptor.from_json(layers[0], where=f"cached {what}")


def _file_of(manifest: dict[str, object], key: str, media_type: str) -> Descriptor:
    """The one blob of a kept file's manifest; ValueError when it is not one for ``key``."""
    _, blob = _one_blob(manifest, key, "file")
    if blob.media_type != media_type:
        raise ValueError(f"a kept file is {blob.media_type}, not {media_type}")
    return blob


def _record_of(manifest: dict[str, object], key: str) -> Descriptor:
    """The config of a record's manifest; ValueError when it is not one of ours for ``key``."""
    annotations = manifest.get("annotations")
    if not isinstance(annotations, dict) or annotations.get(_KEY) != key:
        raise ValueError("not a record kept under this key")
    config = Descriptor.from_json(manifest.get("config"), where="cached record")
    if config.media_type != _RECORD or config.size > _RECORD_LIMIT:
        raise ValueError(f"a record's config is {config.media_type} of {config.size} bytes")
    return config


_RECORD_LIMIT = 16 << 20
"""The largest record taken from a registry (a record is read into memory)."""


def _layer_of(manifest: dict[str, object], key: str) -> Layer:
    """The layer a cache manifest describes; ValueError when it is not one of ours for ``key``."""
    annotations, desc = _one_blob(manifest, key, "layer")
    if desc.media_type not in LAYER_TYPES:
        raise ValueError(f"media type {desc.media_type} is not a layer")
    created_by = annotations.get(_CREATED_BY)
    return Layer(
        digest=desc.digest,
        diff_id=Digest(checked_digest(str(annotations.get(_DIFF_ID)))),
        size=desc.size,
        media_type=desc.media_type,
        created_by=created_by if isinstance(created_by, str) else "",
    )

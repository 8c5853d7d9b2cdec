"""Config, manifest and index bytes: an image assembled from a base, our layers and settings.

``build_config`` is pure; ``build_image`` and ``build_index`` store what they assemble (config,
manifest, index) in a ``BlobStore`` and return the values that describe them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from imagebuild.errors import ImageError
from imagebuild.image.descriptor import (
    DOCKER_TO_OCI_LAYER,
    LAYER_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    json_object,
)
from imagebuild.image.model import BaseImage, Image, ImageConfig, ImageIndex, Layer
from imagebuild.image.store import BlobStore


def _as_str_list(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _as_str_dict(value: object) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return {}


def _merge_env(base_env: Sequence[str], ours: Sequence[tuple[str, str]]) -> list[str]:
    ours_names = {name for name, _ in ours}
    for name, _ in ours:
        if not name or "=" in name:
            raise ImageError(f"environment variable name {name!r} is invalid")
    kept = [item for item in base_env if item.partition("=")[0] not in ours_names]
    return kept + [f"{name}={value}" for name, value in ours]


def _normalize_port(port: str) -> str:
    number, _, proto = port.partition("/")
    proto = proto or "tcp"
    if not number.isdigit() or not 0 < int(number) < 65536 or proto not in ("tcp", "udp", "sctp"):
        raise ImageError(f"exposed port {port!r} is invalid; use e.g. '8000' or '53/udp'")
    return f"{int(number)}/{proto}"


def _oci_layer_descriptor(desc: Descriptor, *, where: str) -> Descriptor:
    media_type = DOCKER_TO_OCI_LAYER.get(desc.media_type, desc.media_type)
    if media_type not in LAYER_TYPES:
        raise ImageError(f"{where} {desc.digest}: unsupported layer media type {desc.media_type}")
    return Descriptor(
        media_type=media_type, digest=desc.digest, size=desc.size, annotations=desc.annotations
    )


def build_config(
    base: BaseImage | None,
    layers: Sequence[Layer],
    *,
    config: ImageConfig,
    created: str,
    platform: tuple[str, str] = ("linux", "amd64"),
) -> dict[str, object]:
    """Return the image config JSON object (pure; ``build_image`` stores it).

    From the base: ``architecture``, ``os``, ``variant``, ``os.version``, ``os.features``, its
    history and every ``config`` field we don't override. ``platform`` is used only without a
    base. ``created`` (RFC 3339, from ``SOURCE_DATE_EPOCH``) dates the image and our history.
    """
    base_config: Mapping[str, object] = base.config if base is not None else {}
    out: dict[str, object] = {}
    if base is not None:
        for key in ("architecture", "os", "variant", "os.version", "os.features"):
            if base_config.get(key) is not None:
                out[key] = copy.deepcopy(base_config[key])
        if not isinstance(out.get("architecture"), str) or not isinstance(out.get("os"), str):
            raise ImageError(f"base image {base.reference}: config lacks architecture/os")
    else:
        out["os"], out["architecture"] = platform

    out["config"] = _inner_config(base_config, config)

    base_history = base_config.get("history")
    history: list[object] = copy.deepcopy(base_history) if isinstance(base_history, list) else []
    for layer in layers:
        history.append({"created": created, "created_by": layer.created_by})
    out["history"] = history
    out["created"] = created

    base_diff_ids = list(base.diff_ids) if base is not None else []
    out["rootfs"] = {
        "type": "layers",
        "diff_ids": base_diff_ids + [layer.diff_id for layer in layers],
    }
    return out


def _inner_config(base_config: Mapping[str, object], config: ImageConfig) -> dict[str, object]:
    """The base's ``config`` object with our settings applied over it."""
    raw_inner = base_config.get("config")
    inner: dict[str, object] = copy.deepcopy(dict(raw_inner)) if isinstance(raw_inner, dict) else {}
    inner = {k: v for k, v in inner.items() if v is not None}

    env = _merge_env(_as_str_list(inner.get("Env")) or [], config.env)
    if env:
        inner["Env"] = env
    if config.entrypoint is not None:
        inner["Entrypoint"] = list(config.entrypoint)
        if config.cmd is None:
            inner.pop("Cmd", None)
    if config.cmd is not None:
        inner["Cmd"] = list(config.cmd)
    if config.user is not None:
        inner["User"] = config.user
    if config.workdir is not None:
        if not config.workdir.startswith("/"):
            raise ImageError(f"working directory {config.workdir!r} must be an absolute path")
        inner["WorkingDir"] = config.workdir
    if config.labels:
        labels = _as_str_dict(inner.get("Labels"))
        labels.update(dict(config.labels))
        inner["Labels"] = labels
    if config.exposed_ports:
        ports = inner.get("ExposedPorts")
        merged: dict[str, object] = dict(ports) if isinstance(ports, dict) else {}
        for port in config.exposed_ports:
            merged[_normalize_port(port)] = {}
        inner["ExposedPorts"] = merged
    return inner


def build_image(
    base: BaseImage | None,
    layers: Sequence[Layer],
    *,
    config: ImageConfig,
    created: str,
    store: BlobStore,
    annotations: Mapping[str, str] | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
    blobs_in_store: bool = True,
) -> Image:
    """Assemble config and manifest for ``base`` + ``layers`` and store both in ``store``.

    Base layers keep their bytes; Docker layer media types become their OCI equivalents.
    ``annotations`` go on the manifest. ``platform`` (os, architecture) applies only without
    a base. Every layer blob, ours and the base's, must already be in ``store``; unless not
    ``blobs_in_store``: an image only pushed, whose layers may stay in their registry.
    """
    where = f"base image {base.reference} layer" if base is not None else "layer"
    base_layers = tuple(
        _oci_layer_descriptor(d, where=where) for d in (base.layers if base is not None else ())
    )
    if base is not None and len(base.layers) != len(base.diff_ids):
        raise ImageError(
            f"base image {base.reference}: {len(base.layers)} layers but "
            f"{len(base.diff_ids)} diff_ids in its config"
        )
    all_layers = base_layers + tuple(layer.descriptor for layer in layers)
    missing = [d for d in all_layers if not store.has(d.digest)] if blobs_in_store else []
    if missing:
        raise ImageError(f"layer {missing[0].digest} is missing from the blob store {store.root}")

    config_obj = build_config(base, layers, config=config, created=created, platform=platform)
    config_desc = store.put_bytes(canonical_json(config_obj), media_type=OCI_CONFIG)

    manifest_obj: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in all_layers],
    }
    if annotations:
        manifest_obj["annotations"] = dict(annotations)
    manifest_bytes = canonical_json(manifest_obj)
    manifest_desc = store.put_bytes(manifest_bytes, media_type=OCI_MANIFEST)
    return Image(
        manifest=manifest_desc,
        manifest_bytes=manifest_bytes,
        config=config_desc,
        layers=all_layers,
        store=store,
        platform=(str(config_obj["os"]), str(config_obj["architecture"])),
    )


def build_index(images: Sequence[Image], store: BlobStore) -> ImageIndex:
    """An OCI image index over ``images`` (one per platform, in this order), stored."""
    platforms = [image.platform for image in images]
    if len(set(platforms)) != len(platforms):
        raise ImageError(f"an image index needs one image per platform, got {platforms}")
    data = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**image.manifest.to_json(), **platform_entry(image)} for image in images
            ],
        }
    )
    return ImageIndex(
        manifest=store.put_bytes(data, media_type=OCI_INDEX),
        manifest_bytes=data,
        images=tuple(images),
        store=store,
    )


def platform_entry(image: Image) -> dict[str, object]:
    """The ``platform`` member of ``image``'s entry in an index."""
    os_name, arch = image.platform
    return {"platform": {"architecture": arch, "os": os_name}}


EPOCH = "1970-01-01T00:00:00Z"
"""The date of images that depend on their contents only (built bases and what is stacked
on them before the project's layers)."""


def stack_layer(base: BaseImage, layer: Layer, store: BlobStore) -> BaseImage:
    """``base`` with ``layer`` on top, as a base the rest of a build starts from.

    Its config and manifest are stored (dated ``EPOCH``), so it has a manifest digest of its
    own, derived only from ``base`` and ``layer``.
    """
    image = build_image(base, [layer], config=ImageConfig(), created=EPOCH, store=store)
    return BaseImage(
        reference=base.reference,
        manifest_digest=image.digest,
        config=json_object(store.read_bytes(image.config.digest)),
        layers=(*base.layers, layer.descriptor),
        diff_ids=(*base.diff_ids, layer.diff_id),
    )

"""Two images compared layer by layer, and two layers compared file by file.

What ``imgbuild verify`` reports when a rebuild is not the published image: the first layer
whose blob differs and, in it, each member whose name, type, size, mode, link target or
content differs (members are read from both gzip tars, content hashed as it streams).
When every layer is the same blob, the configuration is what differs, and its keys are named.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass

from imagebuild.digest import Digest
from imagebuild.errors import ImageError
from imagebuild.image.descriptor import Descriptor
from imagebuild.image.store import BlobStore

_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageView:
    """One platform's image as compared: its layers, config and where its blobs are."""

    platform: str
    """``os/arch``."""
    digest: Digest
    """The image manifest's digest."""
    layers: tuple[Descriptor, ...]
    """Layer descriptors, bottom first."""
    config: Mapping[str, object]
    """The image config, parsed."""
    store: BlobStore
    """Holds every layer blob."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Member:
    """One tar member, as far as it decides the files of a container."""

    kind: str
    """``file``, ``dir``, ``symlink``, ``hardlink`` or ``other``."""
    size: int
    """Bytes of content (0 for all but files)."""
    mode: int
    """Permission bits."""
    target: str
    """Link target (empty for all but links)."""
    sha256: str
    """Hex digest of the content (empty for all but files)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerDifference:
    """The first layer that differs between two images of one platform."""

    platform: str
    """``os/arch``."""
    position: int
    """1-based layer number, bottom first."""
    count: int
    """Layers in the rebuilt image."""
    created_by: str
    """What made the layer (the rebuilt image's history, else the published one's)."""
    published: Digest | None
    """The published layer's digest (``None``: the published image has fewer layers)."""
    rebuilt: Digest | None
    """The rebuilt layer's digest (``None``: the rebuilt image has fewer layers)."""
    changed: tuple[str, ...] = ()
    """Paths in both layers that differ (content, size, mode, type or link target)."""
    only_published: tuple[str, ...] = ()
    """Paths only the published layer has."""
    only_rebuilt: tuple[str, ...] = ()
    """Paths only the rebuilt layer has."""
    config_keys: tuple[str, ...] = ()
    """When every layer is the same: the config keys that differ (``config.Env``, ...)."""


def compare_images(published: ImageView, rebuilt: ImageView) -> LayerDifference | None:
    """The first difference between two images of one platform, or ``None`` if identical."""
    if published.digest == rebuilt.digest:
        return None
    history = _history(rebuilt.config) or _history(published.config)
    count = max(len(published.layers), len(rebuilt.layers))
    for index in range(count):
        ours = rebuilt.layers[index] if index < len(rebuilt.layers) else None
        theirs = published.layers[index] if index < len(published.layers) else None
        if ours is not None and theirs is not None and ours.digest == theirs.digest:
            continue
        # History has entries for layers and for empty steps: count from the top.
        from_top = count - index
        created_by = history[-from_top] if from_top <= len(history) else "base layer"
        difference = LayerDifference(
            platform=rebuilt.platform,
            position=index + 1,
            count=len(rebuilt.layers),
            created_by=created_by,
            published=theirs.digest if theirs else None,
            rebuilt=ours.digest if ours else None,
        )
        if ours is None or theirs is None:
            return difference
        return _with_files(difference, published.store, theirs, rebuilt.store, ours)
    return LayerDifference(
        platform=rebuilt.platform,
        position=0,
        count=len(rebuilt.layers),
        created_by="image config",
        published=None,
        rebuilt=None,
        config_keys=config_differences(published.config, rebuilt.config),
    )


def _with_files(
    difference: LayerDifference,
    published_store: BlobStore,
    published: Descriptor,
    rebuilt_store: BlobStore,
    rebuilt: Descriptor,
) -> LayerDifference:
    theirs = layer_members(published_store, published)
    ours = layer_members(rebuilt_store, rebuilt)
    return LayerDifference(
        platform=difference.platform,
        position=difference.position,
        count=difference.count,
        created_by=difference.created_by,
        published=difference.published,
        rebuilt=difference.rebuilt,
        changed=tuple(sorted(n for n in ours.keys() & theirs.keys() if ours[n] != theirs[n])),
        only_published=tuple(sorted(theirs.keys() - ours.keys())),
        only_rebuilt=tuple(sorted(ours.keys() - theirs.keys())),
    )


def layer_members(store: BlobStore, layer: Descriptor) -> dict[str, Member]:
    """Every member of the layer tar ``layer`` (gzip or plain) in ``store``, by path."""
    members: dict[str, Member] = {}
    path = store.path(layer.digest)
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for info in tar:
                members[info.name.removeprefix("./").rstrip("/")] = _member(tar, info)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(
            f"layer {layer.digest} cannot be read as a tar: {exc}",
            hint="clear the cache (or pull again) and rerun",
        ) from exc
    return members


def _member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Member:
    digest = ""
    if info.isfile():
        handle = tar.extractfile(info)
        sha = hashlib.sha256()
        if handle is not None:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
        digest = sha.hexdigest()
    kind = (
        "file"
        if info.isfile()
        else "dir"
        if info.isdir()
        else "symlink"
        if info.issym()
        else "hardlink"
        if info.islnk()
        else "other"
    )
    return Member(
        kind=kind,
        size=info.size if info.isfile() else 0,
        mode=info.mode & 0o7777,
        target=info.linkname if info.issym() or info.islnk() else "",
        sha256=digest,
    )


def config_differences(a: Mapping[str, object], b: Mapping[str, object]) -> tuple[str, ...]:
    """Dotted keys whose values differ between two configs (``config.Env``, ``created``)."""
    keys: list[str] = []
    for key in sorted(a.keys() | b.keys()):
        left, right = a.get(key), b.get(key)
        if left == right:
            continue
        if isinstance(left, dict) and isinstance(right, dict):
            keys.extend(f"{key}.{inner}" for inner in config_differences(left, right))
        else:
            keys.append(key)
    return tuple(keys)


def _history(config: Mapping[str, object]) -> list[str]:
    """``created_by`` of the history entries that made a layer, in order."""
    raw = config.get("history")
    entries = raw if isinstance(raw, list) else []
    return [
        str(entry.get("created_by", ""))
        for entry in entries
        if isinstance(entry, dict) and not entry.get("empty_layer")
    ]

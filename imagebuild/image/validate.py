"""Validation: re-read every blob of an OCI layout or archive and check it against its names.

Digests, sizes and media types are checked from the index down (nested indexes too), every
layer is decompressed and hashed against its ``diff_id``, and a docker-archive
``manifest.json`` must agree with the OCI manifests beside it.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from imagebuild.digest import Digest, digest_bytes, digest_hex
from imagebuild.errors import ImageError
from imagebuild.image.descriptor import (
    CONFIG_TYPES,
    DOCKER_TO_OCI_LAYER,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYOUT_VERSION,
    Descriptor,
    json_object,
)

_CHUNK = 1 << 20


class _LayoutSource(Protocol):
    """Read access to the files of an OCI layout, on disk or inside a tar."""

    def describe(self) -> str: ...

    def exists(self, name: str) -> bool: ...

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]: ...


@dataclass(frozen=True, slots=True)
class _DirSource:
    root: Path

    def describe(self) -> str:
        return f"OCI layout {self.root}"

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        with (self.root / name).open("rb") as f:
            yield f


class _TarSource:
    def __init__(self, path: Path, tar: tarfile.TarFile) -> None:
        self._path = path
        self._tar = tar
        self._members = {
            m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers() if m.isfile()
        }

    def describe(self) -> str:
        return f"archive {self._path}"

    def exists(self, name: str) -> bool:
        return name in self._members

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        f = self._tar.extractfile(self._members[name])
        assert f is not None
        with f:
            yield f


def validate_layout(layout_dir: Path) -> None:
    """Re-read and check every blob an OCI layout directory references; raise ``ImageError``.

    Checks ``oci-layout``, each blob's digest, size and media type (index → manifest → config
    and layers, nested indexes too), that ``rootfs.diff_ids`` has one entry per layer, that each
    layer decompresses to its diff_id, and ``manifest.json`` (when present) against the index.
    """
    if not layout_dir.is_dir():
        raise ImageError(f"OCI layout {layout_dir} is not a directory")
    _validate(_DirSource(layout_dir))


def validate_archive(archive: Path) -> None:
    """``validate_layout`` for a tar archive (``write_oci_archive`` / ``write_docker_archive``)."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            _validate(_TarSource(archive, tar))
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"archive {archive}: cannot read: {exc}") from exc


class LayoutReader:
    """Checked reads from an OCI layout (directory or archive): its index and JSON blobs."""

    def __init__(self, src: _LayoutSource) -> None:
        self._src = src

    def index(self) -> dict[str, object]:
        """``index.json``, which must be a JSON object."""
        index = _load_json_file(self._src, "index.json")
        if not isinstance(index, dict):
            raise ImageError(f"{self._src.describe()}: index.json is not a JSON object")
        return index

    def json_blob(self, desc: Descriptor, what: str) -> dict[str, object]:
        """The blob ``desc`` names, checked against its digest and size, as a JSON object."""
        return _json_object(_read_blob(self._src, desc, what), self._src, what, desc.digest)


@contextmanager
def layout_reader(path: Path, *, archive: bool) -> Iterator[LayoutReader]:
    """A reader over the layout directory ``path``, or over the tar ``path`` if ``archive``."""
    if not archive:
        if not path.is_dir():
            raise ImageError(f"OCI layout {path} is not a directory")
        yield LayoutReader(_DirSource(path))
        return
    with tarfile.open(path, mode="r:*") as tar:
        yield LayoutReader(_TarSource(path, tar))


def _load_json_file(src: _LayoutSource, name: str) -> object:
    if not src.exists(name):
        raise ImageError(f"{src.describe()}: {name} is missing")
    with src.open(name) as f:
        data = f.read()
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{src.describe()}: {name} is not valid JSON: {exc}") from None


def _read_blob(src: _LayoutSource, desc: Descriptor, what: str) -> bytes:
    name = f"blobs/sha256/{digest_hex(desc.digest)}"
    if not src.exists(name):
        raise ImageError(f"{src.describe()}: {what} blob {desc.digest} is missing")
    with src.open(name) as f:
        data = f.read()
    _check_blob(src, desc, what, digest_bytes(data), len(data))
    return data


def _check_blob(src: _LayoutSource, desc: Descriptor, what: str, actual: Digest, size: int) -> None:
    if actual != desc.digest:
        raise ImageError(
            f"{src.describe()}: {what} blob {desc.digest} is corrupt (content hashes to {actual})"
        )
    if size != desc.size:
        raise ImageError(
            f"{src.describe()}: {what} blob {desc.digest} has {size} bytes, "
            f"descriptor says {desc.size}"
        )


def _json_object(data: bytes, src: _LayoutSource, what: str, digest: Digest) -> dict[str, object]:
    try:
        return json_object(data)
    except ValueError as exc:
        raise ImageError(f"{src.describe()}: {what} blob {digest} {exc}") from None


def _validate(src: _LayoutSource) -> None:
    layout = _load_json_file(src, "oci-layout")
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
        raise ImageError(f"{src.describe()}: oci-layout must say imageLayoutVersion 1.0.0")
    index = _load_json_file(src, "index.json")
    if not isinstance(index, dict) or index.get("schemaVersion") != 2:
        raise ImageError(f"{src.describe()}: index.json is not a schemaVersion 2 image index")
    manifests = _validate_index(src, index, "index.json")
    if src.exists("manifest.json"):
        _validate_docker_manifest(src, manifests)


def _validate_index(
    src: _LayoutSource, index: dict[str, object], where: str
) -> dict[Digest, dict[str, object]]:
    """Validate every manifest an index references; return manifests by digest."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{src.describe()}: {where} has no manifests list")
    found: dict[Digest, dict[str, object]] = {}
    for i, raw in enumerate(entries):
        desc = Descriptor.from_json(raw, where=f"{src.describe()}: {where} manifests[{i}]")
        data = _read_blob(src, desc, "manifest")
        obj = _json_object(data, src, "manifest", desc.digest)
        declared = obj.get("mediaType")
        if declared is not None and declared != desc.media_type:
            raise ImageError(
                f"{src.describe()}: manifest blob {desc.digest} says mediaType {declared}, "
                f"its descriptor {desc.media_type}"
            )
        if desc.media_type in INDEX_TYPES:
            found.update(_validate_index(src, obj, f"index {desc.digest}"))
        elif desc.media_type in MANIFEST_TYPES:
            _validate_manifest(src, desc, obj)
            found[desc.digest] = obj
        else:
            raise ImageError(
                f"{src.describe()}: manifest blob {desc.digest} has unsupported media type "
                f"{desc.media_type}"
            )
    return found


def _validate_manifest(src: _LayoutSource, desc: Descriptor, manifest: dict[str, object]) -> None:
    where = f"{src.describe()}: manifest {desc.digest}"
    if manifest.get("schemaVersion") != 2:
        raise ImageError(f"{where}: schemaVersion must be 2")
    config_desc = Descriptor.from_json(manifest.get("config"), where=f"{where} config")
    if config_desc.media_type not in CONFIG_TYPES:
        raise ImageError(
            f"{where}: config blob {config_desc.digest} has unexpected media type "
            f"{config_desc.media_type}"
        )
    config = _json_object(_read_blob(src, config_desc, "config"), src, "config", config_desc.digest)
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{where}: layers missing")
    layers = [
        Descriptor.from_json(raw, where=f"{where} layers[{i}]") for i, raw in enumerate(raw_layers)
    ]
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"{where}: config {config_desc.digest} has no rootfs.diff_ids")
    if len(diff_ids) != len(layers):
        raise ImageError(
            f"{where}: {len(layers)} layers but config {config_desc.digest} lists "
            f"{len(diff_ids)} diff_ids"
        )
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        _validate_layer(src, layer, diff_id)


def _validate_layer(src: _LayoutSource, desc: Descriptor, diff_id: object) -> None:
    media_type = DOCKER_TO_OCI_LAYER.get(desc.media_type, desc.media_type)
    if media_type not in (OCI_LAYER_GZIP, OCI_LAYER_TAR):
        raise ImageError(
            f"{src.describe()}: layer blob {desc.digest} has media type {desc.media_type}, "
            "which imgbuild cannot verify (only tar and tar+gzip layers)"
        )
    name = f"blobs/sha256/{digest_hex(desc.digest)}"
    if not src.exists(name):
        raise ImageError(f"{src.describe()}: layer blob {desc.digest} is missing")
    blob_sha = hashlib.sha256()
    tar_sha = hashlib.sha256()
    size = 0
    inflate = zlib.decompressobj(wbits=31) if media_type == OCI_LAYER_GZIP else None
    try:
        with src.open(name) as f:
            while chunk := f.read(_CHUNK):
                blob_sha.update(chunk)
                size += len(chunk)
                if inflate is None:
                    tar_sha.update(chunk)
                    continue
                tar_sha.update(inflate.decompress(chunk))
                # A gzip stream may hold several members; continue with the next one.
                while inflate.eof and inflate.unused_data:
                    rest = inflate.unused_data
                    inflate = zlib.decompressobj(wbits=31)
                    tar_sha.update(inflate.decompress(rest))
        if inflate is not None:
            tar_sha.update(inflate.flush())
            if not inflate.eof:
                raise zlib.error("truncated gzip stream")
    except zlib.error as exc:
        raise ImageError(
            f"{src.describe()}: layer blob {desc.digest} does not decompress: {exc}"
        ) from None
    _check_blob(src, desc, "layer", Digest("sha256:" + blob_sha.hexdigest()), size)
    actual_diff = "sha256:" + tar_sha.hexdigest()
    if actual_diff != diff_id:
        raise ImageError(
            f"{src.describe()}: layer blob {desc.digest} decompresses to {actual_diff}, "
            f"but its diff_id is {diff_id}"
        )


def _validate_docker_manifest(
    src: _LayoutSource, manifests: Mapping[Digest, dict[str, object]]
) -> None:
    docker = _load_json_file(src, "manifest.json")
    if not isinstance(docker, list) or not docker:
        raise ImageError(f"{src.describe()}: manifest.json must be a non-empty list")
    known = {
        _blob_ref(m.get("config")): [_blob_ref(layer) for layer in _list(m.get("layers"))]
        for m in manifests.values()
    }
    for i, entry in enumerate(docker):
        where = f"{src.describe()}: manifest.json[{i}]"
        if not isinstance(entry, dict):
            raise ImageError(f"{where} is not an object")
        config = entry.get("Config")
        layers = entry.get("Layers")
        tags = entry.get("RepoTags")
        if not isinstance(config, str) or not src.exists(config):
            raise ImageError(f"{where}: Config {config!r} does not name a blob in the archive")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ImageError(f"{where}: RepoTags must be a list of strings")
        if config not in known:
            raise ImageError(f"{where}: Config {config} is not the config of an indexed manifest")
        if layers != known[config]:
            raise ImageError(f"{where}: Layers do not match the OCI manifest's layers")


def _blob_ref(desc: object) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    return f"blobs/sha256/{digest_hex(Digest(str(digest)))}"


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []

"""OCI images as values: digests, a blob store, deterministic layers, config/manifest and sinks.

Data flow::

    staging dir --build_layer--> Layer (blob in BlobStore)
    BaseImage + Layers + ImageConfig --build_image--> Image (config + manifest in BlobStore)
    Image --write_oci_layout / write_oci_archive / write_docker_archive--> disk
    disk --validate_layout / validate_archive--> re-hashes every blob

Everything written here is deterministic: tar entries are sorted with fixed metadata, gzip has
no timestamp or file name, and JSON is dumped with sorted keys and compact separators. The same
inputs therefore give the same digests on every machine with the same zlib.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from imagebuild.cache import write_atomic
from imagebuild.digest import Digest
from imagebuild.errors import ImageError, LayerError

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LAYER_TAR",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "BaseImage",
    "Blob",
    "BlobStore",
    "Descriptor",
    "Digest",
    "Image",
    "ImageConfig",
    "Layer",
    "build_config",
    "build_image",
    "build_layer",
    "canonical_json",
    "digest_hex",
    "parse_digest",
    "sha256_digest",
    "sha256_file",
    "validate_archive",
    "validate_layout",
    "write_docker_archive",
    "write_oci_archive",
    "write_oci_layout",
]

"""A content digest, always the string ``sha256:<64 lowercase hex>``."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
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
_DOCKER_TO_OCI_LAYER = {
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_TAR: OCI_LAYER_TAR,
}
_LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD})
_CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_CHUNK = 1 << 20
# Level 6 is zlib's default trade-off; it is fixed so that the compressed digest only changes
# with the zlib build, never with a Python default.
_GZIP_LEVEL = 6


# --------------------------------------------------------------------------------------------
# Digests


def sha256_digest(data: bytes) -> Digest:
    """Return the ``sha256:<hex>`` digest of ``data``."""
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def sha256_file(path: Path) -> Digest:
    """Return the ``sha256:<hex>`` digest of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return Digest("sha256:" + h.hexdigest())


def parse_digest(text: str) -> Digest:
    """Check that ``text`` is a ``sha256:<64 lowercase hex>`` digest and return it typed."""
    if not _DIGEST_RE.match(text):
        raise ImageError(f"invalid digest {text!r}: expected sha256:<64 lowercase hex digits>")
    return Digest(text)


def digest_hex(digest: Digest) -> str:
    """Return the hex part of a digest (the blob's file name under ``blobs/sha256/``)."""
    return digest.removeprefix("sha256:")


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
            checked = parse_digest(digest)
        except ImageError as exc:
            raise ImageError(f"{where}: {exc.message}") from None
        return cls(
            media_type=media_type,
            digest=checked,
            size=size,
            annotations=tuple(sorted(raw_annotations.items())),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Blob:
    """A small blob held in memory (a manifest or config) with its descriptor."""

    descriptor: Descriptor
    """Media type, digest and size of ``data``."""
    data: bytes
    """The blob's exact bytes."""

    @classmethod
    def from_bytes(cls, data: bytes, *, media_type: str) -> Blob:
        """Describe ``data`` as a blob of ``media_type``."""
        desc = Descriptor(media_type=media_type, digest=sha256_digest(data), size=len(data))
        return cls(descriptor=desc, data=data)


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


# --------------------------------------------------------------------------------------------
# Blob store


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


@dataclass(frozen=True, slots=True)
class BlobStore:
    """Content-addressed blobs under ``root/sha256/<hex>``; writes are atomic (temp + rename).

    Any process may share a store: a blob appears under its name only once complete and
    verified, and two writers of the same blob write the same bytes.
    """

    root: Path

    def path(self, digest: Digest) -> Path:
        """Where the blob named ``digest`` lives (whether or not it exists yet)."""
        return self.root / "sha256" / digest_hex(parse_digest(digest))

    def has(self, digest: Digest) -> bool:
        """Whether the blob is present."""
        return self.path(digest).is_file()

    def read_bytes(self, digest: Digest) -> bytes:
        """Return a (small) blob's bytes."""
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is missing from the blob store {self.root}") from None

    def put_bytes(self, data: bytes, *, media_type: str = OCTET_STREAM) -> Descriptor:
        """Store ``data`` and return its descriptor."""
        return self.ingest((data,), media_type=media_type)

    def put_file(
        self, tmp: Path, *, media_type: str = OCTET_STREAM, expected: Digest | None = None
    ) -> Descriptor:
        """Move ``tmp`` (on the same filesystem, e.g. from ``temp_file``) into the store.

        The file is hashed first; with ``expected`` given, a mismatch deletes ``tmp`` and raises.
        """
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        if expected is not None and digest != expected:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"blob {expected}: content hashes to {digest}")
        dest = self.path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return Descriptor(media_type=media_type, digest=digest, size=size)

    def ingest(
        self,
        chunks: Iterable[bytes],
        *,
        media_type: str = OCTET_STREAM,
        expected: Digest | None = None,
        expected_size: int | None = None,
    ) -> Descriptor:
        """Stream ``chunks`` into the store, hashing as they arrive.

        With ``expected``/``expected_size`` given, a mismatch leaves nothing behind and raises
        ``ImageError`` naming the blob.
        """
        h = hashlib.sha256()
        size = 0
        with self.temp_file() as tmp:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            digest = Digest("sha256:" + h.hexdigest())
            name = expected or digest
            if expected is not None and digest != expected:
                raise ImageError(f"blob {name}: content hashes to {digest}")
            if expected_size is not None and size != expected_size:
                raise ImageError(f"blob {name}: expected {expected_size} bytes, got {size}")
            dest = self.path(digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        return Descriptor(media_type=media_type, digest=digest, size=size)

    @contextmanager
    def temp_file(self) -> Iterator[Path]:
        """Yield a fresh path inside the store's temp dir; it is removed unless moved away."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="blob-")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Layers


class _Sink(Protocol):
    def write(self, data: memoryview, /) -> int: ...


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through, then forwards it."""

    def __init__(self, sink: _Sink | None) -> None:
        super().__init__()
        self.sha = hashlib.sha256()
        self.size = 0
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        if self._sink is not None:
            self._sink.write(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self.sha.hexdigest())


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str  # archive path, no leading "/" or "./"
    kind: str  # "dir", "file", "symlink"
    source: Path | None  # file to read, or None for synthetic directories
    mode: int
    linkname: str = ""


def _scan_staging(staging: Path, prefix_dirs: Iterable[str]) -> list[_Entry]:
    entries: dict[str, _Entry] = {}

    def walk(directory: Path, rel: str) -> None:
        with os.scandir(directory) as it:
            children = list(it)
        for child in children:
            name = f"{rel}/{child.name}" if rel else child.name
            st = child.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                entries[name] = _Entry(
                    name, "symlink", Path(child.path), 0o777, os.readlink(child.path)
                )
            elif stat.S_ISDIR(st.st_mode):
                entries[name] = _Entry(name, "dir", Path(child.path), 0o755)
                walk(Path(child.path), name)
            elif stat.S_ISREG(st.st_mode):
                # Hardlinked files are written as independent regular files (copy mode).
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entries[name] = _Entry(name, "file", Path(child.path), mode)
            else:
                raise LayerError(
                    f"{child.path}: unsupported file type in layer staging "
                    f"(only directories, regular files and symlinks can go into a layer)"
                )

    if not staging.is_dir():
        raise LayerError(f"layer staging directory {staging} does not exist")
    walk(staging, "")

    for raw in prefix_dirs:
        parts = [p for p in raw.strip("/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise LayerError(f"prefix directory {raw!r} must not contain '..'")
        for i in range(1, len(parts) + 1):
            name = "/".join(parts[:i])
            existing = entries.get(name)
            if existing is None:
                entries[name] = _Entry(name, "dir", None, 0o755)
            elif existing.kind != "dir":
                raise LayerError(
                    f"prefix directory {raw!r}: {name} is a {existing.kind} in {staging}"
                )

    # Sorting full paths bytewise puts every directory before its children, because a parent
    # path is a proper prefix of each child's path.
    return sorted(entries.values(), key=lambda e: os.fsencode(e.name))


def _tar_info(name: str, *, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.devmajor = info.devminor = 0
    return info


def build_layer(
    staging: Path,
    store: BlobStore,
    *,
    mtime: int,
    prefix_dirs: Iterable[str] = (),
    created_by: str = "imgbuild: layer",
) -> Layer:
    """Tar and gzip ``staging`` deterministically into ``store`` and return the ``Layer``.

    ``staging`` mirrors the container's root: ``staging/app/.venv/bin/python`` becomes the
    entry ``app/.venv/bin/python``. Entries are sorted bytewise by path, every directory has
    its own entry before its children, and metadata is fixed: ``mtime`` (an int epoch, e.g.
    ``SOURCE_DATE_EPOCH``), uid/gid 0, empty uname/gname, directories 0755, files 0644 (0755 if
    any exec bit was set), symlinks 0777 with their target unchanged. Hardlinks become regular
    files. The format is PAX; gzip has mtime 0, no file name and a fixed level.

    ``prefix_dirs`` names extra directories (container paths such as ``/app/data``) that get
    entries, with their parents, even when ``staging`` does not contain them.

    ``diff_id`` and ``digest`` are computed in the same streaming pass that writes the blob,
    so the layer is never held in memory.
    """
    if isinstance(mtime, bool) or not isinstance(mtime, int) or mtime < 0:
        raise LayerError(f"layer mtime must be a non-negative integer epoch, got {mtime!r}")
    try:
        entries = _scan_staging(staging, prefix_dirs)
        with store.temp_file() as tmp:
            with tmp.open("wb") as out:
                compressed = _HashingWriter(out)
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=_GZIP_LEVEL
                ) as gz:
                    uncompressed = _HashingWriter(gz)
                    with tarfile.open(
                        fileobj=uncompressed,
                        mode="w|",
                        format=tarfile.PAX_FORMAT,
                        encoding="utf-8",
                    ) as tar:
                        for entry in entries:
                            _add_entry(tar, entry, mtime=mtime)
            digest = compressed.digest
            dest = store.path(digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
    except OSError as exc:
        where = exc.filename or staging
        raise LayerError(f"layer from {staging}: {where}: {exc.strerror or exc}") from exc
    return Layer(
        digest=digest,
        diff_id=uncompressed.digest,
        size=compressed.size,
        media_type=OCI_LAYER_GZIP,
        created_by=created_by,
    )


def _add_entry(tar: tarfile.TarFile, entry: _Entry, *, mtime: int) -> None:
    info = _tar_info(entry.name, mtime=mtime)
    info.mode = entry.mode
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.linkname
        tar.addfile(info)
    else:
        assert entry.source is not None
        with entry.source.open("rb") as f:
            info.type = tarfile.REGTYPE
            info.size = os.fstat(f.fileno()).st_size
            tar.addfile(info, f)


# --------------------------------------------------------------------------------------------
# Image assembly


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
    media_type = _DOCKER_TO_OCI_LAYER.get(desc.media_type, desc.media_type)
    if media_type not in _LAYER_TYPES:
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
    out["config"] = inner

    base_history = base_config.get("history")
    history: list[object] = copy.deepcopy(base_history) if isinstance(base_history, list) else []
    for layer in layers:
        history.append({"created": created, "created_by": layer.created_by})
    out["history"] = history
    out["created"] = created

    base_diff_ids = list(base.diff_ids) if base is not None else []
    out["rootfs"] = {"type": "layers", "diff_ids": base_diff_ids + [l.diff_id for l in layers]}
    return out


def build_image(
    base: BaseImage | None,
    layers: Sequence[Layer],
    *,
    config: ImageConfig,
    created: str,
    store: BlobStore,
    annotations: Mapping[str, str] | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
) -> Image:
    """Assemble config and manifest for ``base`` + ``layers`` and store both in ``store``.

    Base layers keep their bytes; Docker layer media types become their OCI equivalents.
    ``annotations`` go on the manifest. ``platform`` (os, architecture) applies only without
    a base. Every layer blob, ours and the base's, must already be in ``store``.
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
    for desc in all_layers:
        if not store.has(desc.digest):
            raise ImageError(f"layer {desc.digest} is missing from the blob store {store.root}")

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
                {**image.manifest.to_json(), **_platform_entry(image)} for image in images
            ],
        }
    )
    return ImageIndex(
        manifest=store.put_bytes(data, media_type=OCI_INDEX),
        manifest_bytes=data,
        images=tuple(images),
        store=store,
    )


# --------------------------------------------------------------------------------------------
# Sinks


def _index_entry(image: Image | ImageIndex, annotations: Mapping[str, str]) -> dict[str, object]:
    entry = image.manifest.to_json()
    entry["annotations"] = dict(annotations)
    if isinstance(image, Image):
        entry.update(_platform_entry(image))
    return entry


def _platform_entry(image: Image) -> dict[str, object]:
    os_name, arch = image.platform
    return {"platform": {"architecture": arch, "os": os_name}}


def _index_json(entries: Sequence[dict[str, object]]) -> bytes:
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)})


_OCI_LAYOUT_BYTES = canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})


def _image_blobs(image: Image | ImageIndex) -> list[Descriptor]:
    """Manifest (or index and each image's manifest), config and layers, each once, sorted
    by digest.
    """
    images = image.images if isinstance(image, ImageIndex) else (image,)
    seen: dict[Digest, Descriptor] = {image.manifest.digest: image.manifest}
    for one in images:
        for desc in (one.manifest, one.config, *one.layers):
            seen.setdefault(desc.digest, desc)
    return [seen[d] for d in sorted(seen)]


def _check_ref_name(ref_name: str) -> None:
    if not ref_name or any(c.isspace() for c in ref_name):
        raise ImageError(f"OCI ref name {ref_name!r} must be non-empty without whitespace")


def write_oci_layout(image: Image | ImageIndex, dest_dir: Path, *, ref_name: str) -> None:
    """Write ``image`` as an OCI image layout directory tagged ``ref_name``.

    ``dest_dir`` must be absent, empty, or an existing OCI layout; its ``index.json`` is
    replaced by one naming only this image. Every file is written atomically.
    """
    _check_ref_name(ref_name)
    with _writing(dest_dir):
        _write_layout(image, dest_dir, ref_name=ref_name)


def _write_layout(image: Image | ImageIndex, dest_dir: Path, *, ref_name: str) -> None:
    if dest_dir.exists():
        if not dest_dir.is_dir():
            raise ImageError(f"OCI layout destination {dest_dir} exists and is not a directory")
        if any(dest_dir.iterdir()) and not (dest_dir / "oci-layout").is_file():
            raise ImageError(
                f"OCI layout destination {dest_dir} is not empty and not an OCI layout",
                hint="choose an empty or new directory",
            )
    blob_dir = dest_dir / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    for desc in _image_blobs(image):
        target = blob_dir / digest_hex(desc.digest)
        if target.is_file() and target.stat().st_size == desc.size:
            continue
        fd, tmp = tempfile.mkstemp(dir=blob_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, image.store.path(desc.digest).open("rb") as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            os.replace(tmp, target)
        except FileNotFoundError:
            Path(tmp).unlink(missing_ok=True)
            raise ImageError(f"blob {desc.digest} is missing from {image.store.root}") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    write_atomic(dest_dir / "oci-layout", _OCI_LAYOUT_BYTES)
    entry = _index_entry(image, {ANNOTATION_REF_NAME: ref_name})
    write_atomic(dest_dir / "index.json", _index_json([entry]))


def _archive_dir(tar: tarfile.TarFile, name: str) -> None:
    info = _tar_info(name, mtime=0)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _archive_file(
    tar: tarfile.TarFile, name: str, data: bytes | Path, size: int | None = None
) -> None:
    info = _tar_info(name, mtime=0)
    info.mode = 0o644
    if isinstance(data, bytes):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        return
    try:
        with data.open("rb") as f:
            info.size = os.fstat(f.fileno()).st_size
            if size is not None and info.size != size:
                raise ImageError(f"blob {data} has {info.size} bytes, expected {size}")
            tar.addfile(info, f)
    except FileNotFoundError:
        raise ImageError(f"blob file {data} is missing") from None


def _write_archive(
    image: Image | ImageIndex,
    out: IO[bytes],
    *,
    index_entries: list[dict[str, object]],
    extra: dict[str, bytes],
    skip: Collection[Digest] = (),
) -> None:
    """Write a deterministic uncompressed tar: dirs 0755, files 0644, mtime 0, owner 0.

    Blobs in ``skip`` are written as empty files (see ``write_docker_archive``).
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _archive_dir(tar, "blobs")
        _archive_dir(tar, "blobs/sha256")
        for desc in _image_blobs(image):
            name = f"blobs/sha256/{digest_hex(desc.digest)}"
            if desc.digest in skip:
                _archive_file(tar, name, b"")
                continue
            path = image.store.path(desc.digest)
            _archive_file(tar, name, path, desc.size)
        files = {"index.json": _index_json(index_entries), "oci-layout": _OCI_LAYOUT_BYTES}
        files.update(extra)
        for name in sorted(files):
            _archive_file(tar, name, files[name])


@contextmanager
def _writing(dest: object) -> Iterator[None]:
    """Turn filesystem failures while writing ``dest`` into one ``ImageError``."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or dest
        raise ImageError(f"cannot write {dest}: {where}: {exc.strerror or exc}") from exc


@contextmanager
def _output(dest: BinaryIO | Path) -> Iterator[IO[bytes]]:
    """Yield a stream; for a path, a temp file that replaces ``dest`` only on success."""
    if not isinstance(dest, Path):
        yield dest
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_oci_archive(
    image: Image | ImageIndex, dest_file: BinaryIO | Path, *, ref_name: str
) -> None:
    """Write ``image`` as a tar of an OCI layout (``oci-archive:``), tagged ``ref_name``."""
    _check_ref_name(ref_name)
    entry = _index_entry(image, {ANNOTATION_REF_NAME: ref_name})
    with _writing(dest_file), _output(dest_file) as out:
        _write_archive(image, out, index_entries=[entry], extra={})


_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def _split_repo_tag(repo_tag: str) -> tuple[str, str, str]:
    """Split ``name[:tag]`` into (familiar ``name:tag``, full ``registry/repo:tag``, tag).

    A trimmed copy of Docker's normalisation (``registry.ImageReference.parse`` is the full one;
    oci.py cannot import registry.py, which builds on it).
    """
    if "@" in repo_tag:
        raise ImageError(f"repo tag {repo_tag!r} must be name:tag, not a digest reference")
    name, tag = repo_tag, "latest"
    last = repo_tag.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = repo_tag.rsplit(":", 1)
    if not _TAG_RE.match(tag) or not name or name != name.lower() or " " in name:
        raise ImageError(f"repo tag {repo_tag!r} is not a valid lowercase name:tag reference")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = "docker.io"
    if registry == "docker.io" and "/" not in path:
        path = f"library/{path}"
    return f"{name}:{tag}", f"{registry}/{path}:{tag}", tag


def write_docker_archive(
    image: Image, dest: BinaryIO | Path, *, repo_tags: Sequence[str], present: int = 0
) -> None:
    """Write the dual archive that ``docker load`` accepts with either image store.

    It is an OCI layout (``oci-layout``, ``index.json`` with one entry per tag carrying
    ``io.containerd.image.name`` = the full reference and ``org.opencontainers.image.ref.name``
    = the tag, as ``docker save`` writes them) plus the classic ``manifest.json`` whose
    ``Config`` and ``Layers`` point into ``blobs/sha256/``. Tags without ``:tag`` get
    ``:latest``. ``dest`` is a path (written atomically) or a binary stream.

    ``present`` says the engine already holds the first so many layers (the same chain of
    diff IDs): their blobs are written empty. The classic loader looks a layer up by its
    chain before it opens the file, so it never reads them; any other loader fails, and
    the caller then sends the whole archive.
    """
    tags = [_split_repo_tag(t) for t in repo_tags]
    entries = [
        _index_entry(image, {ANNOTATION_CONTAINERD_NAME: full, ANNOTATION_REF_NAME: tag})
        for _, full, tag in tags
    ]
    if not entries:
        entries = [_index_entry(image, {})]
    manifest_json = canonical_json(
        [
            {
                "Config": f"blobs/sha256/{digest_hex(image.config.digest)}",
                "RepoTags": [familiar for familiar, _, _ in tags],
                "Layers": [f"blobs/sha256/{digest_hex(d.digest)}" for d in image.layers],
            }
        ]
    )
    needed = {d.digest for d in (image.manifest, image.config, *image.layers[present:])}
    skip = {d.digest for d in image.layers[:present]} - needed
    with _writing(dest), _output(dest) as out:
        _write_archive(
            image, out, index_entries=entries, extra={"manifest.json": manifest_json}, skip=skip
        )


# --------------------------------------------------------------------------------------------
# Validation


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
    _check_blob(src, desc, what, sha256_digest(data), len(data))
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
        obj = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{src.describe()}: {what} blob {digest} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{src.describe()}: {what} blob {digest} is not a JSON object")
    return obj


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
        if desc.media_type in _INDEX_TYPES:
            found.update(_validate_index(src, obj, f"index {desc.digest}"))
        elif desc.media_type in _MANIFEST_TYPES:
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
    if config_desc.media_type not in _CONFIG_TYPES:
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
    media_type = _DOCKER_TO_OCI_LAYER.get(desc.media_type, desc.media_type)
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

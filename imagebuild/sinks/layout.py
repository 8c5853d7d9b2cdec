"""The on-disk sinks: an OCI image layout directory, an OCI archive and a docker archive.

Each writes an ``Image`` (or an ``ImageIndex``) whose blobs are in its ``BlobStore``; files
and archives appear atomically (a temp file renamed into place), so a failed write leaves the
previous output untouched. ``OciLayoutSink`` and ``OciArchiveSink`` are the ``Sink`` values the
CLI makes from ``--output oci:DIR`` and ``--output oci-archive:FILE``.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from imagebuild.cache import atomic_writer, link_or_copy_atomic, write_atomic
from imagebuild.digest import Digest, digest_hex
from imagebuild.errors import ImageError, RegistryError
from imagebuild.image.descriptor import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    OCI_INDEX,
    OCI_LAYOUT_VERSION,
    Descriptor,
    canonical_json,
)
from imagebuild.image.model import Image, ImageIndex
from imagebuild.image.mutate import platform_entry
from imagebuild.image.name import ImageReference
from imagebuild.image.tarball import add_dir, add_file

if TYPE_CHECKING:
    from imagebuild.report import Reporter
    from imagebuild.sinks.sink import Finished

_CHUNK = 1 << 20


def _index_entry(image: Image | ImageIndex, annotations: Mapping[str, str]) -> dict[str, object]:
    entry = image.manifest.to_json()
    entry["annotations"] = dict(annotations)
    if isinstance(image, Image):
        entry.update(platform_entry(image))
    return entry


def _index_json(entries: Sequence[dict[str, object]]) -> bytes:
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)})


_OCI_LAYOUT_BYTES = canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})


def _image_blobs(image: Image | ImageIndex) -> list[Descriptor]:
    """Every blob ``image`` names, each once, sorted by digest.

    That is the manifest (or the index and each image's manifest), configs and layers.
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
        try:
            link_or_copy_atomic(image.store.path(desc.digest), target)
        except FileNotFoundError:
            raise ImageError(f"blob {desc.digest} is missing from {image.store.root}") from None
    write_atomic(dest_dir / "oci-layout", _OCI_LAYOUT_BYTES)
    entry = _index_entry(image, {ANNOTATION_REF_NAME: ref_name})
    write_atomic(dest_dir / "index.json", _index_json([entry]))


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
        add_dir(tar, "blobs")
        add_dir(tar, "blobs/sha256")
        for desc in _image_blobs(image):
            name = f"blobs/sha256/{digest_hex(desc.digest)}"
            if desc.digest in skip:
                add_file(tar, name, b"")
                continue
            path = image.store.path(desc.digest)
            add_file(tar, name, path, desc.size)
        files = {"index.json": _index_json(index_entries), "oci-layout": _OCI_LAYOUT_BYTES}
        files.update(extra)
        for name in sorted(files):
            add_file(tar, name, files[name])


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
    with atomic_writer(dest) as f:
        # An output, not a cache entry: readable as a file the user made would be
        # (mkstemp's 0600 would keep CI artifact steps and other users out).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(f.fileno(), 0o666 & ~umask)
        yield f


def write_oci_archive(
    image: Image | ImageIndex, dest_file: BinaryIO | Path, *, ref_name: str
) -> None:
    """Write ``image`` as a tar of an OCI layout (``oci-archive:``), tagged ``ref_name``."""
    _check_ref_name(ref_name)
    entry = _index_entry(image, {ANNOTATION_REF_NAME: ref_name})
    with _writing(dest_file), _output(dest_file) as out:
        _write_archive(image, out, index_entries=[entry], extra={})


def _split_repo_tag(repo_tag: str) -> tuple[str, str, str]:
    """Split ``name[:tag]`` into (familiar ``name:tag``, full ``registry/repo:tag``, tag)."""
    if "@" in repo_tag:
        raise ImageError(f"repo tag {repo_tag!r} must be name:tag, not a digest reference")
    try:
        ref = ImageReference.parse(repo_tag)
    except RegistryError:
        raise ImageError(
            f"repo tag {repo_tag!r} is not a valid lowercase name:tag reference"
        ) from None
    tag = ref.tag or "latest"
    last = repo_tag.rsplit("/", 1)[-1]
    familiar = repo_tag if ":" in last else f"{repo_tag}:{tag}"
    return familiar, f"{ref.name}:{tag}", tag


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


def _ref_name(finished: Finished) -> str:
    """The ``org.opencontainers.image.ref.name`` a layout gets: the first tag's tag."""
    first = finished.tags[0] if finished.tags else None
    return (first.tag if first is not None else None) or "latest"


@dataclass(frozen=True, kw_only=True, slots=True)
class OciLayoutSink:
    """``--output oci:DIR``: an OCI image layout directory (an image or an index)."""

    path: Path
    """The layout directory: absent, empty, or an OCI layout whose index is replaced."""
    kind: str = field(default="oci", init=False)
    """The ``--output`` kind."""
    takes_index: bool = field(default=True, init=False)
    """A layout holds an image index as well as one image."""

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        """Write the layout; one line naming it."""
        write_oci_layout(finished.image, self.path, ref_name=_ref_name(finished))
        return (f"wrote OCI layout {self.path}",)


@dataclass(frozen=True, kw_only=True, slots=True)
class OciArchiveSink:
    """``--output oci-archive:FILE``: a tar of an OCI image layout (an image or an index)."""

    path: Path
    """The archive file, replaced atomically."""
    kind: str = field(default="oci-archive", init=False)
    """The ``--output`` kind."""
    takes_index: bool = field(default=True, init=False)
    """An archive holds an image index as well as one image."""

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        """Write the archive; one line naming it."""
        write_oci_archive(finished.image, self.path, ref_name=_ref_name(finished))
        return (f"wrote OCI archive {self.path}",)


@dataclass(frozen=True, kw_only=True, slots=True)
class DockerArchiveSink:
    """The image as an archive ``docker load`` takes, for a build whose engine did not answer.

    With no ``--output``, a build loads into Docker; on a machine without an engine it
    writes this archive instead (``<dir>/<repository>.tar``) and says how to load it.
    """

    directory: Path
    """Where the archive is written."""
    kind: str = field(default="docker", init=False)
    """Written where the engine's load would have been."""
    takes_index: bool = field(default=False, init=False)
    """Stands in for an engine, which loads one image."""

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        """Write the archive; one line naming it and the command that loads it."""
        image = finished.image
        assert isinstance(image, Image), "one platform only (the pipeline refuses more)"
        first = finished.tags[0] if finished.tags else None
        name = first.repository.rsplit("/", 1)[-1] if first is not None else "image"
        path = self.directory / f"{name}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_docker_archive(image, path, repo_tags=[str(ref) for ref in finished.tags])
        return (f"wrote {path} (no Docker engine answered); load it with: docker load -i {path}",)

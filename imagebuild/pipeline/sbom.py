"""The SBOM step of a platform's build: the document, kept as a record, and its blob.

The document lists what the plan installs (``image.sbom``). It goes into the image as a
file of the project's layer (``<venv>/sbom.cdx.json``), the layer that changes whenever
what is installed does (a dependency bumped or added changes its own layer and this one:
two layers, not three). It is also stored as a blob of its own, for the registry sink to
attach to the pushed image as an OCI referrer.

The document depends only on what is installed, each locked wheel by its digest (a wheel
built here by its METADATA). It is kept under that key in the local cache and in the
registry cache, so a code change, or a CI runner with an empty cache, neither reads the
wheels' licences nor renders it again.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import threading
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from imagebuild import __version__
from imagebuild.cache import mark_used, write_json
from imagebuild.digest import Digest, digest_bytes
from imagebuild.errors import ImageError
from imagebuild.image.descriptor import SBOM_FILE, SBOM_MEDIA_TYPE, Descriptor
from imagebuild.image.store import BlobStore
from imagebuild.install.layers import VenvLayout
from imagebuild.install.plan import PlannedWheel
from imagebuild.lock.model import Lock
from imagebuild.pipeline.layers import RemoteLayers


def sbom_document(
    wheels: Sequence[PlannedWheel],
    *,
    lock: Lock,
    project: str,
    venv: VenvLayout,
    store: BlobStore,
    epoch: int,
    records: Path,
    remote: RemoteLayers | None = None,
    fetch: Callable[[Sequence[PlannedWheel]], None] | None = None,
) -> Descriptor:
    """The SBOM of an image installing ``wheels``, as a blob in ``store``.

    From the local record, else the registry cache's, else rendered from the wheels
    (``fetch``ed first: their METADATA states the licences) and kept in both.
    """
    key = _key(project, venv, epoch, wheels)
    record = records / f"sbom-{key}.json"
    kept = _kept(record, store)
    if kept is not None:
        if remote is not None:  # a runner seeding the registry cache has it on disk
            remote.keep_record(f"sbom-{key}", store.read_bytes(kept.digest))
        return kept
    document = remote.find_record(f"sbom-{key}") if remote is not None else None
    rendered = document is None
    if document is None:
        if fetch is not None:
            fetch(wheels)
        document = _render(lock, wheels, project, epoch)
    blob = store.put_bytes(document, media_type=SBOM_MEDIA_TYPE)
    write_json(record, {"blob": blob.to_json()}, durable=False)  # see _kept
    if rendered and remote is not None:
        remote.keep_record(f"sbom-{key}", document)
    return blob


def sbom_file(venv: VenvLayout, blob: Descriptor, store: BlobStore) -> tuple[PurePosixPath, bytes]:
    """The document as a file of the project's layer: its path in the image and its bytes."""
    return venv.root / SBOM_FILE, store.read_bytes(blob.digest)


_RENDERER = "imagebuild.image.sbom"


def ready_renderer() -> None:
    """Import the renderer (the CycloneDX library: 0.14 s) on a thread of its own, now.

    For a build whose dependencies' layers are being made, and so whose document is most
    likely new: imported while the layers are, on two busy cores, rather than at the end,
    where the project's layer waits for the document and one core idles.
    """
    if _RENDERER not in sys.modules:
        threading.Thread(
            target=importlib.import_module, args=(_RENDERER,), name="imgbuild-sbom", daemon=True
        ).start()


def _render(lock: Lock, wheels: Sequence[PlannedWheel], project: str, epoch: int) -> bytes:
    # The CycloneDX library is imported only when a document is written (or soon will be).
    from imagebuild.image.sbom import load_sbom_packages, render_sbom

    return render_sbom(load_sbom_packages(lock, wheels), subject=project, epoch=epoch)


def _key(project: str, venv: VenvLayout, epoch: int, wheels: Sequence[PlannedWheel]) -> str:
    """Everything the document depends on."""
    material = {
        "imgbuild": __version__,
        "project": project,
        "venv": str(venv.root),
        "epoch": epoch,
        "wheels": sorted([w.name, w.version, w.sha256 or _metadata_digest(w.path)] for w in wheels),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _metadata_digest(wheel: Path) -> Digest:
    """The digest of a wheel's METADATA (what the document reads of a wheel built here)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return digest_bytes(archive.read(name))


def _kept(record: Path, store: BlobStore) -> Descriptor | None:
    try:
        blob = Descriptor.from_json(json.loads(record.read_text(encoding="utf-8"))["blob"])
    except (OSError, ValueError, KeyError, TypeError, ImageError):
        return None
    if not store.has(blob.digest):
        return None
    mark_used(record)  # as layer records are (``layerwork.read_layer_record``)
    return blob

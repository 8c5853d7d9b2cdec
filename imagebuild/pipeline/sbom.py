"""The SBOM step of a platform's build: the document, its layer below the project's, its blob.

The document lists what the plan installs (``image.sbom``); its layer goes just below the
project's, so the project stays alone on top and a code change leaves the SBOM layer as it
was. The document is also stored as a blob of its own, for the registry sink to attach to
the pushed image as an OCI referrer.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

from imagebuild import __version__
from imagebuild.cache import write_json
from imagebuild.digest import Digest, digest_bytes
from imagebuild.image.descriptor import Descriptor
from imagebuild.image.model import Layer
from imagebuild.image.store import BlobStore
from imagebuild.install.layers import VenvLayout
from imagebuild.install.plan import LayerPlan, PlannedWheel
from imagebuild.lock.model import Lock
from imagebuild.pipeline.layers import layer_json

SBOM_LAYERS = 1
"""Layers the SBOM adds (counted against ``max-layers`` like the base's)."""


def add_sbom(
    layers: Sequence[Layer],
    plan: LayerPlan,
    *,
    lock: Lock,
    project: str,
    venv: VenvLayout,
    store: BlobStore,
    work: Path,
    epoch: int,
    records: Path,
) -> tuple[list[Layer], Descriptor]:
    """``layers`` with the SBOM layer below the project's; the document's blob descriptor.

    The document depends only on what is installed (each locked wheel by its digest, a
    wheel built here by its METADATA), so it is kept in the layer cache under that: a code
    change finds it there and neither reads the wheels nor renders it again.
    """
    wheels = [wheel for spec in plan.layers for wheel in spec.wheels]
    record = records / f"sbom-{_key(project, venv, epoch, wheels)}.json"
    kept = _kept(record, store)
    if kept is not None:
        layer, blob = kept
    else:
        layer, blob = _render(lock, wheels, project, venv, store, work, epoch)
        write_json(record, {"layer": layer_json(layer), "blob": blob.to_json()})
    out = list(layers)
    top = len(out) - 1 if plan.layers and plan.layers[-1].kind == "project" else len(out)
    out.insert(top, layer)
    return out, blob


def _render(
    lock: Lock,
    wheels: Sequence[PlannedWheel],
    project: str,
    venv: VenvLayout,
    store: BlobStore,
    work: Path,
    epoch: int,
) -> tuple[Layer, Descriptor]:
    # The CycloneDX library is imported only when a document is written.
    from imagebuild.image.sbom import (
        SBOM_MEDIA_TYPE,
        build_sbom_layer,
        load_sbom_packages,
        render_sbom,
    )

    document = render_sbom(load_sbom_packages(lock, wheels), subject=project, epoch=epoch)
    layer = build_sbom_layer(document, venv.root, store, work, mtime=epoch)
    return layer, store.put_bytes(document, media_type=SBOM_MEDIA_TYPE)


def _key(project: str, venv: VenvLayout, epoch: int, wheels: Sequence[PlannedWheel]) -> str:
    """Everything the document and its layer depend on."""
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


def _kept(record: Path, store: BlobStore) -> tuple[Layer, Descriptor] | None:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        layer, blob = Layer(**data["layer"]), Descriptor.from_json(data["blob"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (layer, blob) if store.has(layer.digest) and store.has(blob.digest) else None

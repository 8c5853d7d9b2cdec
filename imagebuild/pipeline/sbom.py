"""The SBOM step of a platform's build: the document, its layer below the project's, its blob.

The document lists what the plan installs (``image.sbom``); its layer goes just below the
project's, so the project stays alone on top and a code change leaves the SBOM layer as it
was. The document is also stored as a blob of its own, for the registry sink to attach to
the pushed image as an OCI referrer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imagebuild.image.descriptor import Descriptor
from imagebuild.image.model import Layer
from imagebuild.image.sbom import (
    SBOM_MEDIA_TYPE,
    build_sbom_layer,
    load_sbom_packages,
    render_sbom,
)
from imagebuild.image.store import BlobStore
from imagebuild.install.layers import VenvLayout
from imagebuild.install.plan import LayerPlan
from imagebuild.lock.model import Lock

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
) -> tuple[list[Layer], Descriptor]:
    """``layers`` with the SBOM layer below the project's; the document's blob descriptor."""
    wheels = [wheel for spec in plan.layers for wheel in spec.wheels]
    document = render_sbom(load_sbom_packages(lock, wheels), subject=project, epoch=epoch)
    layer = build_sbom_layer(document, venv.root, store, work, mtime=epoch)
    blob = store.put_bytes(document, media_type=SBOM_MEDIA_TYPE)
    out = list(layers)
    top = len(out) - 1 if plan.layers and plan.layers[-1].kind == "project" else len(out)
    out.insert(top, layer)
    return out, blob

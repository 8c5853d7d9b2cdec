"""The one protocol every output implements, and the finished image handed to it.

The CLI turns each ``--output`` into a ``Sink``; the pipeline builds the whole image first,
then hands the same ``Finished`` value to every sink in turn. Nothing reaches a sink before
the image is complete, so a failed build never leaves anything half-written, loaded or pushed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from imagebuild.digest import Digest
    from imagebuild.image.descriptor import Descriptor
    from imagebuild.image.model import BaseImage, Image, ImageConfig, ImageIndex, Layer
    from imagebuild.image.name import ImageReference
    from imagebuild.report import Reporter


@dataclass(frozen=True, kw_only=True, slots=True)
class Finished:
    """A built image (or an index over one image per platform) and what sinks need beside it."""

    image: Image | ImageIndex
    """What is written, loaded or pushed."""
    tags: tuple[ImageReference, ...]
    """Every ``--tag`` (or the default ``<project>:latest``), parsed."""
    work: Path
    """Scratch directory of this build, on the cache's filesystem (for archives)."""
    base: BaseImage
    """The first platform's base as pulled (the engine may already hold its layers)."""
    base_pulled: ImageReference
    """The base's reference as pulled: through the mirrors, at its pinned digest."""
    base_upstream: str
    """The base as configured (catalog reference or the user's), before mirrors."""
    layers: tuple[Layer, ...]
    """imgbuild's own layers of the first platform's image, bottom first."""
    config: ImageConfig
    """The image configuration imgbuild set on top of the base's."""
    title: str
    """``<project> <version>``, for what a sink writes for people to read."""
    sboms: tuple[tuple[Digest, Descriptor], ...] = ()
    """Each image's manifest digest and its SBOM document's blob (``image.sbom``)."""


class Sink(Protocol):
    """Where a finished image goes: an engine, a layout, an archive, a registry, a context."""

    @property
    def kind(self) -> str:
        """The ``--output`` kind it was made from.

        One of ``docker``, ``oci``, ``oci-archive``, ``registry``, ``context``.
        """
        ...

    @property
    def takes_index(self) -> bool:
        """Whether it can take an image index (several platforms), not only one image."""
        ...

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        """Send ``finished`` to this output; the lines the CLI prints on success."""
        ...

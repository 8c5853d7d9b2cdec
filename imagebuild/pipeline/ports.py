"""The ports: what the pipeline needs from the world, handed in by the CLI (or by a test).

Each protocol holds only the methods the pipeline calls. The CLI builds the real ones
(``SimpleIndex``, ``RegistryClient``, ``DockerEngine.from_env``, ``find_host_python``);
tests hand in fakes, so every branch of a build can run without Docker or a registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import httpx

    from imagebuild.digest import Digest
    from imagebuild.image.model import BaseImage
    from imagebuild.image.name import ImageReference
    from imagebuild.image.store import BlobStore
    from imagebuild.index.model import PackageIndex
    from imagebuild.pipeline.layers import RemoteLayers
    from imagebuild.report import Reporter
    from imagebuild.sinks.daemon import Engine


class Registry(Protocol):
    """What the pipeline asks of a registry: the base, and a reference's digest."""

    def pull_image(
        self,
        ref: ImageReference,
        *,
        platform: Sequence[str],
        store: BlobStore,
        fetch_layers: bool = True,
    ) -> BaseImage:
        """Pull ``ref`` for ``platform`` (``(os, architecture)``) into ``store``.

        An index is resolved to its entry for the platform; a digest-pinned ``ref`` must
        match what arrives. ``fetch_layers=False``: the manifest and config only (``pull_layers``
        brings the layers). Raises ``RegistryError``.
        """
        ...

    def pull_layers(self, ref: ImageReference, image: BaseImage, store: BlobStore) -> None:
        """Bring the layers of ``image``, pulled from ``ref`` without them, into ``store``."""
        ...

    def fetch_manifest(self, ref: ImageReference) -> tuple[bytes, str, Digest]:
        """The manifest (or index) ``ref`` names: its bytes, media type and digest."""
        ...


class IndexFactory(Protocol):
    """Makes the package index a lock resolves against."""

    def __call__(
        self, index_urls: Sequence[str], *, cache_dir: Path, reporter: Reporter
    ) -> AbstractContextManager[PackageIndex]:
        """An index over ``index_urls`` (priority order; credentials are the client's auth).

        It caches pages under ``cache_dir`` and is closed when the context ends.
        """
        ...


class LayerCacheFactory(Protocol):
    """Opens a registry layer cache over a source and a target repository."""

    def __call__(
        self,
        source: ImageReference | None,
        target: ImageReference | None,
        *,
        cache_dir: Path,
        fetch_blobs: bool = True,
    ) -> RemoteLayers:
        """Layers are looked up in ``source`` and kept in ``target``; blobs go to the cache.

        Not ``fetch_blobs``: a found layer's blob stays in the registry (every output is a
        push there, which mounts it).
        """
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Ports:
    """Everything a build or a lock reaches the world through."""

    http: httpx.Client
    """The one HTTP client of the run (downloads, sdists, and the index and registry's)."""
    index: IndexFactory
    """Makes the package index (``SimpleIndex`` in production)."""
    registry: Registry
    """Pulls the base and looks up digests (``RegistryClient`` in production)."""
    engine: Callable[[], Engine]
    """Connects to the Docker engine, or raises ``DockerError`` when there is none."""
    host_python: Callable[[tuple[int, int]], Path | None]
    """A working host interpreter of this minor version, if any (``find_host_python``)."""
    reporter: Reporter
    """Progress and warnings."""
    layer_cache: LayerCacheFactory | None = None
    """Opens the registry layer cache (``--cache-from``/``--cache-to``); None: no registry."""
    resident_hooks: Path | None = None
    """Where the project's PEP 517 hooks find resident backend processes (the resident
    server's directory, in a build it runs); None: each hook in a new process."""

"""What the commands share: the real ports, the cache directory, platforms, and failing.

``imgbuild.cli`` and the command groups in ``imagebuild.commands`` build requests from
options; the ports they hand the pipeline (HTTP client, index, registry, engine) and the
one-line error exit are made here, once.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from imagebuild.client import serving_home
from imagebuild.errors import ImagebuildError, ProjectError
from imagebuild.report import Reporter

if TYPE_CHECKING:
    import httpx

    from imagebuild.image.name import ImageReference
    from imagebuild.index.model import PackageIndex
    from imagebuild.pipeline.layers import RemoteLayers
    from imagebuild.pipeline.ports import Ports
    from imagebuild.sinks.daemon import Engine
    from imagebuild.sinks.remote import RegistryClient


def fail(exc: ImagebuildError, verbose: bool) -> NoReturn:
    """Print ``exc`` as one line (a traceback first with ``--verbose``) and exit 1."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    # One line: what, where, and (after "; ") how to fix it.
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def cache_dir(option: Path | None) -> Path:
    """The cache directory, refused in one line if it is a file or cannot be written."""
    from imagebuild.cache import CACHE_DIR_ENV, check_cache_root, default_cache_root

    if option is not None:
        check_cache_root(option, "--cache-dir")
        return option
    root = default_cache_root()
    check_cache_root(root, CACHE_DIR_ENV if os.environ.get(CACHE_DIR_ENV) else "the user cache")
    return root


def using_cache(root: Path) -> AbstractContextManager[None]:
    """Hold the cache at ``root`` shared while a command uses it (``cache clean`` waits)."""
    from imagebuild.pipeline.cachelock import cache_in_use

    def waiting() -> None:
        typer.echo(f"waiting for imgbuild cache clean or prune to end on {root}", err=True)

    return cache_in_use(root, waiting=waiting)


def interrupted(exc: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM: the run unwound (temporary files removed); one line, 130 or 143."""
    from imagebuild.commands.signals import Terminated

    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    typer.echo(f"error: {what}; temporary files were removed, nothing was written", err=True)
    raise typer.Exit(143 if isinstance(exc, Terminated) else 130)


def docker_config_path() -> Path:
    """Docker's config.json, where the docker CLI reads it (``DOCKER_CONFIG``)."""
    root = os.environ.get("DOCKER_CONFIG")
    return Path(root) / "config.json" if root else Path.home() / ".docker" / "config.json"


def registry(http: httpx.Client) -> RegistryClient:
    """The registry client, with the logins of Docker's config.json."""
    from imagebuild.sinks.auth import CredentialStore
    from imagebuild.sinks.remote import RegistryClient

    return RegistryClient(
        http, credentials=CredentialStore.from_docker_config(docker_config_path())
    )


def engine() -> Engine:
    """The Docker engine as the docker CLI would reach it (``DOCKER_HOST``, TLS variables)."""
    from imagebuild.sinks.engine import DockerEngine

    return DockerEngine.from_env()


def ports(http: httpx.Client, registry: RegistryClient, reporter: Reporter) -> Ports:
    """The real ports: the run's HTTP client, ``SimpleIndex``, the registry, the engine."""
    from imagebuild.install.layers import find_host_python
    from imagebuild.pipeline.ports import Ports

    def index(
        index_urls: Sequence[str], *, cache_dir: Path, reporter: Reporter
    ) -> AbstractContextManager[PackageIndex]:
        from imagebuild.build.sdist import sdist_metadata
        from imagebuild.index.simple import SimpleIndex

        return SimpleIndex(
            http, index_urls, cache_dir=cache_dir, reporter=reporter, sdist_metadata=sdist_metadata
        )

    def layer_cache(
        source: ImageReference | None,
        target: ImageReference | None,
        *,
        cache_dir: Path,
        fetch_blobs: bool = True,
    ) -> RemoteLayers:
        from imagebuild.cache import CacheLayout
        from imagebuild.image.store import BlobStore
        from imagebuild.pipeline.remotecache import RegistryLayerCache

        store = BlobStore(CacheLayout(cache_dir).blobs)
        return RegistryLayerCache(
            client=registry, store=store, source=source, target=target, fetch_blobs=fetch_blobs
        )

    return Ports(
        http=http,
        index=index,
        registry=registry,
        engine=engine,
        host_python=find_host_python,
        reporter=reporter,
        layer_cache=layer_cache,
        resident_hooks=Path(served) if (served := serving_home()) else None,
    )


def platforms(values: list[str] | None) -> tuple[str, ...]:
    """``--platform``, repeated or comma-separated (as docker buildx and ko take them)."""
    if not values:
        return ("linux/amd64",)
    platforms = tuple(p for value in values for p in value.split(",") if p)
    if not platforms:
        raise ProjectError(
            f"--platform {','.join(values)!r}: names no platform",
            hint="use linux/amd64 or linux/arm64 (several with commas)",
        )
    return platforms


def mirrors() -> dict[str, str]:
    """Registry mirrors from ``IMGBUILD_REGISTRY_MIRRORS``."""
    from imagebuild.image.name import parse_mirrors

    return parse_mirrors(os.environ.get("IMGBUILD_REGISTRY_MIRRORS", ""))


def output_values(output: list[str] | None, *, push: bool) -> list[str]:
    """``--output`` values, with ``--push`` as ``registry`` (as docker buildx takes it)."""
    outputs = list(output or ())
    if push and "registry" not in outputs:
        outputs.append("registry")
    return outputs or ["docker"]

"""``imgbuild cache``: where the cache is, what it holds, and emptying or pruning it.

As ``uv cache``: ``dir``, ``size``, ``clean`` and ``prune`` (``--ci``). Cleaning and pruning
wait for running builds on the same cache, and builds for them (``pipeline.cacheadmin``);
``--force`` does not wait.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from imagebuild.commands.options import BuildCacheDir
from imagebuild.commands.wiring import cache_dir as resolve_cache_dir
from imagebuild.commands.wiring import fail
from imagebuild.errors import ImagebuildError, ProjectError

cache_app = typer.Typer(
    help="The cache of wheels, layers and bases builds share: where, how big, clean, prune.",
    no_args_is_help=True,
)

Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Do not wait for running builds on this cache (they may then fail).",
    ),
]
Ci = Annotated[
    bool,
    typer.Option(
        "--ci",
        help="Also remove what builds download again (wheels, index pages, Debian files) "
        "and keep what they built (layers, blobs, built wheels): for a CI cache.",
    ),
]


UnusedFor = Annotated[
    float | None,
    typer.Option(
        "--unused-for",
        metavar="DAYS",
        help="Also remove the layers no build has used for DAYS days (each is made again "
        "when a build needs it).",
    ),
]


@cache_app.command("dir")
def cache_dir(cache_dir: BuildCacheDir = None) -> None:
    """Print the cache directory."""
    typer.echo(str(_root(cache_dir).absolute()))


@cache_app.command("size")
def size(cache_dir: BuildCacheDir = None) -> None:
    """Print what each part of the cache holds (files, bytes), then the total."""
    from imagebuild.pipeline.cacheadmin import cache_usage
    from imagebuild.pipeline.planning import human_size

    root = _root(cache_dir)
    parts = cache_usage(root)
    width = max((len(part.name) for part in parts), default=5)
    for part in parts:
        typer.echo(f"{part.name:<{width}}  {human_size(part.size):>10}  {part.files:>8,} files")
    total = sum(part.size for part in parts)
    files = sum(part.files for part in parts)
    typer.echo(f"{'total':<{width}}  {human_size(total):>10}  {files:>8,} files  ({root})")


@cache_app.command("clean")
def clean(cache_dir: BuildCacheDir = None, force: Force = False) -> None:
    """Remove everything the cache holds."""
    from imagebuild.pipeline.cacheadmin import clean_cache

    root = _root(cache_dir)
    if _found(root):
        try:
            with _alone(root, force):
                removed = clean_cache(root)
        except ImagebuildError as exc:
            fail(exc, verbose=False)
        _removed(removed.files, removed.size, root)


@cache_app.command("prune")
def prune(
    cache_dir: BuildCacheDir = None,
    force: Force = False,
    ci: Ci = False,
    unused_for: UnusedFor = None,
) -> None:
    """Remove what builds left behind and the trees they unpack again from the rest."""
    from imagebuild.pipeline.cacheadmin import prune_cache

    if unused_for is not None and not unused_for >= 0:
        fail(
            ProjectError(
                f"--unused-for {unused_for}: not a number of days",
                hint="give 0 or more days, e.g. --unused-for 30",
            ),
            verbose=False,
        )
    root = _root(cache_dir)
    if _found(root):
        seconds = unused_for * 86400 if unused_for is not None else None
        try:
            with _alone(root, force):
                removed = prune_cache(root, ci=ci, unused_for=seconds)
        except ImagebuildError as exc:
            fail(exc, verbose=False)
        _removed(removed.files, removed.size, root)


def _root(option: Path | None) -> Path:
    try:
        return resolve_cache_dir(option)
    except ImagebuildError as exc:
        fail(exc, verbose=False)


def _found(root: Path) -> bool:
    """Whether ``root`` is a cache to clean or prune (refused in one line if not one)."""
    from imagebuild.pipeline.cacheadmin import check_is_cache

    if not root.is_dir():
        typer.echo(f"no cache at {root}", err=True)
        return False
    try:
        check_is_cache(root)
    except ImagebuildError as exc:
        fail(exc, verbose=False)
    return True


def _alone(root: Path, force: bool) -> AbstractContextManager[None]:
    from imagebuild.pipeline.cacheadmin import cache_to_yourself

    def waiting() -> None:
        typer.echo(
            f"the cache at {root} is in use by a running build; waiting for it to end "
            "(--force: do not wait)",
            err=True,
        )

    return cache_to_yourself(root, force=force, waiting=waiting)


def _removed(files: int, size: int, root: Path) -> None:
    from imagebuild.pipeline.planning import human_size

    typer.echo(f"removed {files:,} files ({human_size(size)}) from {root}", err=True)

"""``imgbuild cache``: where the cache is, what it holds, and emptying or pruning it.

As ``uv cache``: ``dir``, ``size``, ``clean`` and ``prune`` (``--ci``). Cleaning and pruning
wait for running builds on the same cache, and builds for them (``pipeline.cacheadmin``);
``--force`` does not wait.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imagebuild.commands.options import BuildCacheDir
from imagebuild.commands.wiring import cache_dir as resolve_cache_dir
from imagebuild.commands.wiring import fail
from imagebuild.errors import ImagebuildError, ProjectError

if TYPE_CHECKING:
    from imagebuild.pipeline.cacheadmin import Removed

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
        help="Also remove the layers and downloaded wheels no build has used for DAYS days "
        "(each is made or downloaded again when a build needs it).",
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

    _alone(_root(cache_dir), force, clean_cache)


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
    seconds = unused_for * 86400 if unused_for is not None else None
    _alone(_root(cache_dir), force, lambda root: prune_cache(root, ci=ci, unused_for=seconds))


def _root(option: Path | None) -> Path:
    try:
        return resolve_cache_dir(option)
    except ImagebuildError as exc:
        fail(exc, verbose=False)


def _alone(root: Path, force: bool, work: Callable[[Path], Removed]) -> None:
    """Run ``work`` on the cache at ``root`` holding it alone, then say what it removed.

    Not a cache: said, and nothing done; not only a cache, or a file that will not go: one
    line, exit 1.
    """
    from imagebuild.pipeline.cachelock import cache_to_yourself, check_is_cache
    from imagebuild.pipeline.planning import human_size

    if not root.is_dir():
        typer.echo(f"no cache at {root}", err=True)
        return

    def waiting() -> None:
        typer.echo(
            f"the cache at {root} is in use by a running build; waiting for it to end "
            "(--force: do not wait)",
            err=True,
        )

    try:
        check_is_cache(root)
        with cache_to_yourself(root, force=force, waiting=waiting):
            removed = work(root)
    except ImagebuildError as exc:
        fail(exc, verbose=False)
    amount = human_size(removed.size)
    typer.echo(f"removed {removed.files:,} files ({amount}) from {root}", err=True)

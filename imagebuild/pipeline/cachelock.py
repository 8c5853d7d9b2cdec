"""The lock every command holds on the cache it uses, and the marks a cache is given.

Every command that reads or writes a cache holds a shared lock on it (``cache_in_use``,
``flock`` on ``<cache>/.lock``) for as long as it runs; cleaning or pruning
(``pipeline.cacheadmin``) takes the lock alone (``cache_to_yourself``), so it waits for
running builds and builds wait for it, as ``uv cache clean`` does with uv's. The kernel
drops a lock when its process ends, however it ends, so a killed build never leaves the
cache locked. ``force`` skips the lock: a build running then may fail, but what it leaves is
still read back as every cache entry is (a layer record whose blob is gone is a miss, not
an error).

Apart from ``pipeline.cacheadmin``, which imports it, so that a build's start-up does not
pay for the measuring and removing it never does.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from imagebuild.cache import CACHE_DIR_ENV, CacheLayout, write_atomic
from imagebuild.errors import ProjectError

LOCK_NAME = ".lock"
"""The file every command holding the cache locks (never removed: a new one would not
exclude those holding the old)."""
MARKERS = {
    "CACHEDIR.TAG": b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by imgbuild.\n"
    b"# For information about cache directory tags see https://bford.info/cachedir/\n",
    ".gitignore": b"*\n",
}
"""Files a cache is given as a command leaves it, as uv's is, and kept by ``clean``: backup
tools that honour cache directory tags skip it, and git ignores a cache kept in a checkout
(``--cache-dir .imgbuild-cache``)."""


@contextmanager
def cache_in_use(root: Path, *, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``root`` shared while the block runs; ``waiting`` is called if a clean holds it.

    A cache that does not exist yet is not made here (a bad input then leaves no directory
    behind): there is nothing to clean, and ``cache clean`` says so instead of waiting.
    """
    try:
        if not root.is_dir():
            yield
            return
        with _locked(root, fcntl.LOCK_SH, waiting):
            yield
    finally:
        _mark(root)  # a first build made it: marked on the way out


def _mark(root: Path) -> None:
    """Give the cache at ``root`` its markers (``MARKERS``) where it lacks them.

    Not a directory holding what imgbuild does not make (``check_is_cache``): a cache pointed
    at a home directory or a project must not gain a ``.gitignore`` of everything.
    """
    missing = [name for name in MARKERS if not (root / name).exists()]
    if not missing or not root.is_dir():
        return
    try:
        check_is_cache(root)
    except ProjectError:
        return
    for name in missing:
        try:
            write_atomic(root / name, MARKERS[name], durable=False)
        except OSError:
            pass  # a marker is a courtesy to other tools, never worth a failed build


@contextmanager
def cache_to_yourself(
    root: Path, *, force: bool = False, waiting: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold ``root`` alone while the block runs (``force``: without waiting or locking)."""
    if force:
        yield
        return
    with _locked(root, fcntl.LOCK_EX, waiting):
        yield


@contextmanager
def _locked(root: Path, mode: int, waiting: Callable[[], None] | None) -> Iterator[None]:
    """``flock`` ``root``'s lock file for the block; where it cannot be, the block runs as is.

    Read-only, and readable by all, so users sharing a cache share its lock. A file system
    without locks (some NFS mounts) leaves builds unlocked rather than failing them.
    """
    try:
        fd = os.open(root / LOCK_NAME, os.O_CREAT | os.O_RDONLY, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, mode)
        except OSError:
            pass  # no locks here
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor


def check_is_cache(root: Path) -> None:
    """Refuse, in one line, a directory holding what no imgbuild cache holds.

    Cleaning ``--cache-dir .`` in a project, or a home directory, must not remove it.
    """
    known = _bucket_names()
    for entry in cache_entries(root):
        if entry.name not in known and not entry.name.startswith(".tmp-"):
            raise ProjectError(
                f"{root} is not an imgbuild cache: it holds {entry.name!r}, which imgbuild "
                "does not make, so nothing was removed",
                hint=f"name the cache itself (--cache-dir, {CACHE_DIR_ENV}; `imgbuild cache "
                "dir` prints it), or remove what it holds yourself",
            )


def _bucket_names() -> frozenset[str]:
    """The names of the cache directory's entries (``CacheLayout``'s buckets)."""
    layout = CacheLayout(Path("/"))
    buckets = (name for name, value in vars(CacheLayout).items() if isinstance(value, property))
    return frozenset({"debian", *(getattr(layout, name).name for name in buckets)})


def cache_entries(root: Path) -> Iterator[Path]:
    """What the cache directory holds, but its lock file and its markers."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    yield from (entry for entry in entries if entry.name != LOCK_NAME and entry.name not in MARKERS)

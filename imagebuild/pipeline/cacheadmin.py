"""The cache as its owner sees it (``imgbuild cache``): its size, cleaning it, pruning it.

Every command that reads or writes a cache holds a shared lock on it (``cache_in_use``,
``flock`` on ``<cache>/.lock``) for as long as it runs; cleaning or pruning takes the lock
alone (``cache_to_yourself``), so it waits for running builds and builds wait for it, as
``uv cache clean`` does with uv's. The kernel drops a lock when its process ends, however
it ends, so a killed build never leaves the cache locked. ``force`` skips the lock: a
build running then may fail, but what it leaves is still read back as every cache entry
is (a layer record whose blob is gone is a miss, not an error).

Cleaning removes everything in the cache directory but the lock file and ``MARKERS``, and
the build environments this cache keeps in memory (``cache.build_envs_memory``). Pruning
removes what no build needs and what a build makes again from the rest without the network:
scratch trees and temporary files left by killed builds, and unpacked trees (bases' filesystems,
build environments in memory). ``ci`` also removes what a build downloads again when it
needs it (wheels, Simple API pages, metadata, Debian archive files) and keeps what it
built (layers, blobs, built wheels, build environments): a CI cache then holds what saves
a runner time, as ``uv cache prune --ci`` keeps built wheels and drops downloaded ones.
``unused_for`` also removes the layers no build has read for that long (``_unused``): each
code change makes a new project layer, and a developer's cache kept them all.

A Debian archive cache shared through ``IMGBUILD_DEBIAN_CACHE`` is other caches' too: it is
never removed from here. Bases unpacked in memory (``<memory>/rootfs``) are one user's,
shared by all of their caches, and leave on their own once idle (``cache.ROOTFS_IDLE``).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagebuild.cache import (
    CACHE_DIR_ENV,
    DEBIAN_CACHE_ENV,
    CacheLayout,
    build_envs_memory,
    sweep_scratch,
    write_atomic,
)
from imagebuild.digest import Digest
from imagebuild.errors import ImageError, ProjectError
from imagebuild.image.store import BlobStore

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


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    """What one part of the cache holds."""

    name: str
    """The bucket's name (``CacheLayout``), or ``build-envs (memory)``."""
    path: Path
    files: int
    size: int
    """Bytes of the files' contents, a file linked twice counted once."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Removed:
    """What a clean or a prune took away."""

    files: int
    size: int


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


def cache_usage(root: Path) -> tuple[Usage, ...]:
    """What each bucket of the cache at ``root`` holds, by name; empty buckets left out.

    Entries the layout does not name (an older imgbuild's) are counted under their own name.
    """
    seen: set[tuple[int, int]] = set()
    parts = [(entry.name, entry) for entry in _entries(root)]
    memory = build_envs_memory(CacheLayout(root).build_envs)
    if memory is not None:
        parts.append(("build-envs (memory)", memory))
    shared = _shared_debian()
    if shared is not None:
        parts.append((f"debian ({DEBIAN_CACHE_ENV})", shared))
    found = []
    for name, path in sorted(parts):
        files, size = _measure(path, seen)
        if files:
            found.append(Usage(name=name, path=path, files=files, size=size))
    return tuple(found)


def check_is_cache(root: Path) -> None:
    """Refuse, in one line, a directory holding what no imgbuild cache holds.

    Cleaning ``--cache-dir .`` in a project, or a home directory, must not remove it.
    """
    known = _bucket_names()
    for entry in _entries(root):
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


def clean_cache(root: Path) -> Removed:
    """Remove everything the cache at ``root`` holds (see the module's docstring)."""
    targets = list(_entries(root))
    memory = build_envs_memory(CacheLayout(root).build_envs)
    if memory is not None:
        targets.append(memory)
    return _remove_all(targets)


def prune_cache(root: Path, *, ci: bool = False, unused_for: float | None = None) -> Removed:
    """Remove what no build needs, and with ``ci`` what it downloads again (see above).

    ``unused_for``: also the layers no build has read for that many seconds (``_unused``).
    """
    layout = CacheLayout(root)
    stale = _unused(layout, unused_for) if unused_for is not None else []
    before = _measure(layout.tmp, set())
    sweep_scratch(layout.tmp)
    after = _measure(layout.tmp, set())
    targets = [layout.rootfs]  # bases' trees, unpacked again from their blobs
    memory = build_envs_memory(layout.build_envs)
    if memory is not None:
        targets.append(memory)
    if ci:  # what a build downloads again when it needs it
        targets.extend((layout.wheels, layout.http, layout.pages_parsed, layout.metadata))
        if _shared_debian() is None:
            targets.append(layout.debian)
    removed = _remove_all(targets + stale)
    parts = _remove_all(_temporary_files(root))
    return Removed(  # a build let run (``force``) may have added to tmp/ meanwhile
        files=removed.files + parts.files + max(0, before[0] - after[0]),
        size=removed.size + parts.size + max(0, before[1] - after[1]),
    )


_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def _unused(layout: CacheLayout, seconds: float) -> list[Path]:
    """Layer and SBOM records no build has read for ``seconds``, and the blobs only they name.

    A build touches each record it reads (``layerwork.read_layer_record``, ``sbom._kept``),
    so a record's time is its last use; a blob also named by a record still in use, or by a
    base whose facts the cache keeps (its manifest's config and layers, which a base built
    here has nowhere else), stays. A record removed is a miss: the layer is made again.
    """
    cutoff = time.time() - seconds
    stale: list[Path] = []
    named_by_stale: set[str] = set()
    kept = _base_blobs(layout)
    for record in sorted(layout.layers.glob("*.json")):
        try:
            used = record.stat().st_mtime
            named = set(_DIGEST.findall(record.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
        if used < cutoff:
            stale.append(record)
            named_by_stale |= named
        else:
            kept |= named
    store = BlobStore(layout.blobs)
    return stale + [store.path(Digest(f"sha256:{hex_}")) for hex_ in sorted(named_by_stale - kept)]


def _base_blobs(layout: CacheLayout) -> set[str]:
    """The blobs of the bases the cache keeps facts of: manifests, configs, layers."""
    store = BlobStore(layout.blobs)
    named: set[str] = set()
    for facts in layout.bases.glob("*.json"):
        named.add(facts.stem)
        try:
            manifest = store.path(Digest(f"sha256:{facts.stem}")).read_text(errors="replace")
        except (OSError, ImageError):  # not a digest's name: no base's facts
            continue
        named |= set(_DIGEST.findall(manifest))
    return named


def _entries(root: Path) -> Iterator[Path]:
    """What the cache directory holds, but its lock file and its markers."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    yield from (entry for entry in entries if entry.name != LOCK_NAME and entry.name not in MARKERS)


def _shared_debian() -> Path | None:
    shared = os.environ.get(DEBIAN_CACHE_ENV)
    return Path(shared) if shared else None


def _temporary_files(root: Path) -> list[Path]:
    """The ``.tmp-*.part`` files an interrupted atomic write left (``cache.atomic_writer``)."""
    found: list[Path] = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not Path(top, d).is_symlink()]
        found.extend(Path(top, f) for f in files if f.startswith(".tmp-") and f.endswith(".part"))
    return sorted(found)


def _measure(path: Path, seen: set[tuple[int, int]]) -> tuple[int, int]:
    """Files under ``path`` (or ``path`` itself) and their bytes; ``seen`` inodes skipped."""
    files = size = 0
    for file in _files(path):
        try:
            info = file.lstat()
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        files += 1
        size += info.st_size
    return files, size


def _files(path: Path) -> Iterator[Path]:
    if path.is_symlink() or path.is_file():
        yield path
        return
    for top, dirs, files in os.walk(path):
        links = [d for d in dirs if Path(top, d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        yield from (Path(top, name) for name in (*files, *links))


def _remove_all(targets: list[Path]) -> Removed:
    """Remove each of ``targets``, file or tree, and count what went."""
    files = size = 0
    for target in targets:
        counted = _measure(target, set())
        if _remove(target):
            files += counted[0]
            size += counted[1]
    return Removed(files=files, size=size)


def _remove(path: Path) -> bool:
    """Remove ``path`` (a tree: its read-only directories made writable first).

    One that cannot be removed stops the clean or the prune, in one line.
    """
    if not path.exists() and not path.is_symlink():
        return False

    def writable_then_again(func: Callable[[str], object], name: str, _: object) -> None:
        parent = os.path.dirname(name)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        func(name)

    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, onerror=writable_then_again)
    except OSError as exc:  # another user's files in a shared cache, say
        raise ProjectError(
            f"cannot remove {exc.filename or path}: {exc.strerror or exc}; what was removed "
            "before it stays removed",
            hint="check the owner and permissions there, or run as the cache's owner",
        ) from exc
    return True

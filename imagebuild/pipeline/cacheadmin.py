"""The cache as its owner sees it (``imgbuild cache``): its size, cleaning it, pruning it.

Every command using a cache holds it shared, and cleaning or pruning holds it alone
(``pipeline.cachelock``): they wait for running builds, and builds wait for them.

Cleaning removes everything in the cache directory but the lock file and ``MARKERS``, and
the build environments this cache keeps in memory (``cache.build_envs_memory``). Pruning
removes what no build needs and what a build makes again from the rest without the network:
scratch trees and temporary files left by killed builds, and unpacked trees (bases' filesystems,
build environments in memory). ``ci`` also removes what a build downloads again when it
needs it (wheels, Simple API pages, metadata, Debian archive files) and keeps what it
built (layers, blobs, built wheels, build environments): a CI cache then holds what saves
a runner time, as ``uv cache prune --ci`` keeps built wheels and drops downloaded ones.
``unused_for`` also removes the layers no build has read for that long (``_unused``), and the
downloaded wheels no build has planned for that long: each code change makes a new project
layer, each upgrade downloads new wheels, and a developer's cache kept them all.

A Debian archive cache shared through ``IMGBUILD_DEBIAN_CACHE`` is other caches' too: it is
never removed from here. Bases unpacked in memory (``<memory>/rootfs``) are one user's,
shared by all of their caches, and leave on their own once idle (``cache.ROOTFS_IDLE``).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imagebuild.cache import DEBIAN_CACHE_ENV, CacheLayout, build_envs_memory, stale_scratch
from imagebuild.digest import Digest
from imagebuild.errors import ImageError, ProjectError
from imagebuild.image.store import BlobStore
from imagebuild.pipeline.cachelock import cache_entries


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    """What one part of the cache holds."""

    name: str
    """The bucket's name (``CacheLayout``), or ``build-envs (memory)``."""
    files: int
    size: int
    """Bytes of the files' contents, a file linked twice counted once."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Removed:
    """What a clean or a prune took away."""

    files: int
    size: int


def cache_usage(root: Path) -> tuple[Usage, ...]:
    """What each bucket of the cache at ``root`` holds, by name; empty buckets left out.

    Entries the layout does not name (an older imgbuild's) are counted under their own name.
    """
    seen: set[tuple[int, int]] = set()
    parts = [(entry.name, entry) for entry in cache_entries(root)]
    parts += [("build-envs (memory)", memory) for memory in _memory_envs(CacheLayout(root))]
    shared = _shared_debian()
    if shared is not None:
        parts.append((f"debian ({DEBIAN_CACHE_ENV})", shared))
    found = []
    for name, path in sorted(parts):
        files, size = _measure(path, seen)
        if files:
            found.append(Usage(name=name, files=files, size=size))
    return tuple(found)


def clean_cache(root: Path) -> Removed:
    """Remove everything the cache at ``root`` holds (see the module's docstring)."""
    return _remove_all([*cache_entries(root), *_memory_envs(CacheLayout(root))])


def prune_cache(root: Path, *, ci: bool = False, unused_for: float | None = None) -> Removed:
    """Remove what no build needs, and with ``ci`` what it downloads again (see above).

    ``unused_for``: also the layers no build has read for that many seconds (``_unused``).
    """
    layout = CacheLayout(root)
    targets = [
        *stale_scratch(layout.tmp),  # killed builds' trees
        layout.rootfs,  # bases' trees, unpacked again from their blobs
        *_memory_envs(layout),
    ]
    if ci:  # what a build downloads again when it needs it
        targets.extend((layout.wheels, layout.http, layout.pages_parsed, layout.metadata))
        if _shared_debian() is None:
            targets.append(layout.debian)
    if unused_for is not None:
        targets.extend(_unused(layout, unused_for))
    removed = _remove_all(targets)
    parts = _remove_all(_temporary_files(root))
    return Removed(files=removed.files + parts.files, size=removed.size + parts.size)


def _memory_envs(layout: CacheLayout) -> list[Path]:
    """Where this cache keeps build environments in memory, if it does."""
    memory = build_envs_memory(layout.build_envs)
    return [memory] if memory is not None else []


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
    blobs = [store.path(Digest(f"sha256:{hex_}")) for hex_ in sorted(named_by_stale - kept)]
    return stale + blobs + _unused_wheels(layout.wheels, cutoff)


def _unused_wheels(bucket: Path, cutoff: float) -> list[Path]:
    """The downloaded wheels no build has planned since ``cutoff``: entries and their locks.

    A build touches each wheel its lock chooses (``pipeline.wheels``), fetched or not, so a
    wheel's time is its last use; one removed is downloaded again when a build needs it.
    """
    stale: list[Path] = []
    for entry in sorted(bucket.glob("sha256/*/*")):
        if not entry.is_dir():
            continue
        try:
            used = max((f.stat().st_mtime for f in entry.iterdir()), default=0.0)
        except OSError:
            continue
        if used < cutoff:
            stale.append(entry)
            lock = entry.with_name(entry.name + ".lock")
            if lock.is_file():
                stale.append(lock)
    return stale


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

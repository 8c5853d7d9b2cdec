"""The cache: every bucket named once (``CacheLayout``) and the one atomic write.

Every cache record, lock file and page the stages write goes through ``write_atomic`` (or
``atomic_writer`` for a stream), so a killed run leaves either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import platformdirs

CACHE_DIR_ENV = "IMGBUILD_CACHE_DIR"
"""The environment variable that moves the cache (``--cache-dir`` wins over it)."""


def default_cache_root() -> Path:
    """The cache directory when none is given: ``IMGBUILD_CACHE_DIR``, else the user cache.

    The user cache is platformdirs' (``~/.cache/imgbuild`` on Linux). An empty variable
    counts as unset.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir("imgbuild", appauthor=False))


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Where each kind of cached thing lives under one cache directory.

    Buckets are named here and nowhere else; stages take the ``Path`` they are given.
    """

    root: Path
    """The cache directory (``--cache-dir``, ``IMGBUILD_CACHE_DIR`` or the user cache)."""

    @property
    def wheels(self) -> Path:
        """Downloaded wheels, by sha256 (``WheelCache``)."""
        return self.root / "wheels"

    @property
    def blobs(self) -> Path:
        """OCI blobs by digest: layers, configs, manifests (``BlobStore``)."""
        return self.root / "blobs"

    @property
    def layers(self) -> Path:
        """Finished layers' records, by the key of what went into them."""
        return self.root / "layers"

    @property
    def bases(self) -> Path:
        """Facts read off a base image, by its manifest digest."""
        return self.root / "bases"

    @property
    def build_envs(self) -> Path:
        """Kept PEP 517 build environments, by their requirements."""
        return self.root / "build-envs"

    @property
    def http(self) -> Path:
        """Simple API pages with their validators."""
        return self.root / "http"

    @property
    def pages_parsed(self) -> Path:
        """Large Simple API pages kept parsed, by their bytes."""
        return self.root / "pages-parsed"

    @property
    def metadata(self) -> Path:
        """PEP 658 metadata files (immutable)."""
        return self.root / "metadata"

    @property
    def sdist_metadata(self) -> Path:
        """Core metadata that sdists' backends prepared, by the sdist's sha256."""
        return self.root / "sdist-metadata"

    @property
    def sdist_wheels(self) -> Path:
        """Wheels built from sdists, by the sdist's sha256."""
        return self.root / "sdist-wheels"

    @property
    def git(self) -> Path:
        """Git sources: bare mirrors by URL, metadata and wheels by commit (``build.direct``)."""
        return self.root / "git"

    @property
    def lock_hints(self) -> Path:
        """The names a project's last lock needed (a prefetch hint, nothing more)."""
        return self.root / "lock-hints"

    @property
    def tmp(self) -> Path:
        """Scratch space on the cache's filesystem, so staging and blobs rename into place."""
        return self.root / "tmp"


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into; it replaces ``path`` on a clean exit.

    The bytes are flushed to disk before the rename, so a crash after it never leaves an
    entry whose name is there and whose content is not. An exception inside the block
    (a hash that did not match) removes the temporary file and leaves ``path`` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (creating its directory); OSError propagates."""
    with atomic_writer(path) as out:
        out.write(data)


def write_json(path: Path, data: object) -> None:
    """Write a JSON record atomically, keys sorted."""
    write_atomic(path, json.dumps(data, sort_keys=True).encode("utf-8"))

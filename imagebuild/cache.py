"""The cache: every bucket named once (``CacheLayout``), the one atomic write, scratch trees.

Every cache record, lock file and page the stages write goes through ``write_atomic`` (or
``atomic_writer`` for a stream), so a killed run leaves either the old file or the new one,
never a torn one.

A build's scratch tree (``scratch_tree``) lives under the cache's ``tmp/`` and holds a lock
file its process keeps locked (``flock``) while the build runs. The kernel drops the lock
when the process dies, however it dies, so ``sweep_scratch`` (run as a build starts) can
tell a tree that ``kill -9`` left behind from one a concurrent build is still using.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import platformdirs

from imagebuild.errors import ImagebuildError

CACHE_DIR_ENV = "IMGBUILD_CACHE_DIR"
DEBIAN_CACHE_ENV = "IMGBUILD_DEBIAN_CACHE"
"""Where Debian archive files are kept when set (else ``<cache>/debian``): everything in it
is named by its sha256 or checked against a signed Release, so caches may share one."""
"""The environment variable that moves the cache (``--cache-dir`` wins over it)."""

SCRATCH_PREFIX = "imgbuild-"
"""Names of build scratch trees under ``CacheLayout.tmp`` (and of nothing else there)."""
_NEW_PREFIX = ".new-imgbuild-"
_OWNER = ".imgbuild-owner"
# A tree still under its new name this long after it was made lost its process before
# taking the lock (which takes microseconds).
_NEW_GRACE_SECONDS = 60.0


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
    def debian(self) -> Path:
        """Debian archive files: Release files, Packages and Contents indexes, .debs.

        ``IMGBUILD_DEBIAN_CACHE`` when set: content-addressed, so caches may share one.
        """
        shared = os.environ.get(DEBIAN_CACHE_ENV)
        return Path(shared) if shared else self.root / "debian"

    @property
    def elf(self) -> Path:
        """The libraries ELF files need and provide, read off wheels and base layers."""
        return self.root / "elf"

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
    def compiler_hints(self) -> Path:
        """The compiler each base's last build ran (started early next time: a hint only)."""
        return self.root / "compiler-hints"

    @property
    def rootfs(self) -> Path:
        """Base images' filesystems unpacked, by manifest digest (to run their Python here)."""
        return self.root / "rootfs"

    @property
    def tmp(self) -> Path:
        """Scratch space on the cache's filesystem, so staging and blobs rename into place."""
        return self.root / "tmp"


_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL


def _temporary_name(directory: Path) -> Path:
    """A new ``.tmp-*.part`` name in ``directory``, not yet a file.

    Named before the file is made, so an interruption (SIGTERM raised as ``Terminated``)
    that lands just after the file is created still finds its name to remove; with
    ``mkstemp`` the name came back only after, and a file could stay behind.
    """
    return directory / f".tmp-{os.urandom(8).hex()}.part"


@contextmanager
def atomic_writer(path: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into; it replaces ``path`` on a clean exit.

    The bytes are flushed to disk before the rename, so a crash after it never leaves an
    entry whose name is there and whose content is not. An exception inside the block
    (a hash that did not match) removes the temporary file and leaves ``path`` as it was.
    ``durable=False`` skips the flush (about 2 ms each), for records whose reader takes one
    that does not read back (a power cut's empty file) as missing: a killed process still
    leaves the whole content, which the kernel holds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path.parent)
    try:
        with os.fdopen(os.open(tmp, _CREATE_NEW, 0o600), "wb") as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_or_copy_atomic(source: Path, dest: Path) -> None:
    """Put ``source``'s bytes at ``dest`` through a temporary name and a rename.

    For outputs (an OCI layout's blobs), not cache entries. A hard link when both sit on
    one file system: a blob is named by its digest and never written again, so the layout
    and the blob store can share it, and a code change's layout of hundreds of MB costs
    no copy (uv links its cache into environments the same way). Otherwise an in-kernel
    copy, flushed by nobody: a flush costs as much as the copy itself.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(dest.parent)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (creating its directory); OSError propagates."""
    with atomic_writer(path, durable=durable) as out:
        out.write(data)


def write_json(path: Path, data: object, *, durable: bool = True) -> None:
    """Write a JSON record atomically, keys sorted (``durable``: see ``atomic_writer``)."""
    write_atomic(path, json.dumps(data, sort_keys=True).encode("utf-8"), durable=durable)


def check_cache_root(root: Path, source: str) -> None:
    """Refuse, in one line, a cache directory that cannot be made or written.

    Nothing is created: the directory itself if it exists, else its nearest existing
    parent, gets a probe file that is removed at once. ``source`` says where the path came
    from (``--cache-dir``, ``IMGBUILD_CACHE_DIR``, the user cache), to name what to change.
    """
    probe_dir = root
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    hint = f"pass --cache-dir DIR with a writable directory, or set {CACHE_DIR_ENV}"
    if not probe_dir.is_dir():
        where = "is a file" if probe_dir == root else f"is under a file ({probe_dir})"
        raise ImagebuildError(
            f"cache directory {root} ({source}) {where}, not a directory", hint=hint
        )
    try:
        with tempfile.TemporaryFile(dir=probe_dir, prefix=".imgbuild-probe-"):
            pass
    except OSError as exc:
        where = "" if probe_dir == root else f" ({probe_dir} refuses new files)"
        raise ImagebuildError(
            f"cache directory {root} ({source}) is not writable{where}: {exc.strerror or exc}",
            hint=hint,
        ) from exc


MEMORY_STAGING_ENV = "IMGBUILD_MEMORY_STAGING"
"""Set to ``0`` to stage layers on the cache's disk even when memory could hold them."""
_SHM = Path("/dev/shm")
_SHM_ROOM = 2 << 30  # free bytes a memory file system needs before layers are staged there


def memory_scratch_root() -> Path | None:
    """Where layer trees are staged when a memory file system (``/dev/shm``) has room.

    A layer is spread into a tree of files, compiled, tarred and removed within seconds.
    On disk, creating and deleting tens of thousands of files costs the kernel more than
    the build's own work (ext4 looks for a free inode past every recently deleted one);
    in memory it costs next to nothing, and each tree lives only as long as its layer
    takes. ``None``: no such file system, too little room on it (a container's 64 MB), or
    ``IMGBUILD_MEMORY_STAGING=0``; layers are then staged under the build's scratch tree.
    """
    if os.environ.get(MEMORY_STAGING_ENV, "").strip() == "0":
        return None
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace")
        free = os.statvfs(_SHM)
    except OSError:
        return None
    on_tmpfs = any(line.split()[1:3] == [str(_SHM), "tmpfs"] for line in mounts.splitlines())
    if not on_tmpfs or free.f_bavail * free.f_frsize < _SHM_ROOM:
        return None
    root = _SHM / f"imgbuild-{os.getuid()}"  # one a user: /dev/shm is shared
    try:
        root.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    return root if root.is_dir() and os.access(root, os.W_OK | os.X_OK) else None


ROOTFS_IDLE = 24 * 3600
"""Seconds after which a base's tree kept in memory, unused, is removed (``rootfs_home``)."""


def rootfs_home(disk: Path, name: str) -> Path:
    """Where the base named ``name`` (its manifest digest's hex) is, or is to be, unpacked.

    In memory (``<memory staging root>/rootfs``) when there is room there and programs may run
    from it, and on disk (``disk``, the cache's ``rootfs``) otherwise or when the tree is
    already there. An unpack creates hundreds of files, and on ext4 the kernel's share of that
    took a cold build's critical path 0.2-0.4 s, on tmpfs 0.1 s. A tree in memory lasts until
    the machine restarts (the next build unpacks it again from the base's blob, kept on disk),
    and trees no build has used for ``ROOTFS_IDLE`` seconds are removed when another is unpacked
    there (``forget_idle_trees``), so memory does not fill with old bases.
    """
    if (disk / name).is_dir():
        return disk
    memory = memory_scratch_root()
    if memory is None or not _allows_exec(_SHM):
        return disk  # a noexec /dev/shm (hardened hosts) could not start the base's loader
    return memory / "rootfs"


def build_envs_memory(disk: Path) -> Path | None:
    """Where the cache whose build environments are at ``disk`` makes new ones in memory.

    ``<memory staging root>/build-envs/<its own name>``, named after ``disk``, so each cache
    keeps its own (a new cache directory still starts cold), when there is room there and
    programs may run from it; None otherwise (they are then made at ``disk``). A kept
    environment unpacked on a fresh CI runner is 350 files: on ext4 the kernel's share of
    creating them held the project's wheel back (a FastAPI CI run, 14% of its time).
    An environment in memory lasts until the machine restarts (it is then made again, from
    the local or the registry cache), and those unused for ``ROOTFS_IDLE`` seconds are
    removed when another is made there (``forget_idle_trees``).
    """
    memory = memory_scratch_root()
    if memory is None or not _allows_exec(_SHM):
        return None
    name = hashlib.sha256(str(disk.absolute()).encode()).hexdigest()[:16]
    return memory / "build-envs" / name


def _allows_exec(mount_point: Path) -> bool:
    """Whether programs may run from the file system mounted at ``mount_point``."""
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return mount_allows_exec(mounts, mount_point)


def mount_allows_exec(mounts: str, mount_point: Path) -> bool:
    """Whether ``mounts`` (``/proc/self/mounts``) mounts ``mount_point`` without ``noexec``.

    The last line for that point counts, as the last mount there hides the others.
    """
    options = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == str(mount_point):
            options = fields[3].split(",")
    return options is not None and "noexec" not in options


def mark_used(tree: Path) -> None:
    """Touch ``tree``'s time, or a file's (no matter if it cannot).

    ``forget_idle_trees`` and ``imgbuild cache prune --unused-for`` go by it.
    """
    try:
        os.utime(tree)
    except OSError:
        pass


def forget_idle_trees(home: Path, *, idle: float = ROOTFS_IDLE) -> None:
    """Remove the trees of ``home`` not used (their time touched) for ``idle`` seconds.

    Only in memory: the disk cache's trees are the cache's, kept until it is cleared. An
    unpack left half done by a build that died goes the same way. Files beside the trees
    (their lock files) are left.
    """
    memory = memory_scratch_root()
    if memory is None or memory not in home.parents or not home.is_dir():
        return
    cutoff = time.time() - idle
    for tree in home.iterdir():
        try:
            stale = tree.stat().st_mtime < cutoff
        except OSError:
            continue
        if stale and tree.is_dir():
            shutil.rmtree(tree, ignore_errors=True)


@contextmanager
def scratch_tree(tmp_root: Path) -> Iterator[Path]:
    """A fresh scratch tree under ``tmp_root``, owned (locked) until the block ends.

    It is made under a name the sweep ignores, locked, then renamed to its final
    ``imgbuild-*`` name, so no sweep ever sees it unlocked. The tree is removed on the
    way out, whatever ends the block (an error, Ctrl-C, SIGTERM turned into one).
    """
    tmp_root.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=tmp_root))
    fd = os.open(new / _OWNER, os.O_CREAT | os.O_RDWR, 0o600)
    tree = tmp_root / (SCRATCH_PREFIX + new.name.removeprefix(_NEW_PREFIX))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        new.rename(tree)
        yield tree
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
        os.close(fd)


def sweep_scratch(tmp_root: Path) -> int:
    """Remove scratch trees no live process owns (``stale_scratch``); return how many."""
    stale = stale_scratch(tmp_root)
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
    return len(stale)


def stale_scratch(tmp_root: Path) -> list[Path]:
    """The scratch trees under ``tmp_root`` that no live process owns.

    A tree whose owner lock can be taken, or that has no owner file (made before trees
    had one, or half removed), was left by a killed build. Trees of running builds hold
    their lock and are left alone, so concurrent builds on one cache never sweep each other.
    """
    try:
        entries = sorted(tmp_root.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        if entry.name.startswith(SCRATCH_PREFIX):
            dead = _unowned(entry)
        elif entry.name.startswith(_NEW_PREFIX):
            dead = _unowned(entry) and _age(entry) > _NEW_GRACE_SECONDS
        else:
            continue
        if dead:
            stale.append(entry)
    return stale


def _unowned(tree: Path) -> bool:
    """Whether no process holds ``tree``'s owner lock (taken and let go here at once)."""
    if not tree.is_dir() or tree.is_symlink():
        return False
    try:
        fd = os.open(tree / _OWNER, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0

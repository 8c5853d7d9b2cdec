"""A base image's filesystem unpacked on the host, so its own interpreter can run here.

Only what running Python needs is unpacked: the library directories (the dynamic loader,
C libraries, the standard library) and the ``python*`` files of the ``bin`` directories.
Layers are applied in order as an engine would (OCI whiteouts: ``.wh.NAME`` removes a path,
``.wh..wh..opq`` empties a directory), into a directory of the cache named by the base's
manifest digest. Only regular files, directories and links are made; device files and
anything whose name or link would leave the tree are skipped (a base is trusted less than
the host). The tree appears whole or not at all: it is built beside its final name and
renamed into place.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from imagebuild.digest import digest_hex
from imagebuild.errors import ImageError
from imagebuild.image.model import BaseImage
from imagebuild.image.store import LayerFiles

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"


def unpack_rootfs(
    base: BaseImage,
    store: LayerFiles,
    into: Path,
    *,
    made: Callable[[Path], None] | None = None,
) -> Path:
    """The base's filesystem under ``into/<manifest hex>``, unpacked once and kept.

    Each use touches the tree's time (what ``cache.forget_idle_trees`` goes by); ``made``
    is called with ``into`` after an unpack.
    """
    root = into / digest_hex(base.manifest_digest)
    if root.is_dir():
        _touch(root)
        return root
    into.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into))
    try:
        tree = _Tree(staging)
        for layer in base.layers:
            _apply(store.path(layer.digest), tree)
        try:
            staging.rename(root)
        except OSError:
            if not root.is_dir():  # another build won the race: theirs is as good
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _touch(root)
    if made is not None:
        made(into)
    return root


def _touch(root: Path) -> None:
    try:
        os.utime(root)
    except OSError:
        pass


class _Tree:
    """The tree being unpacked, and which of its directories resolve inside it.

    Resolving every member's directory cost an unpack a sixth of its time, so each answer
    is kept until something that could change it happens under that directory: a link made
    or a path removed (a directory replaced by a link out of the tree is asked again).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real = root.resolve()
        self._inside: dict[Path, bool] = {}

    def inside(self, directory: Path) -> bool:
        """Whether ``directory`` resolves inside the tree (no link leads out)."""
        known = self._inside.get(directory)
        if known is None:
            known = self._inside[directory] = _inside(self.real, directory)
        return known

    def changed(self, path: Path) -> None:
        """``path`` became a link or went away: forget what resolved through it."""
        self._inside = {
            directory: known
            for directory, known in self._inside.items()
            if directory != path and path not in directory.parents
        }


def _apply(blob: Path, tree: _Tree) -> None:
    """Apply one layer tar (gzip or plain) over ``tree``."""
    try:
        with _open(blob) as tar:
            for member in tar:
                _apply_member(tar, member, tree)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(f"base layer {blob.name}: cannot unpack ({exc})") from exc


def _open(blob: Path) -> tarfile.TarFile:
    with blob.open("rb") as head:
        gzipped = head.read(2) == b"\x1f\x8b"
    if gzipped:
        return tarfile.open(fileobj=gzip.open(blob, "rb"), mode="r|")
    return tarfile.open(blob, mode="r|")


def _apply_member(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: _Tree) -> None:
    path = PurePosixPath(member.name.lstrip("/"))
    if not path.parts or ".." in path.parts or path.is_absolute() or not _wanted(path):
        return
    root = tree.root
    parent, name = root.joinpath(*path.parts[:-1]), path.name
    if not tree.inside(parent):
        return
    if name == _OPAQUE:
        _empty(parent)
        tree.changed(parent)
        return
    if name.startswith(_WHITEOUT):
        _remove(parent / name[len(_WHITEOUT) :])
        tree.changed(parent / name[len(_WHITEOUT) :])
        return
    target = parent / name
    if member.isdir():
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            _remove(target)
            tree.changed(target)
        target.mkdir(parents=True, exist_ok=True)
        return
    parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.is_dir():
        tree.changed(target)
    _remove(target)
    if member.issym():
        target.symlink_to(member.linkname)
        tree.changed(target)
    elif member.islnk():
        source = root / member.linkname.lstrip("/")
        if _inside(tree.real, source) and source.is_file():
            os.link(source, target)
    elif member.isfile():
        _write_file(tar, member, target)


_LIB_DIRS = frozenset({"lib", "lib32", "lib64", "libx32"})
_BIN_DIRS = frozenset({("bin",), ("usr", "bin"), ("usr", "local", "bin")})


# Parts of library trees no Python compiling bytecode loads: perl, iconv modules, PAM,
# terminal and locale data, init units, and the standard library's tests and GUIs. Writing
# files is most of an unpack's time, and these are half of a slim base's.
_SKIPPED = frozenset(
    {
        "perl", "perl5", "perl-base", "gconv", "security", "terminfo", "locale", "systemd",
        "udev", "apt", "dpkg", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
        "lib2to3", "pydoc_data",
    }
)  # fmt: skip


def _wanted(path: PurePosixPath) -> bool:
    """Library trees (with whiteouts in them), and python files of the bin directories."""
    parts = path.parts
    if _SKIPPED.intersection(parts[1:]):
        return False
    if parts[0] in _LIB_DIRS:
        return True
    if parts[0] == "usr" and len(parts) > 1:
        rest = parts[2:] if parts[1] == "local" else parts[1:]
        if rest and rest[0] in _LIB_DIRS:
            return True
    if parts in _BIN_DIRS or parts in {("usr",), ("usr", "local")}:
        return True  # the directories (or merged-/usr links) themselves
    if parts[:-1] in _BIN_DIRS:
        return path.name.startswith("python") or path.name.startswith(".wh.")
    return False


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    stream = tar.extractfile(member)
    if stream is None:
        return
    with stream, target.open("wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)
    target.chmod(member.mode & 0o755 | 0o600)


def _inside(real_root: Path, path: Path) -> bool:
    """Whether ``path``'s real location stays inside ``real_root`` (resolved already)."""
    try:
        path.resolve().relative_to(real_root)
    except ValueError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _empty(directory: Path) -> None:
    if directory.is_dir() and not directory.is_symlink():
        for child in directory.iterdir():
            _remove(child)

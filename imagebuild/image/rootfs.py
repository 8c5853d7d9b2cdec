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
from collections.abc import Callable, Iterator
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
        with blob.open("rb") as head:
            gzipped = head.read(2) == b"\x1f\x8b"
        if gzipped:
            with tarfile.open(fileobj=gzip.open(blob, "rb"), mode="r|") as tar:
                for member in tar:
                    _apply_member(tar, member, tree)
        else:
            with tarfile.open(blob, mode="r:") as tar:
                for member in _maybe_wanted(tar):
                    _apply_member(tar, member, tree)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(f"base layer {blob.name}: cannot unpack ({exc})") from exc


_BLOCK = 512
_DATA_KINDS = frozenset(b"0\x007")
"""Header types whose data follows them (``tarfile``'s regular files)."""
_PLAIN_KINDS = _DATA_KINDS | frozenset(b"123456")
"""Header types a member has alone: no extended header (PAX, GNU long names) before it."""


def _maybe_wanted(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a plain tar opened for random access, less those surely not wanted.

    Walking a slim base's 3,000 headers through ``tarfile`` was a third of an unpack. A
    plain header's name and size are read off its bytes, and a member whose first names
    no library or ``bin`` directory is stepped over; every other member (and every one
    behind an extended header) is ``tarfile``'s to read, checksum included, and then
    ``_apply_member``'s to judge.
    """
    stream = tar.fileobj
    assert stream is not None
    offset = 0
    while True:
        stream.seek(offset)
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK or not header.strip(b"\0"):
            return
        kind = header[156]
        size = _octal(header[124:136]) if kind in _DATA_KINDS else 0
        if kind in _PLAIN_KINDS and size is not None:
            if not _may_be_wanted(_header_name(header, tar)):
                offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
                continue
        stream.seek(offset)
        member = tarfile.TarInfo.fromtarfile(tar)
        yield member
        offset = tar.offset


def _header_name(header: bytes, tar: tarfile.TarFile) -> str:
    """A plain header's path, as ``tarfile`` reads it (the ustar prefix before the name)."""
    name = _field(header[0:100]).decode(tar.encoding or "utf-8", tar.errors)
    prefix = _field(header[345:500]).decode(tar.encoding or "utf-8", tar.errors)
    return f"{prefix}/{name}" if prefix else name


def _field(data: bytes) -> bytes:
    """A header field up to its first NUL."""
    return data.split(b"\0", 1)[0]


def _octal(data: bytes) -> int | None:
    """A size field in octal digits; None for any other encoding (``tarfile`` reads those)."""
    try:
        return int(_field(data).decode("ascii").strip() or "0", 8)
    except ValueError:
        return None


def _may_be_wanted(name: str) -> bool:
    """False only for a path ``_wanted`` refuses for its first names alone."""
    parts = [part for part in name.split("/") if part and part != "."]
    if not parts:
        return True
    if parts[0] in _LIB_DIRS or parts[0] == "bin":
        return True
    if parts[0] != "usr":
        return False
    return len(parts) < 2 or parts[1] in _LIB_DIRS or parts[1] in ("local", "bin")


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

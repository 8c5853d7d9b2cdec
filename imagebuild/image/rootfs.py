"""A base image's filesystem unpacked on the host, so its own interpreter can run here.

Only what its Python needs to start and compile bytecode is unpacked (the compile script
runs without ``site`` and imports built-in modules alone): the files of the library
directories themselves and of their multiarch directory (the dynamic loader, the C
libraries), the standard library's modules a start imports and its ``encodings`` package
(and its top-level directories, empty: ``lib-dynload`` is where Python looks for its
extension modules), and the ``python*`` files of the ``bin`` directories. Layers are applied
in order as an engine would (OCI whiteouts: ``.wh.NAME`` removes a path, ``.wh..wh..opq``
empties a directory), into a directory of the cache named by the base's manifest digest.
Only regular files, directories and links are made; device files and anything whose name or
link would leave the tree are skipped (a base is trusted less than the host). The tree
appears whole or not at all: it is built beside its final name and renamed into place.

A tree can be kept as a tar of its own (``pack_rootfs``) and unpacked from it instead of
from the base's layers (``unpack_rootfs(from_tar=...)``): a CI runner then needs neither
the base's layers nor their inflating before its first pyc. It holds only what the rules
above keep, and is unpacked by GNU tar in a process of its own (``image.untar``), or by
the same rules as a layer where there is no GNU tar.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from isal import igzip

from imagebuild.cache import mark_used
from imagebuild.digest import digest_hex
from imagebuild.errors import ImageError
from imagebuild.image import untar
from imagebuild.image.model import BaseImage
from imagebuild.image.store import LayerFiles

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
TREE_FORMAT = 3
"""What a tree holds (``_wanted``) and how ``pack_rootfs`` lays it out (3: zstd): a kept tree
is named by it, so a rule changed here never takes one kept under another."""
UNPACK_SECONDS = 300
"""How long GNU tar may take to unpack a kept tree before it is given up."""


def unpack_rootfs(
    base: BaseImage,
    store: LayerFiles,
    into: Path,
    *,
    made: Callable[[Path], None] | None = None,
    from_tar: Path | None = None,
) -> Path:
    """The base's filesystem under ``into/<tree_name>``, unpacked once and kept.

    Each use touches the tree's time (what ``cache.forget_idle_trees`` goes by); ``made``
    is called with ``into`` after an unpack. ``from_tar``: the tree as ``pack_rootfs``
    kept it, unpacked instead of the base's layers.
    """
    root = into / tree_name(base)
    if root.is_dir():
        mark_used(root)
        return root
    into.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into))
    aside = staging.with_name(staging.name + "-aside")  # a kept tree's tar, inflated
    try:
        tree = _Tree(staging)
        if from_tar is not None:
            aside.mkdir()
            plain = _inflated(from_tar, aside)
            if untar.gnu_tar() is None:
                _apply(plain, tree)
            elif not untar.extract(plain, staging, seconds=UNPACK_SECONDS):
                raise ImageError(f"kept tree {from_tar.name}: tar could not unpack it")
        else:
            for layer in base.layers:
                _apply(store.path(layer.digest), tree)
        try:
            staging.rename(root)
        except OSError:
            if not root.is_dir():  # another build won the race: theirs is as good
                raise
    finally:
        for left in (staging, aside):
            if left.exists():
                shutil.rmtree(left, ignore_errors=True)
    mark_used(root)
    if made is not None:
        made(into)
    return root


def tree_name(base: BaseImage) -> str:
    """The name of ``base``'s unpacked tree: its manifest digest's hex and ``TREE_FORMAT``.

    A tree unpacked by other rules is then never taken, nor kept for other runners.
    """
    return f"{digest_hex(base.manifest_digest)}-{TREE_FORMAT}"


def _inflated(tar: Path, aside: Path) -> Path:
    """``tar`` as a plain tar: itself, or inflated into the directory ``aside``."""
    try:
        return untar.plain_tar(tar, aside / "tree.tar")
    except (OSError, ValueError) as exc:
        raise ImageError(f"kept tree {tar.name}: cannot inflate ({exc})") from exc


def pack_rootfs(root: Path, out: Path, *, leave: Callable[[Path], bool] | None = None) -> None:
    """The tree at ``root`` (``unpack_rootfs``'s) as a zstd tar at ``out``, names in order.

    Directories, regular files (a second name of one as a hard link) and symbolic links,
    as they are, but for the paths ``leave`` names: ``unpack_rootfs(from_tar=out)`` makes
    the same tree again, without those (``untar.packing``).
    """
    with untar.packing(out) as tar:
        for directory, children, files in os.walk(root):
            children.sort()
            here = Path(directory)
            for name in sorted([*children, *files]):
                path = here / name
                if leave is None or not leave(path):
                    tar.add(path, arcname=str(path.relative_to(root)), recursive=False)


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
            stream = igzip.open(blob, "rb")  # type: ignore[no-untyped-call]
            with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
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
    plain header's name and size are read off its bytes, and a member ``_wanted`` refuses
    is stepped over; every other member (and every one behind an extended header) is
    ``tarfile``'s to read, checksum included, and then ``_apply_member``'s to judge.
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
            if not _wanted(_parts(_header_name(header, tar))):
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


def _parts(name: str) -> tuple[str, ...]:
    """A member's path as its names, without empty ones, ``.`` or a leading ``/``."""
    return tuple(part for part in name.split("/") if part and part != ".")


def _apply_member(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: _Tree) -> None:
    path = PurePosixPath(member.name.lstrip("/"))
    if not path.parts or ".." in path.parts or path.is_absolute() or not _wanted(path.parts):
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


_STARTUP_MODULES = frozenset(
    {
        "os.py", "stat.py", "posixpath.py", "genericpath.py", "_collections_abc.py", "io.py",
        "abc.py", "codecs.py", "linecache.py",
    }
)  # fmt: skip
"""The standard library's top-level modules an interpreter reads to start without ``site``
(3.8-3.10 read these; 3.11 and 3.12 have them frozen; 3.13 reads ``linecache``): the others
were half of a tree's files, for a compile that imports built-in modules alone."""
_LIB_DIRS = frozenset({"lib", "lib32", "lib64", "libx32"})
_BIN_DIRS = frozenset({("bin",), ("usr", "bin"), ("usr", "local", "bin")})
_STDLIB = re.compile(r"python\d+\.\d+")


def _wanted(parts: tuple[str, ...]) -> bool:
    """Whether the path named by ``parts`` is part of what the base's Python needs here.

    Writing files is most of an unpack's time, and the rest of a slim base's library trees
    (the standard library's packages, site-packages, perl, gconv, locale data) is most of
    its files: the full trees took a FastAPI CI run 0.27 s, beside the registry cache's work.
    """
    if not parts:
        return False
    rest = _below_lib_dir(parts)
    if rest is not None:
        if len(rest) <= 1:
            return True  # the directory itself, a link to it, or a file right in it
        if _STDLIB.fullmatch(rest[0]):
            # Its top-level directories (``lib-dynload``, where Python looks for its extension
            # modules, is one), the modules a start imports (``os.py`` is also how Python
            # finds its prefix), and the encodings package every start imports.
            if len(rest) == 2:
                name = rest[1].removeprefix(_WHITEOUT)
                return not name.endswith(".py") or name in _STARTUP_MODULES
            return rest[1] == "encodings"
        return "-linux-" in rest[0] and len(rest) == 2  # the multiarch directory's files
    if parts in _BIN_DIRS or parts in {("usr",), ("usr", "local")}:
        return True  # the directories (or merged-/usr links) themselves
    if parts[:-1] in _BIN_DIRS:
        return parts[-1].startswith("python") or parts[-1].startswith(_WHITEOUT)
    return False


def _below_lib_dir(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """The names below a library directory (``lib*``, ``usr/lib*``, ``usr/local/lib*``).

    None for a path that is not in one.
    """
    if parts[0] in _LIB_DIRS:
        return parts[1:]
    if parts[0] == "usr" and len(parts) > 1:
        rest = parts[2:] if parts[1] == "local" else parts[1:]
        if rest and rest[0] in _LIB_DIRS:
            return rest[1:]
    return None


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    with target.open("wb") as out:
        if not _copied_by_kernel(tar, member, out):
            stream = tar.extractfile(member)
            if stream is not None:
                with stream:
                    shutil.copyfileobj(stream, out, 1 << 20)
    target.chmod(member.mode & 0o755 | 0o600)


_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def _copied_by_kernel(tar: tarfile.TarFile, member: tarfile.TarInfo, out: BinaryIO) -> bool:
    """Copy a plain tar's member to ``out`` with ``copy_file_range``, if the kernel can.

    A plain tar's member is one run of its bytes: copied by the kernel, its bytes never
    pass through Python (nor wait for the GIL). False, with ``out`` left empty, where that
    does not apply (a stream, a sparse member) or the kernel declines (another filesystem
    on some kernels, an old kernel): the caller copies it then.
    """
    source = tar.fileobj
    if member.issparse() or not isinstance(source, io.BufferedReader):
        return False
    offset, size = member.offset_data, member.size
    try:
        while size > 0:
            done = os.copy_file_range(source.fileno(), out.fileno(), size, offset)
            if done == 0:
                raise EOFError("the layer ends inside a member")
            offset, size = offset + done, size - done
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            raise
        out.seek(0)
        out.truncate()
        return False
    return True


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

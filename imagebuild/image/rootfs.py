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
from pathlib import Path, PurePosixPath

from imagebuild.digest import digest_hex
from imagebuild.errors import ImageError
from imagebuild.image.model import BaseImage
from imagebuild.image.store import LayerFiles

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"


def unpack_rootfs(base: BaseImage, store: LayerFiles, into: Path) -> Path:
    """The base's filesystem under ``into/<manifest hex>``, unpacked once and kept."""
    root = into / digest_hex(base.manifest_digest)
    if root.is_dir():
        return root
    into.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into))
    try:
        for layer in base.layers:
            _apply(store.path(layer.digest), staging)
        try:
            staging.rename(root)
        except OSError:
            if not root.is_dir():  # another build won the race: theirs is as good
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _apply(blob: Path, root: Path) -> None:
    """Apply one layer tar (gzip or plain) over ``root``."""
    try:
        with _open(blob) as tar:
            for member in tar:
                _apply_member(tar, member, root)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(f"base layer {blob.name}: cannot unpack ({exc})") from exc


def _open(blob: Path) -> tarfile.TarFile:
    with blob.open("rb") as head:
        gzipped = head.read(2) == b"\x1f\x8b"
    if gzipped:
        return tarfile.open(fileobj=gzip.open(blob, "rb"), mode="r|")
    return tarfile.open(blob, mode="r|")


def _apply_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path) -> None:
    path = PurePosixPath(member.name.lstrip("/"))
    if not path.parts or ".." in path.parts or path.is_absolute() or not _wanted(path):
        return
    parent, name = root.joinpath(*path.parts[:-1]), path.name
    if not _inside(root, parent):
        return
    if name == _OPAQUE:
        _empty(parent)
        return
    if name.startswith(_WHITEOUT):
        _remove(parent / name[len(_WHITEOUT) :])
        return
    target = parent / name
    if member.isdir():
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            _remove(target)
        target.mkdir(parents=True, exist_ok=True)
        return
    parent.mkdir(parents=True, exist_ok=True)
    _remove(target)
    if member.issym():
        target.symlink_to(member.linkname)
    elif member.islnk():
        source = root / member.linkname.lstrip("/")
        if _inside(root, source) and source.is_file():
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


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path``'s real location stays inside ``root`` (no link leads out)."""
    try:
        path.resolve().relative_to(root.resolve())
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

"""Tars imgbuild kept itself: zstd-compressed, unpacked by GNU tar in a process of its own.

What a CI runner takes from a registry cache before its first build step (a build
environment, a base's Python tree: hundreds of files) is unpacked while other threads of
imgbuild run Python. Unpacked in a thread, each file's system calls waited for the
interpreter's lock; in a Python process of its own, the start and ``tarfile``'s work cost
0.07 s of CPU for a 350-file environment that GNU tar unpacks in 0.02 s.

GNU tar refuses names with ``..``, strips a leading ``/``, and makes a link only once the
rest is unpacked, so nothing is written through a link the tar itself brings. It does not
refuse every link leading out or device files as ``tarfile``'s ``data`` filter does: these
tars come from the registry cache the user named, whose programs a build then runs, so
that filter bought no safety against it. Where GNU tar is not found (``gnu_tar``), callers
unpack through ``tarfile`` as before.

They are kept zstd-compressed (``compress``), the plain tar's size in the frame, so that
``plain_tar`` decompresses one in a single call: a base's Python tree (12 MB) took 16 ms
so, where inflating its gzip took 30 ms (and twice that beside a busy thread), and it is a
tenth smaller. Tars kept gzipped before are read as well.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import zstandard
from isal import isal_zlib

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_HEADER = 14
"""The longest zstd frame header, past its magic number."""
_WHOLE = 64 << 20
"""The most gzip or zstd decompressed in one call (a base's Python tree is a tenth of it)."""
_PIECE = 4 << 20
"""How much gzip is read, and at most how much is inflated, at a time."""
_HINT_RATIO = 16
_LEVEL = 3
"""zstd's level for a kept tar: 4.4 MB for a 12 MB tree (level 1: 4.9 MB), 0.08 s to make."""


@functools.cache
def gnu_tar() -> str | None:
    """The path of GNU tar on this host, or None (none, or another tar)."""
    found = shutil.which("tar")
    if found is None:
        return None
    try:
        done = subprocess.run(
            [found, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = done.stdout.partition("\n")[0]
    return found if done.returncode == 0 and "GNU tar" in first else None


def plain_tar(blob: Path, out: Path) -> Path:
    """``blob`` itself when it is a plain tar; else decompressed from zstd or gzip into ``out``.

    Up to ``_WHOLE`` is decompressed in one call, sized by the zstd frame or the gzip
    trailer: read in pieces, the decompressing thread took the interpreter's lock back for
    each and waited for it while other threads ran (a 6.5 MB tree took 0.33 s so beside a
    busy thread; in one call, 0.09 s; 0.04 s alone). A larger one, or one whose size is not
    told, is decompressed in pieces. Raises ``OSError`` or ``ValueError`` (damaged) when it
    does not decompress whole.
    """
    with blob.open("rb") as source:
        head = source.read(len(_ZSTD_MAGIC))
        zstd = head == _ZSTD_MAGIC
        if not zstd and head[: len(_GZIP_MAGIC)] != _GZIP_MAGIC:
            return blob
        length = os.fstat(source.fileno()).st_size
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if zstd:
                _unzstd(head, source, fd, length=length)
            elif length <= _WHOLE:
                _inflate_whole(head + source.read(), fd)
            else:
                _inflate_in_pieces(head, source, fd)
        except (isal_zlib.error, zstandard.ZstdError) as exc:  # type: ignore[misc]
            raise ValueError(str(exc)) from exc
        finally:
            os.close(fd)
    return out


@contextmanager
def packing(out: Path) -> Iterator[tarfile.TarFile]:
    """A pax tar to fill, kept at ``out`` zstd-compressed once filled (``compress``).

    It is written plain beside ``out`` first, so that the frame can tell its size.
    """
    plain = out.with_name(out.name + ".tar")
    try:
        with tarfile.open(plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
            yield tar
        compress(plain, out)
    finally:
        plain.unlink(missing_ok=True)


def compress(plain: Path, out: Path) -> None:
    """The plain tar ``plain`` zstd-compressed into ``out``, its size told in the frame."""
    size = plain.stat().st_size
    with plain.open("rb") as source, out.open("wb") as sink:
        zstandard.ZstdCompressor(level=_LEVEL).copy_stream(source, sink, size=size)


def _unzstd(head: bytes, source: BinaryIO, fd: int, *, length: int) -> None:
    size = zstandard.get_frame_parameters(head + source.read(_ZSTD_HEADER)).content_size
    source.seek(0)
    # (the frame's size is only a hint: bounded, it cannot make a huge buffer; unknown, it
    # reads as the largest number)
    if length <= _WHOLE and size <= _HINT_RATIO * length:
        _write_all(fd, zstandard.ZstdDecompressor().decompress(source.read()))
        return
    unzstd = zstandard.ZstdDecompressor().decompressobj()
    while chunk := source.read(_PIECE):
        _write_all(fd, unzstd.decompress(chunk))
    if not unzstd.eof:
        raise ValueError("the zstd stream ends early")


def _inflate_whole(data: bytes, fd: int) -> None:
    # (the trailer's size is only a hint: bounded, it cannot make a huge buffer)
    size = int.from_bytes(data[-4:], "little") if len(data) >= 4 else 0
    hint = max(min(size, _HINT_RATIO * len(data)), 1)
    _write_all(fd, isal_zlib.decompress(data, wbits=31, bufsize=hint))


def _inflate_in_pieces(head: bytes, source: BinaryIO, fd: int) -> None:
    inflater = isal_zlib.decompressobj(wbits=31)
    chunk = head
    while chunk:
        while chunk:
            _write_all(fd, inflater.decompress(chunk, _PIECE))
            chunk = inflater.unconsumed_tail
        chunk = source.read(_PIECE)
    _write_all(fd, inflater.flush())
    if not inflater.eof:
        raise ValueError("the gzip stream ends early")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def extract(tar: Path, into: Path, *, seconds: float) -> bool:
    """Unpack the plain tar ``tar`` into the directory ``into`` with GNU tar.

    False when GNU tar is not here, refuses a member, fails or takes over ``seconds``
    (``into`` then holds part of it: the caller clears it).
    """
    program = gnu_tar()
    if program is None:
        return False
    command = [program, "-x", "-f", str(tar), "-C", str(into), "--no-same-owner"]
    try:
        done = subprocess.run(command, capture_output=True, timeout=seconds, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0

"""Hostile wheels: member names and kinds checked before a wheel is spread, RECORD while it is.

A wheel comes from a stranger. Before anything of it is written, every member must have a
plain relative name (no control characters, no ``..``, not absolute, no backslash), be a
regular file or a directory (no links, no devices), appear once, and the whole must unpack
to less than ``MAX_UNPACKED`` bytes. While it is spread, each file's bytes are hashed and
compared with its RECORD line at the end of the file, as the wheel spec asks installers to
(a file RECORD does not list, or lists without a hash, is refused too).
"""

from __future__ import annotations

import base64
import hashlib
import io
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

from installer.sources import WheelContentElement, WheelFile

from imagebuild.errors import LayerError

MAX_UNPACKED = 4 << 30
"""Bytes a wheel may unpack to (the largest wheels on PyPI are well under 1 GiB)."""
_HINT = "the wheel is damaged or hostile; do not install it (report it to its index)"
_UNHASHED = ("RECORD", "RECORD.jws", "RECORD.p7s")


def check_members(
    wheel: Path, archive: zipfile.ZipFile, *, max_unpacked: int = MAX_UNPACKED
) -> None:
    """Refuse unsafe names, kinds, duplicates and sizes, before anything is written."""
    seen: set[str] = set()
    total = 0
    for info in archive.infolist():
        name = info.filename
        problem = _name_problem(name) or _kind_problem(info)
        if problem is None and name in seen:
            problem = "appears twice"
        if problem is not None:
            raise LayerError(f"wheel {wheel.name}: member {name!r} {problem}", hint=_HINT)
        seen.add(name)
        total += info.file_size
    if total > max_unpacked:
        raise LayerError(
            f"wheel {wheel.name}: unpacks to {total} bytes, more than the {max_unpacked} "
            "imgbuild allows",
            hint=_HINT,
        )


def _name_problem(name: str) -> str | None:
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "has a control character in its name"
    if "\\" in name:
        return "has a backslash in its name"
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in path.parts:
        return "climbs out of the wheel with '..'"
    return None


def _kind_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    # Many wheel writers record permission bits only (no file type): a regular file.
    if stat.S_IFMT(mode) in (0, stat.S_IFREG, stat.S_IFDIR):
        return None
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    return "is not a regular file (a device, pipe or socket)"


class CheckedWheel(WheelFile):
    """installer's wheel source, checked: members before, each file's RECORD hash as read."""

    @classmethod
    def open_checked(cls, path: Path) -> CheckedWheel:
        """Open ``path`` and check its members (``LayerError`` naming the first bad one)."""
        archive = zipfile.ZipFile(path)
        try:
            check_members(path, archive)
            return cls(archive)
        except BaseException:
            archive.close()
            raise

    def close(self) -> None:
        """Close the underlying archive."""
        self._zipfile.close()

    def get_contents(self) -> Iterator[WheelContentElement]:
        """Each file with a stream that checks its bytes against RECORD at the end."""
        wheel = Path(str(self._zipfile.filename)).name
        for record, stream, executable in super().get_contents():
            name, hash_text, size = record
            if not hash_text and not _unhashed(name, self.dist_info_dir):
                raise LayerError(
                    f"wheel {wheel}: member {name!r} has no hash in RECORD", hint=_HINT
                )
            checked = (
                cast(
                    BinaryIO,
                    _Verified(stream, wheel=wheel, name=name, expected=hash_text, size=size),
                )
                if hash_text
                else stream
            )
            yield record, checked, executable


def _unhashed(name: str, dist_info: str) -> bool:
    parent, _, leaf = name.rpartition("/")
    return parent == dist_info and leaf in _UNHASHED


class _Verified(io.RawIOBase):
    """A read-only stream that raises at its end if the bytes do not match RECORD."""

    def __init__(self, inner: BinaryIO, *, wheel: str, name: str, expected: str, size: str) -> None:
        super().__init__()
        algorithm, _, _ = expected.partition("=")
        if algorithm not in ("sha256", "sha384", "sha512"):
            raise LayerError(
                f"wheel {wheel}: RECORD gives {name!r} a {algorithm or 'missing'} hash, not "
                "sha256 or stronger",
                hint=_HINT,
            )
        self._inner = inner
        self._hash = hashlib.new(algorithm)
        self._algorithm = algorithm
        self._wheel, self._name, self._expected, self._size = wheel, name, expected, size
        self._read = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """The next bytes, hashed on the way (no copy: installer reads in big blocks)."""
        data = self._inner.read(-1 if size is None else size)
        if not data:
            self._check()
            return b""
        self._hash.update(data)
        self._read += len(data)
        return data

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._read

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Go back (installer rereads a script's first line): hash again from the start."""
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("seek from the end")
        target = offset if whence == io.SEEK_SET else self._read + offset
        if target < 0:
            raise ValueError(f"negative position {target}")
        self._inner.seek(0)
        self._hash = hashlib.new(self._algorithm)
        self._read, self._checked = 0, False
        while self._read < target:
            if not self.read(min(target - self._read, 1 << 20)):
                break
        return self._read

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        digest = base64.urlsafe_b64encode(self._hash.digest()).rstrip(b"=").decode("ascii")
        actual = f"{self._algorithm}={digest}"
        if actual != self._expected or (self._size and int(self._size) != self._read):
            raise LayerError(
                f"wheel {self._wheel}: {self._name!r} does not match its RECORD line "
                f"({self._expected}, {self._size or '?'} bytes; read {actual}, {self._read} "
                "bytes)",
                hint=_HINT,
            )

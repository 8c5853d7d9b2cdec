"""Reading a .deb without dpkg: its ar container, the control part and the data members.

A .deb is an ``ar`` archive of three members in this order: ``debian-binary`` (``2.0``),
``control.tar[.gz|.xz|.zst]`` and ``data.tar[.gz|.xz|.zst|.bz2]``. The data members stream
straight out of the compressed tar, one at a time, so nothing is extracted to disk first.

python-debian's ``debian.debfile`` is not used: it decompresses ``.zst`` parts by running
``unzstd`` in a subprocess into memory, and its ``arfile`` member objects read the rest of
the archive on ``read(0)`` and past the member's end on ``readline``. The ar format is a
60-byte header per member, so ``DebFile`` indexes it itself and reads each part through a
bounded window (``os.pread``) that any decompressor can stream from.

Members are checked as they stream: a name that is absolute or climbs out of the tree with
``..``, a hard link to such a name or to a member not seen before it, and device files or
FIFOs (Debian Policy forbids them in packages) are refused with a ``DebianError`` naming the
.deb and the member. A refused .deb is refused whole, the same way every time.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, TYPE_CHECKING, BinaryIO, Literal

import zstandard
from debian.debian_support import Version

from imagebuild.errors import DebianError

if TYPE_CHECKING:
    from debian.deb822 import Deb822

# python-debian's deb822 is imported where a paragraph is parsed: only a base being built
# reads .deb control data, and importing it costs every build about 20 ms.

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
_READ_BUFFER = 1 << 20
_TAR_BUFFER = 1 << 16
# Compressions a .deb part may use, by the suffix of its name, and the tarfile stream mode
# reading each (xz mode also reads the legacy .lzma format). zstd goes through zstandard.
_TAR_MODES: dict[str, Literal["r|", "r|gz", "r|xz", "r|bz2"]] = {
    "": "r|",
    ".gz": "r|gz",
    ".xz": "r|xz",
    ".lzma": "r|xz",
    ".bz2": "r|bz2",
}
_ZSTD = ".zst"
# What reading a damaged part raises: tarfile turns gz, xz and bz2 failures into ReadError.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zstandard.ZstdError)
_HINT = "the .deb is damaged or not what the lock names; fetch it again and check its sha256"


@dataclass(frozen=True, kw_only=True, slots=True)
class DebControl:
    """The metadata part of a .deb (its ``control.tar``)."""

    control: str
    """The control paragraph (``Package: ...``), ending in exactly one newline."""
    md5sums: str | None
    """The ``md5sums`` file (``<md5>  <path>`` lines), or None when the .deb has none."""
    conffiles: tuple[str, ...]
    """Absolute paths of the package's configuration files, in the file's order."""

    @property
    def fields(self) -> Deb822:
        """The control paragraph parsed (``fields["Package"]``, ``fields.get("Replaces")``)."""
        from debian.deb822 import Deb822

        return Deb822(self.control)

    def status_paragraph(self) -> str:
        """The paragraph as dpkg's status database holds it: ``Status`` after ``Package``."""
        from debian.deb822 import Deb822

        fields = self.fields
        status = Deb822()
        status["Package"] = fields["Package"]
        status["Status"] = "install ok installed"
        for key, value in fields.items():
            if key not in ("Package", "Status"):
                status[key] = value
        return str(status.dump())

    def replaces(self, name: str, version: str) -> bool:
        """Whether the package's ``Replaces`` covers package ``name`` at ``version``."""
        from debian.deb822 import PkgRelation

        raw = self.fields.get("Replaces", "").strip()
        for alternatives in PkgRelation.parse_relations(raw) if raw else []:
            for relation in alternatives:
                if relation["name"] != name:
                    continue
                if relation["version"] is None:
                    return True
                op, bound = relation["version"]
                ours, theirs = Version(version), Version(bound)
                holds = {
                    "<<": ours < theirs,
                    "<=": ours <= theirs,
                    "=": ours == theirs,
                    ">=": ours >= theirs,
                    ">>": ours > theirs,
                }
                if holds.get(op, False):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class DataMember:
    """One member of a .deb's data part, checked and with its name normalised.

    ``info.name`` has no leading ``./`` or ``/`` and no trailing ``/`` (the root entry ``./``
    is not yielded); for a hard link ``info.linkname`` is normalised the same way. A symlink's
    target is left as the package wrote it. ``stream`` reads a regular file's bytes and is
    None for other members; it is only readable until the iteration moves on.
    """

    info: tarfile.TarInfo
    """The member's header: type, mode (setuid/sticky bits included), uid/gid, size, link."""
    stream: io.RawIOBase | None
    """The file's content (regular files only), valid until the next member is read."""


@dataclass(frozen=True, slots=True)
class _Part:
    name: str
    offset: int
    size: int


class FileWindow(io.RawIOBase):
    """``size`` bytes of an open file from ``offset``, read with ``os.pread``.

    Reads never move the file's position, so several windows on one file can be read
    in turn (the parts of a .deb; the files a layer spools).
    """

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd, self._pos, self._end = fd, offset, offset + size

    def readable(self) -> bool:
        """True: a window is read-only."""
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the window; 0 at its end."""
        count = min(len(buffer), self._end - self._pos)
        if count <= 0:
            return 0
        data = os.pread(self._fd, count, self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _MemberStream(io.RawIOBase):
    """A data member's bytes; a failure to decompress them is the .deb's ``DebianError``."""

    def __init__(self, inner: IO[bytes], fail: Callable[[BaseException], DebianError]) -> None:
        super().__init__()
        self._inner, self._fail = inner, fail

    def readable(self) -> bool:
        """True."""
        return True

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all that is left for -1)."""
        try:
            return self._inner.read(size)
        except _READ_ERRORS as exc:
            raise self._fail(exc) from exc

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer``; 0 at the member's end."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class DebFile:
    """An open .deb: ``control()`` reads its metadata, ``members()`` streams its data part.

    Use it as a context manager (``with DebFile(path) as deb: ...``); opening indexes the ar
    container and checks ``debian-binary``, so a file that is not a .deb fails here.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file: BinaryIO = path.open("rb")
        except OSError as exc:
            raise DebianError(f"{path}: cannot open the .deb ({exc.strerror or exc})") from exc
        try:
            self._control, self._data = self._index()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> DebFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (streams from ``members()`` stop working)."""
        self._file.close()

    def _fail(self, what: str) -> DebianError:
        return DebianError(f"{self.path.name}: {what}", hint=_HINT)

    def _index(self) -> tuple[_Part, _Part]:
        parts = list(self._ar_members())
        if not parts or parts[0].name != "debian-binary":
            raise self._fail("not a .deb (its first ar member is not debian-binary)")
        version = os.pread(self._file.fileno(), min(parts[0].size, 16), parts[0].offset)
        if not version.startswith(b"2."):
            raise self._fail(f"unsupported .deb format {version.strip()!r} (expected 2.x)")
        control = [p for p in parts if p.name.startswith("control.tar")]
        data = [p for p in parts if p.name.startswith("data.tar")]
        if len(control) != 1 or len(data) != 1:
            names = ", ".join(p.name for p in parts)
            raise self._fail(f"expected one control.tar and one data.tar member, found {names}")
        for part in (control[0], data[0]):
            if _suffix(part) not in _TAR_MODES and _suffix(part) != _ZSTD:
                raise self._fail(f"member {part.name} has an unknown compression")
        return control[0], data[0]

    def _ar_members(self) -> Iterator[_Part]:
        fd = self._file.fileno()
        if os.pread(fd, len(_AR_MAGIC), 0) != _AR_MAGIC:
            raise self._fail("not a .deb (no ar archive header)")
        total = os.fstat(fd).st_size
        offset = len(_AR_MAGIC)
        while offset < total:
            header = os.pread(fd, _AR_HEADER, offset)
            if len(header) != _AR_HEADER or header[58:60] != b"`\n":
                raise self._fail(f"truncated or corrupt ar header at byte {offset}")
            name = header[:16].decode("ascii", "replace").rstrip(" ").rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise self._fail(f"ar member {name!r} has no valid size") from None
            start = offset + _AR_HEADER
            if start + size > total:
                raise self._fail(f"ar member {name} is truncated ({size} bytes announced)")
            yield _Part(name, start, size)
            offset = start + size + (size & 1)  # members are padded to an even offset

    def _open_tar(self, part: _Part) -> tarfile.TarFile:
        raw = io.BufferedReader(
            FileWindow(self._file.fileno(), part.offset, part.size), _READ_BUFFER
        )
        suffix = _suffix(part)
        if suffix == _ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            return tarfile.open(fileobj=reader, mode="r|", bufsize=_TAR_BUFFER)
        return tarfile.open(fileobj=raw, mode=_TAR_MODES[suffix], bufsize=_TAR_BUFFER)

    def control(self) -> DebControl:
        """The control paragraph, md5sums and conffiles from ``control.tar``."""
        wanted = {"control", "md5sums", "conffiles"}
        found: dict[str, str] = {}
        try:
            with self._open_tar(self._control) as tar:
                for info in tar:
                    name = info.name.removeprefix("./")
                    if name in wanted and info.isfile():
                        stream = tar.extractfile(info)
                        assert stream is not None  # a regular file always has a stream
                        found[name] = stream.read().decode("utf-8")
        except _READ_ERRORS as exc:
            raise self._fail(f"cannot read {self._control.name} ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise self._fail(f"{self._control.name} holds a file that is not UTF-8") from exc
        if "control" not in found:
            raise self._fail(f"{self._control.name} has no control file")
        conffiles = tuple(line.strip() for line in found.get("conffiles", "").splitlines())
        return DebControl(
            control=found["control"].rstrip("\n") + "\n",
            md5sums=found.get("md5sums"),
            conffiles=tuple(c for c in conffiles if c),
        )

    def members(self) -> Iterator[DataMember]:
        """The data members in archive order, each checked (see the module docstring)."""
        files: set[str] = set()  # regular files so far: what a hard link may name
        last = "its start"
        try:
            with self._open_tar(self._data) as tar:
                for info in tar:
                    if not self._checked(info, files):
                        continue
                    if info.isreg() or info.islnk():
                        files.add(info.name)
                    inner = tar.extractfile(info) if info.isreg() else None
                    stream = None if inner is None else _MemberStream(inner, self._unreadable)
                    yield DataMember(info, stream)
                    last = repr(info.name)
                self._check_end(tar, last)
        except _READ_ERRORS as exc:
            raise self._unreadable(exc) from exc

    def _unreadable(self, exc: BaseException) -> DebianError:
        return self._fail(f"cannot read {self._data.name} ({exc})")

    def _check_end(self, tar: tarfile.TarFile, last: str) -> None:
        """Refuse data after the tar's end: tarfile stops quietly at a corrupt header.

        Reading to the end also makes xz and zstd check their frames' integrity.
        """
        assert tar.fileobj is not None  # an open stream-mode archive has its stream
        while chunk := tar.fileobj.read(_TAR_BUFFER):
            if chunk.count(0) != len(chunk):
                raise self._fail(f"{self._data.name} has a corrupt tar header after {last}")

    def _checked(self, info: tarfile.TarInfo, files: set[str]) -> bool:
        """Normalise ``info``'s names in place; False for the root entry; refuse the hostile."""
        raw = info.name
        name = self._normalised(raw, f"member {raw!r}")
        if name is None:
            return False
        if info.ischr() or info.isblk() or info.isfifo():
            raise self._fail(f"member {raw!r} is a device file or FIFO; refused")
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            raise self._fail(f"member {raw!r} has an unsupported type {info.type!r}")
        if info.islnk():
            target = self._normalised(
                info.linkname, f"member {raw!r} (a hard link to {info.linkname!r})"
            )
            if target is None or target not in files:
                raise self._fail(
                    f"member {raw!r} is a hard link to {info.linkname!r}, "
                    f"which is not an earlier file of the package; refused"
                )
            info.linkname = target
        info.name = name
        return True

    def _normalised(self, raw: str, what: str) -> str | None:
        """``raw`` without ``./`` or a trailing ``/``; None for the root; refused if hostile."""
        if raw.startswith("/"):
            raise self._fail(f"{what} names an absolute path; refused")
        parts = [p for p in PurePosixPath(raw).parts if p != "."]
        if ".." in parts:
            raise self._fail(f"{what} climbs out of the tree with '..'; refused")
        return "/".join(parts) or None


def _suffix(part: _Part) -> str:
    """What follows ``.tar`` in a part's name: its compression (``""``, ``.xz``, ...)."""
    return part.name[part.name.index(".tar") + 4 :]


def read_control(path: Path) -> DebControl:
    """The control part of the .deb at ``path`` (without reading its data)."""
    with DebFile(path) as deb:
        return deb.control()

"""Assembling .debs into one deterministic layer: merged /usr, no maintainer scripts, dpkg's view.

``assemble_layer`` turns the .debs of one layer into a gzip layer in the blob store. Nothing
of a package runs: its data members are all there is, so what maintainer scripts would make
is made here (for the bottom layer: accounts, homes, ``/tmp``, the CA bundle, the local time;
for every layer: the dpkg status scanners read), replacing what a package ships there.

Decisions, and why:

- Merged /usr, as Debian 12 and 13 install it: the base layer holds the symlinks ``bin``,
  ``sbin``, ``lib`` (and ``lib64`` on amd64) into ``usr/``, and a member under one of them is
  written under ``usr/`` instead, in every layer, so no layer has a real directory where a
  lower one has a symlink. This is what dpkg does on a merged system (it writes through the
  symlink); symlink targets are kept as the package wrote them, as dpkg keeps them.
- Entries are sorted bytewise by path (a directory sorts before its children), so every
  entry must be known before the first is written. File contents are appended to a spool
  file per .deb beside the blob store as they stream out, and read back by offset in
  sorted order: one sequential write and no inode per file, and, unlike a staging directory,
  nothing of a member's mode or owner (setuid bits, uids other than ours) has to survive
  the host's filesystem. Nothing is extracted and re-scanned.
- Metadata is the package's: mode with setuid/setgid/sticky bits, numeric uid/gid, symlink
  targets. mtime is the caller's, user and group names are empty. Hard links become regular
  files (copies), as ``image.tarball.build_layer`` writes them, so any reader of a layer
  sees plain files.
- A path two packages ship: the same content and metadata gives one entry; otherwise the
  package whose ``Replaces`` names the other (at its version) wins, as dpkg decides; neither
  is refused in one line. A directory several packages ship takes the metadata of the first
  package by name. Members of one package override earlier members of the same package.
- ``drop`` globs leave out docs, man pages, info and lintian files, but keep each package's
  ``usr/share/doc/<package>`` entry and its ``copyright`` (licences travel with the image).
- Homes are made 0700 and owned by their account (Debian's adduser default since 12);
  ``/nonexistent`` and ``/`` are not made.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imagebuild.debian.deb import DebControl, DebFile, FileWindow, read_control
from imagebuild.debian.model import LockedDeb
from imagebuild.errors import DebianError
from imagebuild.image.model import Layer
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import tar_info, write_layer
from imagebuild.target.recipe import Account, Group

MERGED_USR = ("bin", "sbin", "lib", "lib64")
"""Top-level directories that are symlinks into ``usr/`` on a merged-/usr system."""

DEFAULT_DROP = (
    "usr/share/doc/**",
    "!usr/share/doc/*",
    "!usr/share/doc/*/copyright",
    "usr/share/man/**",
    "usr/share/info/**",
    "usr/share/lintian/**",
)
"""Paths left out of a layer: globs (``*`` within a name, ``**`` across names); a pattern
starting with ``!`` keeps what it matches; the last pattern that matches a path decides."""

_STATUS_DIR = "var/lib/dpkg/status.d"
_STATUS = "var/lib/dpkg/status"
_CERTS = "usr/share/ca-certificates/"
_CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
_NO_HOME = frozenset({"/", "/nonexistent"})
_CHUNK = 1 << 20
_READERS = 2  # .debs read at once: most of reading one is decompression, outside the GIL


@dataclass(frozen=True, kw_only=True, slots=True)
class RootfsSpec:
    """What the bottom layer of a base holds besides its packages' files."""

    arch: str
    """``amd64`` or ``arm64``: whether the ``lib64`` symlink is made."""
    accounts: tuple[Account, ...]
    """``/etc/passwd``, in this order (root 0 and nonroot 65532 in our definitions)."""
    groups: tuple[Group, ...]
    """``/etc/group``, in this order."""
    symlinks: tuple[tuple[str, str], ...] = ()
    """``(path, target)`` pairs, e.g. ``("usr/bin/python3", "python3.11")``; they replace
    what a package ships at ``path``."""
    localtime: str | None = "Etc/UTC"
    """The zone ``/etc/localtime`` points to when tzdata is installed (None: no link)."""
    drop: tuple[str, ...] = DEFAULT_DROP
    """Globs of package paths left out (see ``DEFAULT_DROP``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AssembledLayer:
    """A layer made of .debs, and which package each of its files came from."""

    layer: Layer
    """The gzip layer, its blob in the store."""
    files: Mapping[str, str]
    """Container path (``/usr/lib/x86_64-linux-gnu/libc.so.6``) -> the package that ships
    it, for every regular file and symlink of a package (under its merged-/usr path)."""
    packages: tuple[str, ...]
    """The packages of this layer, by name."""


@dataclass(slots=True)
class _Item:
    kind: str  # "dir", "file" or "symlink"
    mode: int
    package: str = ""  # "" for what assembly makes itself
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    data: bytes | None = None  # the content of a file assembly makes
    spool: _Spool | None = None  # where a package file's content is
    blob: int = -1  # which of the spool's files

    def read(self) -> bytes:
        if self.spool is None:
            return self.data or b""
        return self.spool.read(self.blob)


@dataclass(slots=True)
class _Package:
    name: str
    version: str
    control: DebControl


class _Spool:
    """One .deb's file contents, appended to a file as they stream and read back by offset."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._regions: list[tuple[int, int]] = []

    def add(self, stream: io.RawIOBase) -> int:
        start = self._file.tell()
        shutil.copyfileobj(stream, self._file, _CHUNK)
        self._regions.append((start, self._file.tell() - start))
        return len(self._regions) - 1

    def size(self, blob: int) -> int:
        return self._regions[blob][1]

    def read(self, blob: int) -> bytes:
        self._file.flush()
        offset, size = self._regions[blob]
        return os.pread(self._file.fileno(), size, offset)

    def open(self, blob: int) -> io.BufferedReader:
        self._file.flush()
        offset, size = self._regions[blob]
        return io.BufferedReader(FileWindow(self._file.fileno(), offset, size), _CHUNK)


def assemble_layer(
    debs: Sequence[tuple[LockedDeb, Path]],
    *,
    spec: RootfsSpec | None,
    below: Sequence[Path] = (),
    store: BlobStore,
    mtime: int,
    created_by: str,
    status_file: bool = True,
) -> AssembledLayer:
    """One deterministic gzip layer from ``debs`` (each a locked package and its .deb file).

    ``spec`` is given for a base's bottom layer (accounts, ``/tmp``, CA bundle, local time,
    merged-/usr symlinks, extra symlinks) and None for a layer of system packages on top of
    it. ``below`` are the .debs of the layers underneath: ``/var/lib/dpkg/status`` lists
    their packages with this layer's (without ``status_file`` only ``status.d`` is written:
    a pulled base keeps its own status file). The same .debs, spec and ``mtime`` give the
    same digest. Raises ``DebianError`` naming the .deb, member or path that cannot be assembled.
    """
    if isinstance(mtime, bool) or not isinstance(mtime, int) or mtime < 0:
        raise DebianError(f"layer mtime must be a non-negative integer epoch, got {mtime!r}")
    spool_dir = store.root / "tmp"
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:

            def spool() -> _Spool:
                return _Spool(stack.enter_context(tempfile.TemporaryFile(dir=spool_dir)))

            items, packages = _collect(debs, spool)
            items = _without_dropped(items, spec.drop if spec else DEFAULT_DROP)
            if spec is not None:
                items.update(_rootfs(spec, items, packages))
            items.update(_dpkg_view(packages, below if status_file else None))
            files = {"/" + n: i.package for n, i in items.items() if i.package and i.kind != "dir"}
            entries = sorted(_with_parents(items).items(), key=lambda kv: os.fsencode(kv[0]))
            layer = write_layer(
                store, lambda tar: _write(tar, entries, mtime), created_by=created_by
            )
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise DebianError(f"assembling {created_by}: {exc.strerror or exc}{where}") from exc
    return AssembledLayer(
        layer=layer,
        files=dict(sorted(files.items())),
        packages=tuple(sorted(p.name for p in packages)),
    )


def _collect(
    debs: Sequence[tuple[LockedDeb, Path]], spool: Callable[[], _Spool]
) -> tuple[dict[str, _Item], list[_Package]]:
    """Every member of every .deb under its merged-/usr path, packages placed by name.

    The .debs are read in threads (decompression releases the GIL) and placed in a fixed
    order afterwards, so the outcome never depends on which thread finished first.
    """
    ordered = sorted(debs, key=lambda d: (d[0].name, d[0].architecture))
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        spools = [spool() for _ in ordered]
        read = list(pool.map(lambda d, s: _read_deb(d[0], d[1], s), ordered, spools))
    items: dict[str, _Item] = {}
    packages = {package.name: package for package, _ in read}
    for (_, members), (_, path) in zip(read, ordered, strict=True):
        for name, item in members:
            _place(items, name, item, packages, path)
    return items, sorted(packages.values(), key=lambda p: p.name)


def _read_deb(
    locked: LockedDeb, path: Path, spool: _Spool
) -> tuple[_Package, list[tuple[str, _Item]]]:
    """One .deb's package and its members (merged-/usr paths), contents into ``spool``."""
    with DebFile(path) as deb:
        package = _package(locked, path, deb.control())
        members: list[tuple[str, _Item]] = []
        blobs: dict[str, int] = {}  # this .deb's files, for its hard links
        for member in deb.members():
            info = member.info
            name = _merged_name(info, path)
            if name is None:
                continue
            item = _Item("dir", info.mode & 0o7777, package.name, info.uid, info.gid)
            if member.stream is not None:
                item.kind, item.spool, item.blob = "file", spool, spool.add(member.stream)
                blobs[name] = item.blob
            elif info.islnk():
                item.kind, item.spool, item.blob = "file", spool, blobs[_usr(info.linkname)]
            elif info.issym():
                item.kind, item.mode, item.linkname = "symlink", 0o777, info.linkname
            members.append((name, item))
    return package, members


def _package(locked: LockedDeb, path: Path, control: DebControl) -> _Package:
    """The .deb's identity, checked against what the lock names."""
    fields = control.fields
    name, version = fields.get("Package", ""), fields.get("Version", "")
    arch = fields.get("Architecture", "")
    if (name, version, arch) != (locked.name, locked.version, locked.architecture):
        raise DebianError(
            f"{path.name}: the .deb is {name} {version} ({arch}), "
            f"the lock names {locked.name} {locked.version} ({locked.architecture})",
            hint="the cached .deb is not the locked one; fetch it again",
        )
    return _Package(name, version, control)


def _usr(name: str) -> str:
    """``name`` as merged /usr stores it: ``lib/x`` -> ``usr/lib/x``."""
    return "usr/" + name if name.split("/", 1)[0] in MERGED_USR else name


def _merged_name(info: tarfile.TarInfo, deb: Path) -> str | None:
    """Where a member goes on a merged-/usr system (None: it is one of the symlinks)."""
    if info.name not in MERGED_USR or info.isdir():
        return _usr(info.name)
    if info.issym() and info.linkname.strip("/") == f"usr/{info.name}":
        return None  # base-files 13 ships the merged-/usr symlinks; the base layer makes them
    raise DebianError(
        f"{deb.name}: member {info.name!r} is not a directory or a link to usr/{info.name}, "
        f"but merged /usr makes /{info.name} a symlink",
        hint="this package does not fit a merged-/usr system; leave it out",
    )


def _place(
    items: dict[str, _Item],
    name: str,
    new: _Item,
    packages: Mapping[str, _Package],
    deb: Path,
) -> None:
    """Add ``new`` at ``name``, deciding between two packages as dpkg would."""
    old = items.get(name)
    if old is None or old.package == new.package:
        items[name] = new
    elif old.kind == new.kind == "dir" or _same(old, new):
        return
    elif _replaces(packages[new.package], packages[old.package]):
        items[name] = new
    elif not _replaces(packages[old.package], packages[new.package]):
        raise DebianError(
            f"{deb.name}: /{name} is also shipped by {old.package}, differently, and "
            f"neither package declares Replaces on the other",
            hint="the two packages cannot be installed together; leave one of them out",
        )


def _same(a: _Item, b: _Item) -> bool:
    if (a.kind, a.mode, a.uid, a.gid, a.linkname) != (b.kind, b.mode, b.uid, b.gid, b.linkname):
        return False
    return a.kind != "file" or a.read() == b.read()


def _replaces(package: _Package, other: _Package) -> bool:
    return package.control.replaces(other.name, other.version)


def _glob(pattern: str) -> re.Pattern[str]:
    """A drop glob as a regex: ``**`` spans names, ``*`` and ``?`` stay within one."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wild.get(p, re.escape(p)) for p in parts))


def _without_dropped(items: dict[str, _Item], drop: Sequence[str]) -> dict[str, _Item]:
    """``items`` without what ``drop`` matches (a matched directory stays if it keeps a child)."""
    rules = [(p.startswith("!"), _glob(p.removeprefix("!"))) for p in drop]

    def dropped(name: str) -> bool:
        verdict = False
        for keep, regex in rules:
            if regex.fullmatch(name):
                verdict = not keep
        return verdict

    gone = {name for name in items if dropped(name)}
    needed = {parent for name in items if name not in gone for parent in _parents(name)}
    return {n: i for n, i in items.items() if n not in gone or (i.kind == "dir" and n in needed)}


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _rootfs(
    spec: RootfsSpec, items: Mapping[str, _Item], packages: Sequence[_Package]
) -> dict[str, _Item]:
    """What maintainer scripts and the image's definition add to a base's bottom layer."""
    made: dict[str, _Item] = {}
    for alias in MERGED_USR:
        if alias != "lib64" or spec.arch == "amd64" or f"usr/{alias}" in items:
            made[alias] = _Item("symlink", 0o777, linkname=f"usr/{alias}")
            if f"usr/{alias}" not in items:
                made[f"usr/{alias}"] = _Item("dir", 0o755)
    made["tmp"] = _Item("dir", 0o1777)
    made["etc/passwd"] = _text(
        f"{a.name}:x:{a.uid}:{a.gid}:{a.name}:{a.home}:{a.shell}\n" for a in spec.accounts
    )
    made["etc/group"] = _text(f"{g.name}:x:{g.gid}:{','.join(g.members)}\n" for g in spec.groups)
    for account in spec.accounts:
        if account.home not in _NO_HOME:
            home = account.home.strip("/")
            made[home] = _Item("dir", 0o700, uid=account.uid, gid=account.gid)
    names = {p.name for p in packages}
    if "ca-certificates" in names:
        made[_CA_BUNDLE] = _ca_bundle(items)
    if "tzdata" in names and spec.localtime:
        zone = f"usr/share/zoneinfo/{spec.localtime}"
        if zone not in items:
            raise DebianError(
                f"localtime {spec.localtime!r}: tzdata has no /{zone}",
                hint="name a zone tzdata ships, e.g. Etc/UTC",
            )
        made["etc/localtime"] = _Item("symlink", 0o777, linkname=f"/{zone}")
    for path, target in spec.symlinks:
        made[path.strip("/")] = _Item("symlink", 0o777, linkname=target)
    os_release = _resolve({**items, **made}, "etc/os-release")
    if os_release is None or os_release.kind != "file":
        raise DebianError(
            "the base's bottom layer has no /etc/os-release",
            hint="add base-files to the base's packages",
        )
    return made


def _text(lines: Iterable[str]) -> _Item:
    return _Item("file", 0o644, data="".join(lines).encode("utf-8"))


def _ca_bundle(items: Mapping[str, _Item]) -> _Item:
    """``ca-certificates.crt`` as ``update-ca-certificates`` writes it, every cert enabled.

    Each certificate under ``usr/share/ca-certificates``, by path, ends in a newline.
    """
    bundle = bytearray()
    for name in sorted(
        (n for n in items if n.startswith(_CERTS) and n.endswith(".crt")), key=os.fsencode
    ):
        item = items[name]
        if item.kind != "file":
            continue
        cert = item.read()
        bundle += cert if cert.endswith(b"\n") or not cert else cert + b"\n"
    if not bundle:
        raise DebianError(f"ca-certificates ships no certificate under /{_CERTS}")
    return _Item("file", 0o644, data=bytes(bundle))


def _resolve(items: Mapping[str, _Item], name: str) -> _Item | None:
    """The item ``name`` leads to, following symlinks (merged /usr included), or None."""
    for _ in range(40):
        name = _usr(os.path.normpath(name).lstrip("/"))
        item = items.get(name)
        if item is None or item.kind != "symlink":
            return item
        base = "" if item.linkname.startswith("/") else os.path.dirname(name)
        name = os.path.join(base, item.linkname.lstrip("/"))
    return None


def _dpkg_view(packages: Sequence[_Package], below: Sequence[Path] | None) -> dict[str, _Item]:
    """``status.d/<package>`` (and ``.md5sums``) here; ``status`` too unless ``below`` is None."""
    made: dict[str, _Item] = {}
    paragraphs: dict[str, str] = {}
    for path in below or ():
        control = read_control(path)
        paragraphs[control.fields["Package"]] = control.status_paragraph()
    for package in packages:
        paragraph = package.control.status_paragraph()
        paragraphs[package.name] = paragraph
        made[f"{_STATUS_DIR}/{package.name}"] = _text([paragraph])
        if package.control.md5sums is not None:
            made[f"{_STATUS_DIR}/{package.name}.md5sums"] = _text([package.control.md5sums])
    if below is not None:
        made[_STATUS] = _text(paragraphs[name] + "\n" for name in sorted(paragraphs))
    return made


def _with_parents(items: dict[str, _Item]) -> dict[str, _Item]:
    """``items`` plus a directory for every parent path none of them names."""
    full = dict(items)
    for name in items:
        for parent in _parents(name):
            existing = full.setdefault(parent, _Item("dir", 0o755))
            if existing.kind != "dir":
                raise DebianError(
                    f"/{parent} is a {existing.kind} of {existing.package or 'the base'}, "
                    f"but {items[name].package or 'the base'} puts /{name} under it",
                    hint="the two cannot be installed together; leave one of them out",
                )
    return full


def _write(tar: tarfile.TarFile, entries: Sequence[tuple[str, _Item]], mtime: int) -> None:
    for name, item in entries:
        info = tar_info(name, mtime=mtime)
        info.mode, info.uid, info.gid = item.mode, item.uid, item.gid
        if item.kind == "dir":
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        elif item.kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, item.linkname
            tar.addfile(info)
        elif item.spool is None:
            data = item.data or b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        else:
            info.size = item.spool.size(item.blob)
            with item.spool.open(item.blob) as stream:
                tar.addfile(info, stream)

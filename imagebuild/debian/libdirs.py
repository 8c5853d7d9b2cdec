"""Where a base's libraries are: its layer tars read as names, links and library files.

Nothing is unpacked. Each layer streams past once (gzip, zstd, xz or plain tar), applied
as an engine would: later layers override, ``.wh.NAME`` removes a path, ``.wh..wh..opq``
empties a directory of what lower layers put there, and a member's parent directories are
resolved through the links already there (a merged-/usr ``lib -> usr/lib`` sends
``lib/x86_64-linux-gnu/libc.so.6`` to ``usr/lib/...``). Kept per path: the kind, a link's
target, the ELF facts of library files, and the text of the loader's configuration and of
dpkg's file lists.

The directories searched are the glibc loader's (``/lib/<triplet>``, ``/usr/lib/<triplet>``,
``/lib``, ``/usr/lib``, ``/lib64``, ``/usr/lib64``), those ``/etc/ld.so.conf`` names with its
``include`` patterns (python:slim's ``/usr/local/lib``), and musl's (``/etc/ld-musl-*.path``,
else its built-in ``/lib:/usr/local/lib:/usr/lib``). Links are followed inside the tree only.
"""

from __future__ import annotations

import fnmatch
import re
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from imagebuild.debian.elf import SMALLEST_ELF, read_elf_stream
from imagebuild.debian.model import ElfInfo
from imagebuild.errors import DebianError


@dataclass(frozen=True, kw_only=True, slots=True)
class LibraryFile:
    """A library the loader finds in a base, under one name of a search directory."""

    name: str
    """The name in the directory (``libstdc++.so.6``), what DT_NEEDED asks for."""
    path: str
    """The entry's absolute path in the image, through the directory's real location."""
    info: ElfInfo
    """The ELF facts of the file the entry leads to (links followed)."""
    package: str | None = None
    """The Debian package whose dpkg file list names the entry or its file."""


def library_files(blobs: Sequence[Path]) -> tuple[LibraryFile, ...]:
    """Every library file in the search directories of the image made of ``blobs``.

    ``blobs`` are layer tars, base layer first. Entries come in search order, each
    directory once; dangling links and files that are not ELF are left out.
    """
    tree = _Tree()
    _walk_layers(blobs, lambda tar, member, layer: _apply(tree, tar, member, layer))
    children: dict[str, list[str]] = {}
    for key in tree.nodes:
        if key:
            parent, _, name = key.rpartition("/")
            children.setdefault(parent, []).append(name)
    entries: list[tuple[str, str]] = []  # (directory, name) in search order
    for directory in _search_dirs(tree, children):
        names = sorted(children.get(directory, []))
        entries.extend((directory, name) for name in names if _SO.search(name))
    _read_late(blobs, tree, entries)
    owners = _owners(tree)
    found: list[LibraryFile] = []
    for directory, name in entries:
        entry = f"{directory}/{name}" if directory else name
        real = tree.resolve(entry)
        node = None if real is None else tree.nodes.get(real)
        if real is None or node is None or node.kind != "file" or node.info is None:
            continue
        package = owners.get(entry) or owners.get(real)
        found.append(LibraryFile(name=name, path=f"/{entry}", info=node.info, package=package))
    return tuple(found)


_SO = re.compile(r"\.so($|\.)")
# Library files are read while their layer streams past when they sit in a directory named
# like a library directory; one in a directory only ld.so.conf names is read in a second pass.
_LIB_DIR = re.compile(r"lib|lib32|lib64|libx32|.*-linux-.*")
_TEXT = re.compile(
    r"etc/ld\.so\.conf(\.d/[^/]+)?|etc/ld-musl-[^/]+\.path"
    r"|var/lib/dpkg/info/[^/]+\.list|var/lib/dpkg/status\.d/[^/]+\.md5sums"
)
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_MAX_LINKS = 40  # as the kernel's symlink limit: a loop ends here


@dataclass(slots=True)
class _Node:
    kind: str  # "dir", "file" or "link"
    layer: int
    target: str = ""  # a link's target, as written
    info: ElfInfo | None = None
    read: bool = False  # whether ``info`` was looked for
    text: bytes = b""  # loader configuration, dpkg file lists


class _Tree:
    """A rootfs as names, links and the few contents the check needs, keyed by path."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {"": _Node("dir", -1)}

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        """``path``'s real location, links followed inside the tree; None for a loop."""
        parts = [p for p in path.split("/") if p not in {"", "."}]
        parts.reverse()
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop()
            if part == "..":
                done = done[:-1]
                continue
            node = self.nodes.get("/".join([*done, part]))
            if node is not None and node.kind == "link" and (parts or follow_last):
                hops += 1
                if hops > _MAX_LINKS:
                    return None
                if node.target.startswith("/"):
                    done = []
                parts.extend(reversed([p for p in node.target.split("/") if p not in {"", "."}]))
                continue
            done.append(part)
        return "/".join(done)

    def remove(self, path: str, *, below_layer: int | None = None, children: bool = False) -> None:
        """Remove ``path`` (or only its children), or what lower layers put there."""
        node = self.nodes.get(path)
        if node is not None and not children:
            del self.nodes[path]
        if node is None or node.kind == "dir":  # a directory may exist only by its children
            prefix = f"{path}/" if path else ""
            for key in [k for k in self.nodes if k.startswith(prefix) and k != path]:
                if below_layer is None or self.nodes[key].layer < below_layer:
                    del self.nodes[key]

    def text(self, path: str) -> bytes:
        real = self.resolve(path)
        node = None if real is None else self.nodes.get(real)
        return node.text if node is not None and node.kind == "file" else b""


def _open_layer(blob: Path) -> tarfile.TarFile:
    """A layer blob as a tar: zstd, gzip, xz or bzip2 as a stream, plain for random access.

    A plain tar (the build's decompressed base, ``image.store.PlainLayers``) is walked by
    seeking over the members' data and each library read alone, rather than streamed
    through whole: 15% less time for a slim base's index.
    """
    with blob.open("rb") as head:
        magic = head.read(6)
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        reader = zstandard.ZstdDecompressor().stream_reader(blob.open("rb"), closefd=True)
        return tarfile.open(fileobj=reader, mode="r|")
    if magic.startswith(_COMPRESSED):
        return tarfile.open(blob, mode="r|*")
    return tarfile.open(blob, mode="r:")


_COMPRESSED = (b"\x1f\x8b", b"\xfd7zXZ", b"BZh")
"""The magic numbers of gzip, xz and bzip2 (zstd's is read apart)."""


def _walk_layers(
    blobs: Sequence[Path], visit: Callable[[tarfile.TarFile, tarfile.TarInfo, int], None]
) -> None:
    for layer, blob in enumerate(blobs):
        try:
            with _open_layer(blob) as tar:
                for member in tar:
                    visit(tar, member, layer)
        except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as exc:
            raise DebianError(
                f"base layer {blob.name}: cannot read it to index its libraries ({exc})",
                hint="delete it from the cache and build again",
            ) from exc


def _member_path(tree: _Tree, name: str) -> tuple[str, str] | None:
    """The real parent directory and the base name of a member, or None to skip it."""
    parts = [p for p in name.split("/") if p not in {"", "."}]
    if not parts or ".." in parts:
        return None
    parent = tree.resolve("/".join(parts[:-1]))
    return None if parent is None else (parent, parts[-1])


def _apply(tree: _Tree, tar: tarfile.TarFile, member: tarfile.TarInfo, layer: int) -> None:
    place = _member_path(tree, member.name)
    if place is None:
        return
    parent, name = place
    path = f"{parent}/{name}" if parent else name
    if name == _OPAQUE:
        tree.remove(parent, below_layer=layer, children=True)
        return
    if name.startswith(_WHITEOUT):
        whited = name[len(_WHITEOUT) :]
        tree.remove(f"{parent}/{whited}" if parent else whited)
        return
    existing = tree.nodes.get(path)
    if member.isdir():
        if existing is None or existing.kind != "dir":
            if existing is not None:
                tree.remove(path)
            tree.nodes[path] = _Node("dir", layer)
        return
    if existing is not None:
        tree.remove(path)
    node = _new_node(tree, tar, member, path, layer)
    if node is not None:
        tree.nodes[path] = node


def _new_node(
    tree: _Tree, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, layer: int
) -> _Node | None:
    """What a link or file member puts at ``path``; None for what the check has no use for."""
    if member.issym():
        return _Node("link", layer, target=member.linkname)
    if member.islnk():
        source = tree.resolve(member.linkname)
        node = None if source is None else tree.nodes.get(source)
        if node is None or node.kind != "file":
            return None
        return _Node("file", layer, info=node.info, read=node.read, text=node.text)
    if not member.isfile():
        return None  # devices and FIFOs
    node = _Node("file", layer)
    parent, _, name = path.rpartition("/")
    if _SO.search(name) and _LIB_DIR.fullmatch(parent.rpartition("/")[2]):
        node.info, node.read = _read_member(tar, member), True
    elif _TEXT.fullmatch(path):
        stream = tar.extractfile(member)
        node.text = stream.read() if stream is not None else b""
    return node


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> ElfInfo | None:
    if member.size < SMALLEST_ELF:
        return None
    stream = tar.extractfile(member)
    return None if stream is None else read_elf_stream(stream)


def _read_late(blobs: Sequence[Path], tree: _Tree, entries: Sequence[tuple[str, str]]) -> None:
    """Read the library files the first pass skipped (in directories only ld.so.conf names)."""
    wanted: set[str] = set()
    for directory, name in entries:
        real = tree.resolve(f"{directory}/{name}" if directory else name)
        node = None if real is None else tree.nodes.get(real)
        if real is not None and node is not None and node.kind == "file" and not node.read:
            wanted.add(real)
    if not wanted:
        return

    def visit(tar: tarfile.TarFile, member: tarfile.TarInfo, layer: int) -> None:
        place = _member_path(tree, member.name) if member.isfile() else None
        path = "/".join(p for p in place if p) if place else ""
        node = tree.nodes.get(path)
        if path in wanted and node is not None and node.layer == layer:
            node.info, node.read = _read_member(tar, member), True

    _walk_layers(blobs, visit)


def _search_dirs(tree: _Tree, children: Mapping[str, list[str]]) -> list[str]:
    """The real paths of the directories the loader searches, in its order, each once.

    A base whose ``/lib`` holds musl's loader is searched as musl does (its path file, else
    its built-in path); any other as glibc does.
    """
    named: list[str] = []
    if any(n.startswith("ld-musl-") for n in children.get(tree.resolve("lib") or "", [])):
        paths = sorted(k for k in tree.nodes if re.fullmatch(r"etc/ld-musl-[^/]+\.path", k))
        for path in paths:
            named.extend(re.split(r"[:\s]+", tree.text(path).decode(errors="replace")))
        if not paths:
            named.extend(["lib", "usr/local/lib", "usr/lib"])  # musl's built-in path
    else:
        for top in ("lib", "usr/lib"):
            top_real = tree.resolve(top) or ""
            triplets = sorted(c for c in children.get(top_real, []) if "-linux-" in c)
            named.extend(f"{top_real}/{c}" for c in triplets)
        named.extend(["lib", "usr/lib", "lib64", "usr/lib64"])
        named.extend(_conf_dirs(tree, children, "etc/ld.so.conf", depth=0))
    found: list[str] = []
    for directory in (d.strip().strip("/") for d in named):
        real = tree.resolve(directory) if directory else None
        if real is not None and real in children and real not in found:
            found.append(real)
    return found


def _conf_dirs(
    tree: _Tree, children: Mapping[str, list[str]], path: str, *, depth: int
) -> list[str]:
    """The directories an ld.so.conf file names, its ``include`` patterns followed."""
    if depth > 8:  # an include cycle
        return []
    found: list[str] = []
    for raw in tree.text(path).decode(errors="replace").splitlines():
        line = raw.partition("#")[0].strip()
        if line.startswith("include"):
            for pattern in line.split()[1:]:
                if not pattern.startswith("/"):
                    pattern = f"{path.rpartition('/')[0]}/{pattern}"
                folder, _, glob = pattern.strip("/").rpartition("/")
                real = tree.resolve(folder) or ""
                for name in sorted(fnmatch.filter(children.get(real, []), glob)):
                    found += _conf_dirs(tree, children, f"{real}/{name}", depth=depth + 1)
        elif line and not line.startswith("hwcap"):
            found.extend(part.partition("=")[0] for part in re.split(r"[:,\s]+", line))
    return found


def _owners(tree: _Tree) -> dict[str, str]:
    """Library paths -> the Debian package whose dpkg file list names them."""
    owners: dict[str, str] = {}
    for key, node in tree.nodes.items():
        if node.kind != "file" or not node.text or not key.startswith("var/lib/dpkg/"):
            continue
        name = key.rpartition("/")[2]
        package = name.removesuffix(".list").removesuffix(".md5sums").partition(":")[0]
        for line in node.text.decode(errors="replace").splitlines():
            listed = line.split("  ", 1)[-1].strip().strip("/")
            if _SO.search(listed):
                owners[listed] = package
                real = tree.resolve(listed)
                if real is not None:
                    owners.setdefault(real, package)
    return owners

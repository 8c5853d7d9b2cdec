"""The link check: every ELF file the Python layers ship finds its libraries in the image.

Data flow::

    wheel --scan_wheel--> WheelElf per ELF member (cached by the wheel's sha256)
    base layers --index_base--> LibraryIndex (cached by the layers' digests)
    wheels' own libraries --index_wheels--> LibraryIndex
    WheelElfs + the merged index --check_links--> Missing, one line each (``debian.linklines``)

What the image provides is looked up by file name, the way the loader looks up a DT_NEEDED
entry in its search directories; a symbol version need is met when the library defines the
version (or defines none at all: the loader then only warns). Wheels are judged leniently:
any library any wheel ships counts as provided to every wheel, wherever it sits. Exact
resolution would have to follow each file's RUNPATH and ``$ORIGIN`` chains, and would still
refuse, wrongly, packages that load their libraries themselves (``ctypes``, a preload in
``__init__``). A name that no wheel and no search directory has fails on any path, and
that is the failure users meet.

Two kinds of need are not the image's to meet. The GPU driver's libraries (``libcuda.so.1``)
are mounted into a container at run time by the NVIDIA container toolkit, so no image has
them and CUDA wheels link them all the same: they count as provided (``debian.drivers``).
And a library a wheel ships that no extension module or program links to, directly or
through others, is a plugin its package opens itself when a feature is used (PyTorch's
CUDA stack ships NVSHMEM's MPI and UCX transports and cuFile's RDMA one; ONNX Runtime its
CUDA and TensorRT providers): what it lacks is ``Missing.on_demand``, for a warning, not a
refusal. An extension module is told by the init function it names
(``ElfInfo.python_module``). An extension module its package imports only where it can do
without it (numba's TBB threading layer: ``install.imports``) is passed as ``optional``,
and counts as a plugin.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imagebuild.cache import write_json
from imagebuild.debian.drivers import from_the_gpu_driver
from imagebuild.debian.elf import SMALLEST_ELF, parse_elf_info, read_elf_stream, render_elf_info
from imagebuild.debian.model import ElfInfo
from imagebuild.digest import Digest, digest_bytes, digest_file, digest_hex
from imagebuild.errors import DebianError

_FORMAT = 2  # of the JSON records below; a record of another format is read as a miss

# The dynamic loader itself: found through PT_INTERP, never through the search path.
_LOADER = re.compile(r"(ld-linux[\w.-]*|ld64|ld-musl-[\w.-]+)\.so\.\d+")

ARCH_MACHINES = {
    "amd64": "x86_64",
    "arm64": "aarch64",
    "i386": "i686",
    "386": "i686",
    "armhf": "armv7l",
    "arm": "armv7l",
    "ppc64el": "ppc64le",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
"""Debian and OCI architecture names -> the ELF machine names ``ElfInfo`` carries."""


@dataclass(frozen=True, kw_only=True, slots=True)
class WheelElf:
    """One ELF member of a wheel."""

    path: str
    """The member's path in the wheel (``greenlet/_greenlet.cpython-311-x86_64-linux-gnu.so``)."""
    info: ElfInfo


def scan_wheel(path: Path, *, cache: Path, sha256: Digest | None = None) -> tuple[WheelElf, ...]:
    """Every ELF member of the wheel at ``path``, sorted by member path.

    The answer is kept in ``cache/<sha256 hex>.json``, so a wheel is read once: pass the
    wheel's ``sha256`` when it is known (the lock has it), else the file is hashed.
    """
    record = scan_record(cache, sha256 or digest_file(path))
    cached = _load_scan(record)
    if cached is not None:
        return cached
    found: list[WheelElf] = []
    try:
        with zipfile.ZipFile(path) as archive:
            for member in sorted(archive.infolist(), key=lambda m: m.filename):
                if member.is_dir() or member.file_size < SMALLEST_ELF:
                    continue
                with archive.open(member) as stream:
                    info = read_elf_stream(stream, name=member.filename.rpartition("/")[2])
                if info is not None:
                    found.append(WheelElf(path=member.filename, info=info))
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DebianError(
            f"wheel {path.name}: cannot read it to check its ELF files ({exc})",
            hint="the file is damaged: delete it (from the cache, if it is there) and build again",
        ) from exc
    members = [{"path": elf.path, "elf": render_elf_info(elf.info)} for elf in found]
    write_json(record, {"format": _FORMAT, "members": members}, durable=False)  # see _load_record
    return tuple(found)


def scan_record(cache: Path, sha256: Digest) -> Path:
    """Where the ELF scan of the wheel whose digest is ``sha256`` is kept."""
    return cache / f"{digest_hex(sha256)}.json"


def base_record(cache: Path, layers: Sequence[Digest]) -> Path:
    """Where the library index of the image made of ``layers`` (base layer first) is kept."""
    return cache / f"{digest_hex(digest_bytes(chr(10).join(layers).encode()))}.json"


def usable_record(data: bytes) -> bool:
    """Whether ``data`` is a record of this format (a scan or an index), as kept on disk."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("format") == _FORMAT


def _load_scan(record: Path) -> tuple[WheelElf, ...] | None:
    data = _load_record(record)
    if data is None:
        return None
    try:
        members = data["members"]
        return tuple(WheelElf(path=str(m["path"]), info=parse_elf_info(m["elf"])) for m in members)
    except (KeyError, TypeError, ValueError):
        return None


def _load_record(record: Path) -> dict[str, Any] | None:
    """A cache record of this format, or None (absent, unreadable, another format)."""
    try:
        data = json.loads(record.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return None
    return data


@dataclass(frozen=True, kw_only=True, slots=True)
class Provider:
    """A library file the image has, under the name DT_NEEDED entries ask for."""

    name: str
    """The file name the loader finds it by (``libstdc++.so.6``)."""
    path: str
    """Where it is: its path in the image (``/usr/lib/x86_64-linux-gnu/libstdc++.so.6``), or
    ``<wheel>: <member>`` for a library a wheel ships."""
    machine: str
    """The ELF machine it was built for (``x86_64``, ``aarch64``)."""
    versions: tuple[str, ...]
    """The symbol versions it defines, sorted; empty when it defines none."""
    package: str | None = None
    """The Debian package that installed it, when the image's dpkg records say."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LibraryIndex:
    """What an image provides to the dynamic loader, by file name."""

    providers: tuple[Provider, ...] = ()
    """Every provider, sorted by name, then path."""

    def merged(self, *others: LibraryIndex) -> LibraryIndex:
        """This index with the providers of ``others`` added."""
        every = set(self.providers).union(*(other.providers for other in others))
        return LibraryIndex(providers=tuple(sorted(every, key=_provider_key)))

    def find(self, name: str, machine: str) -> tuple[Provider, ...]:
        """The providers of file name ``name`` built for ``machine``."""
        return tuple(p for p in self.providers if p.name == name and p.machine == machine)


def _provider_key(provider: Provider) -> tuple[str, str, str]:
    return (provider.name, provider.path, provider.machine)


def index_base(
    layers: Sequence[Digest], *, blobs: Callable[[Digest], Path], cache: Path
) -> LibraryIndex:
    """The libraries the image made of ``layers`` (base layer first), read from ``blobs``.

    The layers are read as an engine applies them (later ones override, whiteouts remove),
    and a library counts when it is in a directory the loader searches: the default ones,
    those ``/etc/ld.so.conf`` names (with its includes), and musl's. The answer is kept in
    ``cache`` under a name made of the layers' digests, so a base is read once; ``blobs``
    is asked for the layers' files only when no record holds the answer.
    """
    record = base_record(cache, layers)
    cached = _load_index(record)
    if cached is not None:
        return cached
    from imagebuild.debian.libdirs import library_files  # (a base not indexed yet)

    providers = sorted(
        (
            Provider(
                name=lib.name,
                path=lib.path,
                machine=lib.info.machine,
                versions=lib.info.version_defs,
                package=lib.package,
            )
            for lib in library_files([blobs(digest) for digest in layers])
        ),
        key=_provider_key,
    )
    index = LibraryIndex(providers=tuple(providers))
    record_data = {"format": _FORMAT, "providers": [_render_provider(p) for p in providers]}
    write_json(record, record_data, durable=False)  # see _load_record
    return index


def _render_provider(provider: Provider) -> dict[str, object]:
    return {
        "name": provider.name,
        "path": provider.path,
        "machine": provider.machine,
        "versions": list(provider.versions),
        "package": provider.package,
    }


def _load_index(record: Path) -> LibraryIndex | None:
    data = _load_record(record)
    if data is None:
        return None
    try:
        providers = tuple(
            Provider(
                name=str(p["name"]),
                path=str(p["path"]),
                machine=str(p["machine"]),
                versions=tuple(str(v) for v in p["versions"]),
                package=None if p["package"] is None else str(p["package"]),
            )
            for p in data["providers"]
        )
    except (KeyError, TypeError):
        return None
    return LibraryIndex(providers=providers)


def index_wheels(wheels: Iterable[tuple[str, Sequence[WheelElf]]]) -> LibraryIndex:
    """The libraries wheels ship: every shared object, under its file name and its soname."""
    providers: set[Provider] = set()
    for wheel, elfs in wheels:
        for elf in elfs:
            if not elf.info.shared:
                continue
            for name in _found_by(elf):
                providers.add(
                    Provider(
                        name=name,
                        path=f"{wheel}: {elf.path}",
                        machine=elf.info.machine,
                        versions=elf.info.version_defs,
                    )
                )
    return LibraryIndex(providers=tuple(sorted(providers, key=_provider_key)))


def _found_by(elf: WheelElf) -> set[str]:
    """The names the loader finds a wheel's library by: its file name and its soname."""
    return {elf.path.rpartition("/")[2], elf.info.soname or ""} - {""}


@dataclass(frozen=True, kw_only=True, slots=True)
class Missing:
    """A library, or a symbol version of one, that an ELF file of a wheel needs and lacks."""

    wheel: str
    """The wheel as the caller named it (``greenlet 3.1.1``)."""
    member: str
    """The ELF file's path in the wheel."""
    library: str
    """The DT_NEEDED name (``libstdc++.so.6``)."""
    version: str | None = None
    """For a symbol version failure, the version wanted (``GLIBC_2.38``); else None."""
    provided: str | None = None
    """For a symbol version failure, the newest version of the same family (``GLIBC_2.36``)
    the image's library defines, if it defines any."""
    provider: Provider | None = None
    """For a symbol version failure, the image's library that lacks it."""
    on_demand: bool = False
    """Whether the file is a plugin: no extension module or program links to it, so its
    package opens it itself when it is used (``dlopen``), and lacking it fails only then.
    So is an optional extension module, and what only such modules link."""


def check_links(
    wheels: Sequence[tuple[str, Sequence[WheelElf]]],
    index: LibraryIndex,
    *,
    arch: str,
    optional: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[Missing, ...]:
    """What the wheels' ELF files for ``arch`` need and ``index`` does not provide, sorted.

    ``arch`` is a Debian or OCI name (``amd64``, ``arm64``) or an ELF machine name. Files
    built for another machine are skipped (some wheels ship test binaries for several), and
    so are the dynamic loader and the GPU driver's libraries. For each file and library,
    only the newest missing version of each family is reported (GLIBC_2.38 says all a
    GLIBC_2.34 line would). What plugins lack is marked ``on_demand``, and so is what the
    ``optional`` extension modules (wheel, member) need, unless another module links it.
    """
    machine = ARCH_MACHINES.get(arch, arch)
    by_name: dict[str, list[Provider]] = {}
    for provider in index.providers:
        if provider.machine == machine:
            by_name.setdefault(provider.name, []).append(provider)
    files = _of_machine(wheels, machine)
    linked = _linked(files, optional)
    missing: list[Missing] = []
    for wheel, elf in files:
        plugin = (wheel, elf.path) not in linked
        missing.extend(replace(m, on_demand=plugin) for m in _check_file(wheel, elf, by_name))
    return tuple(sorted(missing, key=lambda m: (m.wheel, m.member, m.library, m.version or "")))


def importers(
    wheels: Sequence[tuple[str, Sequence[WheelElf]]], missing: Iterable[Missing], *, arch: str
) -> set[tuple[str, str]]:
    """The extension modules (wheel, member) that load what ``missing`` names a need of.

    That is each missing need's file when it is an extension module, and every extension
    module that links the file, directly or through other libraries: the modules whose
    imports decide whether the need refuses the image (``install.imports``).
    """
    files = _of_machine(wheels, ARCH_MACHINES.get(arch, arch))
    by_name = _by_name(files)
    linking: dict[tuple[str, str], list[tuple[str, WheelElf]]] = {}
    for wheel, elf in files:
        for library in elf.info.needed:
            for other, provider in by_name.get(library.rpartition("/")[2], ()):
                linking.setdefault((other, provider.path), []).append((wheel, elf))
    modules = {(wheel, elf.path): elf for wheel, elf in files if elf.info.python_module}
    todo = [(m.wheel, m.member) for m in missing]
    seen: set[tuple[str, str]] = set()
    while todo:
        key = todo.pop()
        if key not in seen:
            seen.add(key)
            todo.extend((wheel, elf.path) for wheel, elf in linking.get(key, ()))
    return {key for key in seen if key in modules}


def _of_machine(
    wheels: Sequence[tuple[str, Sequence[WheelElf]]], machine: str
) -> list[tuple[str, WheelElf]]:
    return [(wheel, elf) for wheel, elfs in wheels for elf in elfs if elf.info.machine == machine]


def _by_name(files: Sequence[tuple[str, WheelElf]]) -> dict[str, list[tuple[str, WheelElf]]]:
    """The files by every name they could be found by (as in ``index_wheels``)."""
    by_name: dict[str, list[tuple[str, WheelElf]]] = {}
    for wheel, elf in files:
        for name in _found_by(elf):
            by_name.setdefault(name, []).append((wheel, elf))
    return by_name


def _linked(
    files: Sequence[tuple[str, WheelElf]], optional: frozenset[tuple[str, str]]
) -> set[tuple[str, str]]:
    """The files the loader loads for Python: extension modules, programs, what they link.

    Every name a file of any wheel could be found by counts (as in ``index_wheels``). The
    rest are libraries a package opens itself, if ever (``dlopen``, ``ctypes``): a CUDA
    provider of ONNX Runtime, a transport of NVSHMEM; and the ``optional`` modules.
    """
    by_name = _by_name(files)
    todo = [
        (wheel, elf)
        for wheel, elf in files
        if (elf.info.python_module and (wheel, elf.path) not in optional)
        or not elf.info.shared
        or elf.info.interpreter is not None
    ]
    seen: set[tuple[str, str]] = set()
    while todo:
        wheel, elf = todo.pop()
        if (wheel, elf.path) in seen:
            continue
        seen.add((wheel, elf.path))
        for library in elf.info.needed:
            todo.extend(by_name.get(library.rpartition("/")[2], ()))
    return seen


def _check_file(
    wheel: str, elf: WheelElf, by_name: Mapping[str, list[Provider]]
) -> Iterable[Missing]:
    for library in elf.info.needed:
        if _not_the_image(library):
            continue
        if not by_name.get(library.rpartition("/")[2]):
            yield Missing(wheel=wheel, member=elf.path, library=library)
    for need in elf.info.version_needs:
        providers = by_name.get(need.library.rpartition("/")[2], [])
        if _not_the_image(need.library) or not providers:
            continue
        absent = [v for v in need.versions if not any(_defines(p, v) for p in providers)]
        newest: dict[str, str] = {}
        for version in absent:
            family = _family(version)
            if family not in newest or _order(version) > _order(newest[family]):
                newest[family] = version
        for version in sorted(newest.values()):
            provider = providers[0]
            yield Missing(
                wheel=wheel,
                member=elf.path,
                library=need.library,
                version=version,
                provided=_newest_of(provider.versions, _family(version)),
                provider=provider,
            )


def _not_the_image(library: str) -> bool:
    """Whether ``library`` is found elsewhere than in the image: the loader, the GPU driver."""
    return bool(_LOADER.fullmatch(library)) or from_the_gpu_driver(library)


def _defines(provider: Provider, version: str) -> bool:
    # A library without version definitions satisfies any need: the loader only warns.
    return not provider.versions or version in provider.versions


def _family(version: str) -> str:
    """``GLIBC_2.38`` -> ``GLIBC_``; ``GLIBCXX_3.4.30`` -> ``GLIBCXX_``; ``GCC_3.0`` -> ``GCC_``."""
    match = re.match(r"(.*?)[\d.]*$", version)
    return match.group(1) if match else version


def _order(version: str) -> tuple[int, ...]:
    numbers = version[len(_family(version)) :]
    return tuple(int(part) for part in numbers.split(".") if part.isdigit())


def _newest_of(versions: Iterable[str], family: str) -> str | None:
    same = [v for v in versions if _family(v) == family]
    return max(same, key=_order) if same else None

"""What one ELF file asks of the dynamic loader: its machine, needed libraries and symbol versions.

``read_elf`` reads a seekable stream with pyelftools; ``read_elf_stream`` reads a forward-only
one (a member of a wheel's zip or of a layer's tar), spooling it first. Only the ELF header,
the program and section headers, the dynamic section, the dynamic string table and the GNU
version sections are parsed: symbol tables, code and debug information are never decoded.

A zip or tar member cannot be read out of order without decompressing it from its start,
and the section headers sit at the end of the file, so each ELF member is inflated once,
in full, into a spool (memory up to ``SPOOL_MEMORY`` bytes, a temporary file beyond). The
files of a stripped library are nearly all "needed" bytes anyway: in scipy 1.14's wheel,
the dynamic and version data end at 90 MB of the 96 MB its ELF files hold.

A file that starts with the ELF magic but does not parse (truncated, corrupt, a fuzzing
corpus in a wheel's test data) counts as not ELF: ``None``, like a text file. The dynamic
loader cannot load it either, so it asks nothing of the image that could be checked.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, cast

from elftools.common.exceptions import ELFError
from elftools.elf.constants import VER_FLAGS
from elftools.elf.dynamic import Dynamic, DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection
from elftools.elf.sections import Section
from elftools.elf.segments import InterpSegment

ELF_MAGIC = b"\x7fELF"
SPOOL_MEMORY = 32 << 20
"""Bytes of one member kept in memory while it is read; a larger one spills to a temp file."""
SMALLEST_ELF = 52
"""The size of an ELF32 header: anything shorter cannot be an ELF file."""

# pyelftools' e_machine names -> the names `uname -m` and wheel tags use. Endianness splits
# ppc64 (the header says which); anything not listed keeps pyelftools' name, lowercased.
_MACHINES = {
    "EM_X86_64": "x86_64",
    "EM_AARCH64": "aarch64",
    "EM_386": "i686",
    "EM_ARM": "armv7l",
    "EM_S390": "s390x",
    "EM_RISCV": "riscv64",
    "EM_LOONGARCH": "loongarch64",
}

# What a malformed file makes pyelftools raise: its own errors, construct's (wrapped in
# ELFParseError), and the plain ones its readers hit on short or nonsense data.
_PARSE_ERRORS = (ELFError, ValueError, IndexError, KeyError, AssertionError, EOFError, TypeError)


@dataclass(frozen=True, kw_only=True, slots=True)
class VersionNeed:
    """The symbol versions a file needs from one library (``.gnu.version_r``)."""

    library: str
    """The needed library's file name, as in DT_NEEDED (``libc.so.6``)."""
    versions: tuple[str, ...]
    """Version names the loader insists on, sorted (``GLIBC_2.34``, ``GLIBCXX_3.4.30``).
    Weak needs (``VER_FLG_WEAK``) are left out: the loader only warns when they are absent."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ElfInfo:
    """What the dynamic loader needs to load one ELF file."""

    machine: str
    """The CPU it runs on, as ``uname -m`` names it: ``x86_64``, ``aarch64``, ``ppc64le``, ..."""
    elf_class: int
    """32 or 64."""
    shared: bool
    """An ``ET_DYN`` object: a shared library, an extension module or a PIE executable."""
    interpreter: str | None = None
    """The PT_INTERP path of an executable (``/lib64/ld-linux-x86-64.so.2``), else None."""
    soname: str | None = None
    """DT_SONAME, when set."""
    needed: tuple[str, ...] = ()
    """DT_NEEDED entries in file order (the order the loader searches them in)."""
    rpath: tuple[str, ...] = ()
    """DT_RPATH directories in order (``$ORIGIN`` left as written)."""
    runpath: tuple[str, ...] = ()
    """DT_RUNPATH directories in order."""
    version_needs: tuple[VersionNeed, ...] = ()
    """Symbol versions needed, one entry per library, sorted by library."""
    version_defs: tuple[str, ...] = ()
    """Symbol versions this file defines, sorted (the base entry, its own soname, left out)."""


def read_elf(stream: IO[bytes]) -> ElfInfo | None:
    """The ELF facts of a seekable ``stream``; None when it is not (well-formed) ELF."""
    stream.seek(0)
    if stream.read(4) != ELF_MAGIC:
        return None
    stream.seek(0)
    try:
        return _parse(ELFFile(stream))
    except _PARSE_ERRORS:
        return None


def read_elf_stream(stream: IO[bytes]) -> ElfInfo | None:
    """``read_elf`` for a forward-only stream: a zip or tar member, read once from its start.

    Only a stream that starts with the ELF magic is copied on into a spool; any other is
    left after its first four bytes.
    """
    head = stream.read(4)
    if head != ELF_MAGIC:
        return None
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
        spool.write(head)
        shutil.copyfileobj(stream, spool, 1 << 20)
        return read_elf(cast(IO[bytes], spool))


def _parse(elf: ELFFile) -> ElfInfo:
    # One walk over the section headers (pyelftools re-reads them on every iter_sections).
    sections = list(elf.iter_sections())
    dynamic = _dynamic_tags(elf, sections)
    sonames = _tag_strings(dynamic, "soname")
    return ElfInfo(
        machine=_machine(elf),
        elf_class=elf.elfclass,
        shared=elf["e_type"] == "ET_DYN",
        interpreter=_interpreter(elf, sections),
        soname=sonames[0] if sonames else None,
        needed=tuple(_tag_strings(dynamic, "needed")),
        rpath=_search_path(_tag_strings(dynamic, "rpath")),
        runpath=_search_path(_tag_strings(dynamic, "runpath")),
        version_needs=_version_needs(sections),
        version_defs=_version_defs(sections),
    )


def _machine(elf: ELFFile) -> str:
    name = str(elf["e_machine"])
    if name == "EM_PPC64":
        return "ppc64le" if elf.little_endian else "ppc64"
    return _MACHINES.get(name, name.removeprefix("EM_").lower())


def _interpreter(elf: ELFFile, sections: list[Section]) -> str | None:
    """PT_INTERP's path, read from ``.interp`` when there are section headers.

    Building a segment object for PT_DYNAMIC walks every section header again, so the
    program headers are only walked for a file that has no section headers.
    """
    if sections:
        interp = next((s for s in sections if s.name == ".interp"), None)
        return None if interp is None else interp.data().rstrip(b"\0").decode()
    for segment in elf.iter_segments("PT_INTERP"):
        if isinstance(segment, InterpSegment):
            return segment.get_interp_name()
    return None


def _dynamic_tags(elf: ELFFile, sections: list[Section]) -> list[tuple[str, str]]:
    """``(name, value)`` of the string-valued dynamic tags, in order.

    The dynamic section is found by its section header; a file whose section headers were
    stripped (sstrip) is read through its PT_DYNAMIC segment and DT_STRTAB instead.
    """
    table: Dynamic | None = next((s for s in sections if isinstance(s, Dynamic)), None)
    if table is None and not sections:
        segments = elf.iter_segments("PT_DYNAMIC")
        table = next((s for s in segments if isinstance(s, DynamicSegment)), None)
    if table is None:
        return []
    found: list[tuple[str, str]] = []
    for tag in table.iter_tags():
        kind = str(tag["d_tag"])
        if kind in {"DT_NEEDED", "DT_SONAME", "DT_RPATH", "DT_RUNPATH"}:
            name = kind.removeprefix("DT_").lower()
            found.append((name, str(getattr(tag, name))))
    return found


def _tag_strings(tags: list[tuple[str, str]], name: str) -> list[str]:
    return [value for kind, value in tags if kind == name]


def _search_path(values: list[str]) -> tuple[str, ...]:
    return tuple(part for value in values for part in value.split(":") if part)


def _version_needs(sections: list[Section]) -> tuple[VersionNeed, ...]:
    wanted: dict[str, set[str]] = {}
    for section in sections:
        if not isinstance(section, GNUVerNeedSection):
            continue
        for need, auxiliaries in section.iter_versions():
            names = wanted.setdefault(str(need.name), set())
            for aux in auxiliaries:
                if not aux["vna_flags"] & VER_FLAGS.VER_FLG_WEAK:
                    names.add(aux.name)
    return tuple(
        VersionNeed(library=library, versions=tuple(sorted(names)))
        for library, names in sorted(wanted.items())
    )


def _version_defs(sections: list[Section]) -> tuple[str, ...]:
    names: set[str] = set()
    for section in sections:
        if not isinstance(section, GNUVerDefSection):
            continue
        for definition, auxiliaries in section.iter_versions():
            if definition["vd_flags"] & VER_FLAGS.VER_FLG_BASE:
                continue
            first = next(iter(auxiliaries), None)
            if first is not None:
                names.add(first.name)
    return tuple(sorted(names))


def render_elf_info(info: ElfInfo) -> dict[str, object]:
    """``info`` as JSON-ready data (the scan caches' records)."""
    return {
        "machine": info.machine,
        "class": info.elf_class,
        "shared": info.shared,
        "interpreter": info.interpreter,
        "soname": info.soname,
        "needed": list(info.needed),
        "rpath": list(info.rpath),
        "runpath": list(info.runpath),
        "version_needs": {need.library: list(need.versions) for need in info.version_needs},
        "version_defs": list(info.version_defs),
    }


def parse_elf_info(data: object) -> ElfInfo:
    """An ``ElfInfo`` from ``render_elf_info``'s data; ValueError when it has another shape."""
    if not isinstance(data, Mapping):
        raise ValueError("an ELF record is not an object")
    try:
        needs = data["version_needs"]
        if not isinstance(needs, Mapping):
            raise ValueError("version_needs is not an object")
        return ElfInfo(
            machine=_text(data["machine"]),
            elf_class=int(data["class"]),
            shared=bool(data["shared"]),
            interpreter=_optional_text(data["interpreter"]),
            soname=_optional_text(data["soname"]),
            needed=_texts(data["needed"]),
            rpath=_texts(data["rpath"]),
            runpath=_texts(data["runpath"]),
            version_needs=tuple(
                VersionNeed(library=_text(library), versions=_texts(versions))
                for library, versions in sorted(needs.items())
            ),
            version_defs=_texts(data["version_defs"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"an ELF record lacks or mistypes a field ({exc})") from exc


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, found {value!r}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _texts(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, found {value!r}")
    return tuple(_text(item) for item in value)

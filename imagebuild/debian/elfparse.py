"""pyelftools' side of ``elf``: the headers and sections of one ELF file made into ``ElfInfo``.

A module of its own so that ``elf`` (its records and their JSON) is imported without
pyelftools; ``elf.read_elf`` imports this one when it meets a file that starts like ELF.
"""

from __future__ import annotations

from typing import IO

from elftools.common.exceptions import ELFError
from elftools.elf.constants import VER_FLAGS
from elftools.elf.dynamic import Dynamic, DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection
from elftools.elf.sections import Section
from elftools.elf.segments import InterpSegment

from imagebuild.debian.model import ElfInfo, VersionNeed

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

_PIECE = 1 << 20
"""How much of the dynamic string table is read at a time."""

# What a malformed file makes pyelftools raise: its own errors, construct's (wrapped in
# ELFParseError), and the plain ones its readers hit on short or nonsense data.
_PARSE_ERRORS = (ELFError, ValueError, IndexError, KeyError, AssertionError, EOFError, TypeError)


def parse_elf(stream: IO[bytes], *, init: bytes | None = None) -> ElfInfo | None:
    """The ELF facts of a seekable ``stream`` at its start; None when it does not parse.

    ``init``: the init function that makes the file a Python extension module, when that
    is asked (``ElfInfo.python_module``).
    """
    try:
        return _parse(ELFFile(stream), init)
    except _PARSE_ERRORS:
        return None


def _parse(elf: ELFFile, init: bytes | None) -> ElfInfo:
    # One walk over the section headers (pyelftools re-reads them on every iter_sections).
    sections = list(elf.iter_sections())
    table = _dynamic_table(elf, sections)
    dynamic = _dynamic_tags(table)
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
        python_module=None if init is None else _names(elf, table, init),
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


def _dynamic_table(elf: ELFFile, sections: list[Section]) -> Dynamic | None:
    """The dynamic table, found by its section header.

    A file whose section headers were stripped (sstrip) is read through its PT_DYNAMIC
    segment and DT_STRTAB instead.
    """
    table: Dynamic | None = next((s for s in sections if isinstance(s, Dynamic)), None)
    if table is None and not sections:
        segments = elf.iter_segments("PT_DYNAMIC")
        table = next((s for s in segments if isinstance(s, DynamicSegment)), None)
    return table


def _dynamic_tags(table: Dynamic | None) -> list[tuple[str, str]]:
    """``(name, value)`` of the string-valued dynamic tags, in order."""
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


def _names(elf: ELFFile, table: Dynamic | None, symbol: bytes) -> bool:
    """Whether the dynamic string table holds ``symbol``.

    The names the file exports or imports are there, and no extension module imports its
    own init function.

    The table (DT_STRTAB, DT_STRSZ) is searched a piece at a time: a large C++ library's
    runs to tens of MB.
    """
    if table is None:
        return False
    address = size = None
    for tag in table.iter_tags():
        if tag["d_tag"] == "DT_STRTAB":
            address = int(tag["d_val"])
        elif tag["d_tag"] == "DT_STRSZ":
            size = int(tag["d_val"])
    offset = next(elf.address_offsets(address), None) if address is not None else None
    if offset is None or not size:
        return False
    wanted = b"\0" + symbol + b"\0"
    stream = elf.stream
    stream.seek(offset)
    carried = b""
    while size > 0:
        piece = stream.read(min(size, _PIECE))
        if not piece:
            return False
        size -= len(piece)
        window = carried + piece
        if wanted in window:
            return True
        carried = window[-(len(wanted) - 1) :]
    return False

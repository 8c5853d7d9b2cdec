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

import io
import shutil
import tempfile
from collections.abc import Mapping
from typing import IO

from imagebuild.debian.model import ElfInfo, VersionNeed

# pyelftools is imported by ``elfparse`` when a file is read: a warm build reads none, and
# importing it costs a build about 40 ms.

ELF_MAGIC = b"\x7fELF"
SPOOL_MEMORY = 32 << 20
"""Bytes of one member kept in memory while it is read; a larger one spills to a temp file."""
_PIECE = 1 << 20
"""How much of a stream is read at a time while it is copied."""
SMALLEST_ELF = 52
"""The size of an ELF32 header: anything shorter cannot be an ELF file."""


def read_elf(stream: IO[bytes], *, name: str | None = None) -> ElfInfo | None:
    """The ELF facts of a seekable ``stream``; None when it is not (well-formed) ELF.

    ``name``: the file's name, when whether Python could import it is wanted
    (``ElfInfo.python_module``).
    """
    stream.seek(0)
    if stream.read(4) != ELF_MAGIC:
        return None
    stream.seek(0)
    from imagebuild.debian.elfparse import parse_elf

    return parse_elf(stream, init=module_init(name) if name is not None else None)


def module_init(name: str) -> bytes | None:
    """The init function an extension module of file name ``name`` exports, or None.

    None when Python would not import a file of that name. PEP 489: ``PyInit_<module>``,
    or ``PyInitU_`` and the name in punycode, ``-`` made ``_``, for a non-ASCII one.
    """
    module, dot, _ = name.partition(".")
    if not dot or not name.endswith(".so") or not module.isidentifier():
        return None
    if module.isascii():
        return b"PyInit_" + module.encode()
    return b"PyInitU_" + module.encode("punycode").replace(b"-", b"_")


def read_elf_stream(stream: IO[bytes], *, name: str | None = None) -> ElfInfo | None:
    """``read_elf`` for a forward-only stream: a zip or tar member, read once from its start.

    Only a stream that starts with the ELF magic is copied on into a spool; any other is
    left after its first four bytes.
    """
    head = stream.read(4)
    if head != ELF_MAGIC:
        return None
    # pyelftools reads in many small pieces: from bytes in memory, each is a C call (through
    # a SpooledTemporaryFile's Python wrapper, a library's index spent a third of its time).
    # Copied into one buffer piece by piece: read whole, then joined to its first bytes, a
    # large library was held twice (a scientific stack's cold build peaked 25 MiB higher).
    # Closed once parsed: pyelftools' objects keep the stream in reference cycles, which
    # only the garbage collector breaks, and the file's bytes would wait with them.
    with io.BytesIO() as data:
        data.write(head)
        while (room := SPOOL_MEMORY - data.tell()) > 0:
            piece = stream.read(min(room, _PIECE))
            if not piece:
                return read_elf(data, name=name)
            data.write(piece)
        with tempfile.TemporaryFile() as spool:
            with data.getbuffer() as view:
                spool.write(view)
            data.close()
            shutil.copyfileobj(stream, spool, _PIECE)
            return read_elf(spool, name=name)


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
        "python_module": info.python_module,
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
            python_module=_optional_flag(data["python_module"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"an ELF record lacks or mistypes a field ({exc})") from exc


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, found {value!r}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _optional_flag(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"expected true, false or null, found {value!r}")
    return value


def _texts(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, found {value!r}")
    return tuple(_text(item) for item in value)

"""ELF facts read from real files: extension modules of PyPI wheels, libraries of Debian .debs."""

from __future__ import annotations

import gc
import hashlib
import io
import struct
import threading
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import debian.debfile
import httpx
import markupsafe._speedups
import pytest

from imagebuild.debian import elf, elfparse
from imagebuild.debian.archive import fetch_deb
from imagebuild.debian.elf import parse_elf_info, read_elf, read_elf_stream, render_elf_info
from imagebuild.debian.model import ElfInfo, IndexedPackage, LockedDeb
from imagebuild.net.http import http_client

# Small real wheels, pinned: greenlet's extension is C++ (libstdc++, libgcc_s), MarkupSafe's
# is C (libc only), pyzmq bundles libzmq and libsodium in pyzmq.libs (auditwheel).
WHEELS = {
    "greenlet-x86_64": "greenlet-3.1.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "greenlet-aarch64": (
        "greenlet-3.1.1-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"
    ),
    "markupsafe-x86_64": (
        "MarkupSafe-3.0.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    ),
    "pyzmq-x86_64": "pyzmq-26.2.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "numpy-x86_64": "numpy-2.1.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    # PyTorch's CUDA stack's cuFile: two libraries nothing in it links, one an RDMA plugin.
    "cufile-x86_64": "nvidia_cufile-1.17.1.22-py3-none-manylinux_2_27_x86_64.whl",
    # numba imports its TBB and OpenMP threading layers under a guard, its _typeconv not.
    "numba-x86_64": "numba-0.68.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
}
GREENLET_SO = "greenlet/_greenlet.cpython-311-x86_64-linux-gnu.so"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


@pytest.fixture(scope="session")
def pypi_wheel(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``get(key)``: a wheel of ``WHEELS`` from PyPI, once per session, sha256 checked."""
    folder = tmp_path_factory.mktemp("pypi-wheels")
    lock = threading.Lock()

    def get(key: str) -> Path:
        filename = WHEELS[key]
        dest = folder / filename
        with lock:
            if dest.exists():
                return dest
            project = filename.split("-")[0].lower()
            with http_client() as http:
                page = http.get(
                    f"https://pypi.org/simple/{project}/", headers={"Accept": SIMPLE_JSON}
                )
                page.raise_for_status()
                entry = next(f for f in page.json()["files"] if f["filename"] == filename)
                data = http.get(entry["url"], follow_redirects=True).content
            assert hashlib.sha256(data).hexdigest() == entry["hashes"]["sha256"]
            dest.write_bytes(data)
            return dest

    return get


@pytest.fixture(scope="session")
def debian_deb(
    debian_http: httpx.Client,
    debian_cache: Path,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
) -> Callable[[str, str, str], Path]:
    """``get(suite, arch, package)``: the package's .deb from deb.debian.org, sha256 checked."""

    def get(suite: str, arch: str, package: str) -> Path:
        found = next(p for p in debian_packages(suite, arch) if p.name == package)
        locked = LockedDeb(
            name=found.name,
            version=found.version,
            architecture=found.architecture,
            url=found.url,
            sha256=found.sha256,
            size=found.size,
        )
        return fetch_deb(debian_http, locked, cache=debian_cache)

    return get


@pytest.fixture(scope="session")
def debian_lib(
    debian_deb: Callable[[str, str, str], Path],
) -> Callable[[str, str, str, str], bytes]:
    """``get(suite, arch, package, name)``: the bytes of file ``name`` (a library) in the .deb."""

    def get(suite: str, arch: str, package: str, name: str) -> bytes:
        data = debian.debfile.DebFile(str(debian_deb(suite, arch, package))).data.tgz()
        for member in data:
            if member.name.rpartition("/")[2] == name:
                if member.issym():
                    return get(suite, arch, package, member.linkname.rpartition("/")[2])
                stream = data.extractfile(member)
                assert stream is not None
                return stream.read()
        raise AssertionError(f"{package} has no file {name}")

    return get


def wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def needs_of(info: ElfInfo, library: str) -> tuple[str, ...]:
    return next((n.versions for n in info.version_needs if n.library == library), ())


@pytest.mark.pypi
def test_cxx_extension_needs_libstdcxx_and_its_versions(
    pypi_wheel: Callable[[str], Path],
) -> None:
    with (
        zipfile.ZipFile(pypi_wheel("greenlet-x86_64")) as archive,
        archive.open(GREENLET_SO) as stream,
    ):
        info = read_elf_stream(stream)
    assert info is not None
    assert (info.machine, info.elf_class, info.shared) == ("x86_64", 64, True)
    assert info.interpreter is None and info.soname is None
    assert info.needed[0] == "libstdc++.so.6"
    assert {"libgcc_s.so.1", "libc.so.6", "libm.so.6"} <= set(info.needed)
    assert {"GLIBCXX_3.4", "CXXABI_1.3"} <= set(needs_of(info, "libstdc++.so.6"))
    assert "GLIBC_2.14" in needs_of(info, "libc.so.6")
    assert needs_of(info, "libgcc_s.so.1") == ("GCC_3.0",)
    assert info.version_defs == ()


@pytest.mark.pypi
def test_c_extension_needs_only_libc(pypi_wheel: Callable[[str], Path]) -> None:
    data = wheel_member(
        pypi_wheel("markupsafe-x86_64"), "markupsafe/_speedups.cpython-311-x86_64-linux-gnu.so"
    )
    info = read_elf(io.BytesIO(data))
    assert info is not None
    assert set(info.needed) <= {"libc.so.6", "libpthread.so.0"} and "libc.so.6" in info.needed
    assert all(v.startswith("GLIBC_2.") for v in needs_of(info, "libc.so.6"))


@pytest.mark.pypi
def test_aarch64_extension_is_read_on_any_host(pypi_wheel: Callable[[str], Path]) -> None:
    data = wheel_member(
        pypi_wheel("greenlet-aarch64"), "greenlet/_greenlet.cpython-311-aarch64-linux-gnu.so"
    )
    info = read_elf(io.BytesIO(data))
    assert info is not None
    assert info.machine == "aarch64"
    assert "ld-linux-aarch64.so.1" in info.needed
    assert "GLIBC_2.17" in needs_of(info, "libc.so.6")


@pytest.mark.pypi
def test_bundled_library_has_soname_and_runpath(pypi_wheel: Callable[[str], Path]) -> None:
    with zipfile.ZipFile(pypi_wheel("pyzmq-x86_64")) as archive:
        member = next(n for n in archive.namelist() if n.startswith("pyzmq.libs/libzmq"))
        info = read_elf(io.BytesIO(archive.read(member)))
    assert info is not None and info.soname == member.rpartition("/")[2]
    assert "libstdc++.so.6" in info.needed
    assert info.rpath + info.runpath == ("$ORIGIN",)


def test_large_member_spills_to_disk_and_reads_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = Path(markupsafe._speedups.__file__).read_bytes()
    in_memory = read_elf_stream(io.BytesIO(data))
    monkeypatch.setattr(elf, "SPOOL_MEMORY", 4096)
    spilled = read_elf_stream(io.BytesIO(data))
    assert in_memory is not None and spilled == in_memory
    assert "libc.so.6" in in_memory.needed


def test_a_read_file_is_let_go_at_once() -> None:
    """Its bytes are not left to the garbage collector (pyelftools holds the stream in cycles).

    Libraries are up to tens of MB each: left so, imgbuild's process peaked at 203 MiB in a
    cold build of the data platform, 146 MiB without.
    """
    library = Path(markupsafe._speedups.__file__).read_bytes()
    read_elf_stream(io.BytesIO(library))  # pyelftools imported first: not what is measured
    data = library + bytes(8 << 20)
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        info = read_elf_stream(io.BytesIO(data))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert info is not None and "libc.so.6" in info.needed
    assert held < 1 << 20


def test_a_large_file_is_held_once_while_read() -> None:
    """Read in pieces into one buffer: read whole, then joined to its magic, it was held twice."""
    data = Path(markupsafe._speedups.__file__).read_bytes() + bytes(16 << 20)
    stream = io.BytesIO(data)
    tracemalloc.start()
    try:
        info = read_elf_stream(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info is not None and "libc.so.6" in info.needed
    assert peak < 1.5 * len(data)


def test_an_extension_module_is_told_by_the_init_function_its_name_makes() -> None:
    data = Path(markupsafe._speedups.__file__).read_bytes()  # exports PyInit__speedups
    for name in ("_speedups.cpython-311-x86_64-linux-gnu.so", "_speedups.abi3.so", "_speedups.so"):
        info = read_elf(io.BytesIO(data), name=name)
        assert info is not None and info.python_module is True, name
    # Another module's name: Python would look for PyInit_other, which it lacks.
    other = read_elf(io.BytesIO(data), name="other.cpython-311-x86_64-linux-gnu.so")
    assert other is not None and other.python_module is False
    # Names Python never imports are not asked about; nor is a file read without a name.
    for name in ("lib_speedups.so.1", "_speedups.so.1", "7speedups.so", "_speedups"):
        info = read_elf(io.BytesIO(data), name=name)
        assert info is not None and info.python_module is None, name
    assert read_elf_stream(io.BytesIO(data), name="_speedups.so") == read_elf(
        io.BytesIO(data), name="_speedups.so"
    )
    assert elf.module_init("_speedups.so") == b"PyInit__speedups"
    assert elf.module_init("café.so") == b"PyInitU_caf_dma"  # PEP 489's punycode form


def test_the_init_function_is_found_in_a_string_table_read_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = Path(markupsafe._speedups.__file__).read_bytes()
    monkeypatch.setattr(elfparse, "_PIECE", 7)  # names cut across pieces
    info = read_elf(io.BytesIO(data), name="_speedups.abi3.so")
    assert info is not None and info.python_module is True


def test_not_elf_is_none() -> None:
    assert read_elf(io.BytesIO(b"#!/bin/sh\necho hi\n")) is None
    assert read_elf(io.BytesIO(b"")) is None
    assert read_elf_stream(io.BytesIO(b"PK\x03\x04" + b"\0" * 100)) is None


def test_broken_elf_is_treated_as_not_elf() -> None:
    data = Path(markupsafe._speedups.__file__).read_bytes()
    # A header cut short, a file cut before its section headers, and garbage after the magic:
    # none of them raises, all are None (the loader could not load them either).
    for cut in (4, 16, 40, 63, 64, 1000, len(data) // 2):
        assert read_elf(io.BytesIO(data[:cut])) is None, cut
    assert read_elf(io.BytesIO(b"\x7fELF" + bytes(range(256)) * 4)) is None
    # A section header table pointing past the end of the file.
    broken = bytearray(data)
    struct.pack_into("<Q", broken, 0x28, len(data) + 4096)
    assert read_elf(io.BytesIO(bytes(broken))) is None


def test_stripped_section_headers_fall_back_to_the_dynamic_segment() -> None:
    data = bytearray(Path(markupsafe._speedups.__file__).read_bytes())
    full = read_elf(io.BytesIO(bytes(data)))
    # sstrip's result: no section header table (e_shoff, e_shnum, e_shstrndx zeroed).
    struct.pack_into("<Q", data, 0x28, 0)
    struct.pack_into("<HH", data, 0x3C, 0, 0)
    stripped = read_elf(io.BytesIO(bytes(data)))
    assert full is not None and stripped is not None
    assert stripped.needed == full.needed and stripped.needed
    assert stripped.machine == full.machine
    assert stripped.version_needs == ()  # found through section headers only
    # The init function is in the string table the dynamic segment points to.
    named = read_elf(io.BytesIO(bytes(data)), name="_speedups.abi3.so")
    assert named is not None and named.python_module is True


def test_render_and_parse_round_trip() -> None:
    info = read_elf(io.BytesIO(Path(markupsafe._speedups.__file__).read_bytes()))
    assert info is not None
    assert parse_elf_info(render_elf_info(info)) == info
    with pytest.raises(ValueError):
        parse_elf_info({"machine": "x86_64"})
    with pytest.raises(ValueError):
        parse_elf_info({**render_elf_info(info), "needed": "libc.so.6"})
    module = read_elf(
        io.BytesIO(Path(markupsafe._speedups.__file__).read_bytes()), name="_speedups.so"
    )
    assert module is not None and parse_elf_info(render_elf_info(module)) == module
    with pytest.raises(ValueError):
        parse_elf_info({**render_elf_info(info), "python_module": "yes"})


@pytest.mark.debian
def test_glibc_defines_its_versions(debian_lib: Callable[[str, str, str, str], bytes]) -> None:
    libc = read_elf(io.BytesIO(debian_lib("bookworm", "amd64", "libc6", "libc.so.6")))
    assert libc is not None
    assert libc.soname == "libc.so.6"
    assert {"GLIBC_2.2.5", "GLIBC_2.34", "GLIBC_2.36"} <= set(libc.version_defs)
    assert "GLIBC_2.38" not in libc.version_defs
    assert libc.interpreter == "/lib64/ld-linux-x86-64.so.2"  # libc.so.6 runs, too
    cxx = read_elf(io.BytesIO(debian_lib("bookworm", "arm64", "libstdc++6", "libstdc++.so.6")))
    assert cxx is not None and cxx.machine == "aarch64"
    assert {"GLIBCXX_3.4.30", "CXXABI_1.3.13"} <= set(cxx.version_defs)

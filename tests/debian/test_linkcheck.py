"""The link check on real wheels against bases made of real Debian libraries (and layer shapes)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import lzma
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import debian.debfile
import markupsafe._speedups
import pytest
import zstandard

from imagebuild.debian.assemble import Account, Group, RootfsSpec, assemble_layer
from imagebuild.debian.elf import read_elf
from imagebuild.debian.libdirs import library_files
from imagebuild.debian.linkcheck import (
    LibraryIndex,
    Missing,
    Provider,
    WheelElf,
    check_links,
    index_base,
    importers,
    index_wheels,
    scan_wheel,
)
from imagebuild.debian.linklines import missing_line, on_demand_line, refusal_line
from imagebuild.debian.model import ElfInfo, IndexedPackage, LockedDeb, VersionNeed
from imagebuild.digest import Digest, digest_file
from imagebuild.image.store import BlobStore
from imagebuild.install.imports import guarded_modules
from tests.debian.test_elf import GREENLET_SO, debian_deb, debian_lib, pypi_wheel

__all__ = ["debian_deb", "debian_lib", "pypi_wheel"]  # fixtures shared with test_elf

HOST_SO = Path(markupsafe._speedups.__file__).read_bytes()  # a real ELF file (a dependency's)
_HOST = read_elf(io.BytesIO(HOST_SO))
assert _HOST is not None
HOST_MACHINE = _HOST.machine
TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}

Entry = tuple[str, bytes | str | None]  # (path, file bytes | link target | None for a dir)


def write_layer(path: Path, entries: Sequence[Entry], *, compression: str = "gzip") -> Path:
    """A layer tar of ``entries``: bytes make a file, a str a symlink, None a directory."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
    data = raw.getvalue()
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    elif compression == "xz":
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


def layers_of(paths: Sequence[Path]) -> list[tuple[Digest, Path]]:
    return [(digest_file(p), p) for p in paths]


def merged_usr(tmp: Path) -> Path:
    """Layer 0 of a merged-/usr Debian base: ``lib -> usr/lib`` and ``lib64 -> usr/lib64``."""
    return write_layer(
        tmp / "usrmerge.tar.gz",
        [("usr", None), ("usr/lib", None), ("usr/lib64", None), ("lib", "usr/lib"),
         ("lib64", "usr/lib64")],
    )  # fmt: skip


def deb_layer(dest: Path, debs: Sequence[tuple[str, Path]]) -> Path:
    """One layer holding the data of ``debs`` as dpkg unpacks them onto a merged-/usr base,
    with the dpkg file lists (``var/lib/dpkg/info/<package>.list``) that say who owns what."""
    with tarfile.open(dest, "w") as out:
        for package, deb in debs:
            data = debian.debfile.DebFile(str(deb)).data.tgz()
            listed: list[str] = []
            for member in data.getmembers():
                name = str(member.name).removeprefix("./")
                if not name or (member.isdir() and name in {"lib", "lib64"}):
                    continue  # dpkg keeps the merged-/usr links in place of these
                copied = tarfile.TarInfo(name)
                copied.type, copied.mode, copied.size = member.type, member.mode, member.size
                copied.linkname = str(member.linkname)
                if member.islnk():
                    copied.linkname = copied.linkname.removeprefix("./")
                out.addfile(copied, data.extractfile(member) if member.isfile() else None)
                listed.append("/" + name)
            text = "\n".join(listed).encode()
            info = tarfile.TarInfo(f"var/lib/dpkg/info/{package}.list")
            info.size = len(text)
            out.addfile(info, io.BytesIO(text))
    return dest


@pytest.fixture(scope="session")
def debian_base(
    tmp_path_factory: pytest.TempPathFactory, debian_deb: Callable[[str, str, str], Path]
) -> Callable[[str, str, Sequence[str]], list[tuple[Digest, Path]]]:
    """``get(suite, arch, packages)``: the layers of a base made of real .debs, made once."""
    folder = tmp_path_factory.mktemp("debian-bases")
    skeleton = merged_usr(folder)
    lock = threading.Lock()

    def get(suite: str, arch: str, packages: Sequence[str]) -> list[tuple[Digest, Path]]:
        dest = folder / f"{suite}-{arch}-{'-'.join(packages)}.tar"
        with lock:
            if not dest.exists():
                debs = [(p, debian_deb(suite, arch, p)) for p in packages]
                deb_layer(dest, debs)
        return layers_of([skeleton, dest])

    return get


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def scanned(wheel: Path, cache: Path) -> tuple[WheelElf, ...]:
    return scan_wheel(wheel, cache=cache)


def index_of(layers: Sequence[tuple[Digest, Path]], *, cache: Path) -> LibraryIndex:
    """``index_base`` of layers given as (digest, blob path) pairs."""
    return index_base([digest for digest, _ in layers], blobs=dict(layers).__getitem__, cache=cache)


# --- Real wheels against real Debian libraries ---


@pytest.mark.pypi
@pytest.mark.debian
def test_cxx_extension_is_refused_without_libstdcxx_and_passes_with_it(
    tmp_path: Path,
    pypi_wheel: Callable[[str], Path],
    debian_base: Callable[[str, str, Sequence[str]], list[tuple[Digest, Path]]],
) -> None:
    greenlet = [("greenlet 3.1.1", scanned(pypi_wheel("greenlet-x86_64"), tmp_path / "scan"))]
    bare = index_of(debian_base("bookworm", "amd64", ["libc6"]), cache=tmp_path / "idx")
    missing = check_links(greenlet, bare, arch="amd64")
    assert {(m.member, m.library) for m in missing} == {
        (GREENLET_SO, "libstdc++.so.6"),
        (GREENLET_SO, "libgcc_s.so.1"),
        ("greenlet/tests/_test_extension_cpp.cpython-311-x86_64-linux-gnu.so", "libstdc++.so.6"),
        ("greenlet/tests/_test_extension_cpp.cpython-311-x86_64-linux-gnu.so", "libgcc_s.so.1"),
    }
    first = next(m for m in missing if m.member == GREENLET_SO and m.library == "libstdc++.so.6")
    assert missing_line(first, "libstdc++6") == (
        "greenlet 3.1.1: greenlet/_greenlet.cpython-311-x86_64-linux-gnu.so needs "
        "libstdc++.so.6, which the image does not have; add it with [tool.imgbuild] "
        'system-packages = ["libstdc++6"]'
    )
    packages = ["libc6", "libgcc-s1", "libstdc++6"]
    full = index_of(debian_base("bookworm", "amd64", packages), cache=tmp_path / "idx")
    assert check_links(greenlet, full, arch="amd64") == ()
    libstdcxx = full.find("libstdc++.so.6", "x86_64")
    assert [(p.path, p.package) for p in libstdcxx] == [
        ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "libstdc++6")
    ]
    assert "GLIBCXX_3.4.30" in libstdcxx[0].versions


@pytest.mark.debian
def test_a_glibc_version_newer_than_the_base_is_caught(
    tmp_path: Path,
    debian_lib: Callable[[str, str, str, str], bytes],
    debian_base: Callable[[str, str, Sequence[str]], list[tuple[Digest, Path]]],
) -> None:
    # trixie's libuuid is built against glibc 2.41 and needs GLIBC_2.38; bookworm has 2.36.
    # Shipped in a wheel, as a manylinux_2_38 wheel's library would be.
    newer = debian_lib("trixie", "amd64", "libuuid1", "libuuid.so.1")
    older = debian_lib("bookworm", "amd64", "libuuid1", "libuuid.so.1")
    base = index_of(debian_base("bookworm", "amd64", ["libc6"]), cache=tmp_path / "idx")
    new_wheel = make_wheel(tmp_path / "new.whl", {"uuidx/libuuid.so.1": newer})
    old_wheel = make_wheel(tmp_path / "old.whl", {"uuidx/libuuid.so.1": older})
    missing = check_links([("uuidx 2.0", scanned(new_wheel, tmp_path / "s"))], base, arch="amd64")
    assert [(m.library, m.version, m.provided) for m in missing] == [
        ("libc.so.6", "GLIBC_2.38", "GLIBC_2.36")
    ]
    assert missing[0].provider is not None and missing[0].provider.package == "libc6"
    line = missing_line(missing[0], "libc6")
    assert line.startswith("uuidx 2.0: uuidx/libuuid.so.1 needs libc.so.6 with symbol version ")
    assert "GLIBC_2.38, but the image's libc.so.6 (libc6) has only up to GLIBC_2.36" in line
    assert (
        check_links([("uuidx 1.0", scanned(old_wheel, tmp_path / "s"))], base, arch="amd64") == ()
    )


@pytest.mark.pypi
@pytest.mark.debian
def test_libraries_wheels_bundle_count_as_provided(
    tmp_path: Path,
    pypi_wheel: Callable[[str], Path],
    debian_base: Callable[[str, str, Sequence[str]], list[tuple[Digest, Path]]],
) -> None:
    wheels = [("pyzmq 26.2.0", scanned(pypi_wheel("pyzmq-x86_64"), tmp_path / "scan"))]
    packages = ["libc6", "libgcc-s1", "libstdc++6"]
    base = index_of(debian_base("bookworm", "amd64", packages), cache=tmp_path / "idx")
    alone = check_links(wheels, base, arch="amd64")
    assert sorted(m.library.split("-")[0] for m in alone) == ["libsodium", "libzmq"]
    assert check_links(wheels, base.merged(index_wheels(wheels)), arch="amd64") == ()


@pytest.mark.pypi
@pytest.mark.debian
def test_an_aarch64_wheel_is_checked_against_arm64_libraries(
    tmp_path: Path,
    pypi_wheel: Callable[[str], Path],
    debian_base: Callable[[str, str, Sequence[str]], list[tuple[Digest, Path]]],
) -> None:
    wheels = [("greenlet 3.1.1", scanned(pypi_wheel("greenlet-aarch64"), tmp_path / "scan"))]
    bare = index_of(debian_base("bookworm", "arm64", ["libc6"]), cache=tmp_path / "idx")
    assert {m.library for m in check_links(wheels, bare, arch="arm64")} == {
        "libstdc++.so.6",
        "libgcc_s.so.1",
    }
    packages = ["libc6", "libgcc-s1", "libstdc++6"]
    full = index_of(debian_base("bookworm", "arm64", packages), cache=tmp_path / "idx")
    assert check_links(wheels, full, arch="arm64") == ()
    assert full.find("libc.so.6", "aarch64")[0].path == "/usr/lib/aarch64-linux-gnu/libc.so.6"
    # amd64 libraries do not serve an arm64 image, and amd64 files are not checked for one.
    amd64 = index_of(debian_base("bookworm", "amd64", packages), cache=tmp_path / "idx")
    assert {m.library for m in check_links(wheels, amd64, arch="arm64")} >= {"libc.so.6"}
    assert check_links(wheels, amd64, arch="amd64") == ()


RDMA = "nvidia/cu13/lib/libcufile_rdma.so.1"


@pytest.mark.pypi
@pytest.mark.debian
def test_what_only_a_plugin_needs_refuses_nothing_until_a_module_links_it(
    tmp_path: Path,
    pypi_wheel: Callable[[str], Path],
    debian_base: Callable[[str, str, Sequence[str]], list[tuple[Digest, Path]]],
) -> None:
    # cuFile's RDMA transport needs InfiniBand's libraries, which an image rarely has;
    # cuFile opens it only when GPUDirect Storage goes over RDMA.
    cufile = ("nvidia-cufile 1.17.1.22", scanned(pypi_wheel("cufile-x86_64"), tmp_path / "s"))
    packages = ["libc6", "libgcc-s1", "libstdc++6"]
    base = index_of(debian_base("bookworm", "amd64", packages), cache=tmp_path / "idx")
    alone = check_links([cufile], base.merged(index_wheels([cufile])), arch="amd64")
    rdma_needs = {"libibverbs.so.1", "libmlx5.so.1", "librdmacm.so.1"}
    assert {(m.member, m.library) for m in alone} == {(RDMA, lib) for lib in rdma_needs}
    assert all(m.on_demand for m in alone)
    # An extension module that links the plugin makes its needs the image's.
    extension = WheelElf(
        path="gds/_rdma.cpython-311-x86_64-linux-gnu.so",
        info=module(needed=["libcufile_rdma.so.1", "libc.so.6"]),
    )
    wheels = [cufile, ("gds 1.0", (extension,))]
    linked = check_links(wheels, base.merged(index_wheels(wheels)), arch="amd64")
    assert {(m.library, m.on_demand) for m in linked} == {(lib, False) for lib in rdma_needs}


@pytest.mark.pypi
@pytest.mark.debian
def test_numpy_on_a_full_base_has_no_false_missing(
    tmp_path: Path,
    pypi_wheel: Callable[[str], Path],
    debian_base: Callable[[str, str, Sequence[str]], list[tuple[Digest, Path]]],
) -> None:
    wheels = [("numpy 2.1.3", scanned(pypi_wheel("numpy-x86_64"), tmp_path / "scan"))]
    provided = index_wheels(wheels)
    packages = ["libc6", "libgcc-s1", "libgomp1", "libstdc++6"]
    base = index_of(debian_base("bookworm", "amd64", packages), cache=tmp_path / "idx")
    # numpy's bundled libgfortran links zlib: a base without zlib1g really lacks it.
    missing = check_links(wheels, base.merged(provided), arch="amd64")
    assert {(m.member.split("-")[0], m.library) for m in missing} == {
        ("numpy.libs/libgfortran", "libz.so.1")
    }
    with_zlib = index_of(
        debian_base("bookworm", "amd64", [*packages, "zlib1g"]), cache=tmp_path / "idx"
    )
    assert check_links(wheels, with_zlib.merged(provided), arch="amd64") == ()


@pytest.mark.debian
def test_a_base_assembled_from_debs_is_indexed_with_its_packages(
    tmp_path: Path,
    debian_deb: Callable[[str, str, str], Path],
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
) -> None:
    # The layer the Debian stage itself assembles (dpkg's view in status.d, no .list files).
    names = ["base-files", "gcc-12-base", "libc6", "libgcc-s1", "libstdc++6", "zlib1g"]
    index_entries = {p.name: p for p in debian_packages("bookworm", "amd64") if p.name in names}
    debs = []
    for name in names:
        found = index_entries[name]
        locked = LockedDeb(
            name=name,
            version=found.version,
            architecture=found.architecture,
            url=found.url,
            sha256=found.sha256,
            size=found.size,
        )
        debs.append((locked, debian_deb("bookworm", "amd64", name)))
    store = BlobStore(tmp_path / "store")
    root = Account(name="root", uid=0, gid=0, home="/root", shell="/sbin/nologin")
    spec = RootfsSpec(arch="amd64", accounts=(root,), groups=(Group(name="root", gid=0),))
    layer = assemble_layer(debs, spec=spec, store=store, mtime=0, created_by="test").layer
    index = index_of([(layer.digest, store.path(layer.digest))], cache=tmp_path / "idx")
    owners = {p.path: p.package for p in index.providers}
    assert owners["/usr/lib/x86_64-linux-gnu/libc.so.6"] == "libc6"
    assert owners["/usr/lib/x86_64-linux-gnu/libstdc++.so.6"] == "libstdc++6"
    assert owners["/usr/lib/x86_64-linux-gnu/libz.so.1"] == "zlib1g"
    assert owners["/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"] == "libgcc-s1"


# --- The scan cache ---


@pytest.mark.pypi
def test_a_warm_scan_reads_the_cache_not_the_wheel(
    tmp_path: Path, pypi_wheel: Callable[[str], Path]
) -> None:
    wheel = tmp_path / "greenlet.whl"
    shutil.copy(pypi_wheel("greenlet-x86_64"), wheel)
    sha256 = digest_file(wheel)
    cold = scan_wheel(wheel, cache=tmp_path / "scan")
    assert GREENLET_SO in {elf.path for elf in cold}
    wheel.unlink()  # nothing left to read: only the cache can answer
    assert scan_wheel(wheel, cache=tmp_path / "scan", sha256=sha256) == cold
    # A record that does not parse is a miss: the wheel is read again and the record fixed.
    record = tmp_path / "scan" / f"{sha256.removeprefix('sha256:')}.json"
    record.write_text('{"format": 2, "members": [{"path": 3}]}')
    shutil.copy(pypi_wheel("greenlet-x86_64"), wheel)
    assert scan_wheel(wheel, cache=tmp_path / "scan", sha256=sha256) == cold
    assert json.loads(record.read_text())["members"][0]["path"] == cold[0].path
    # Nor does an empty one (records are not flushed to disk: what a power cut can leave).
    record.write_bytes(b"")
    assert scan_wheel(wheel, cache=tmp_path / "scan", sha256=sha256) == cold
    assert json.loads(record.read_text())["format"] == 2
    # A record of the format before (no python_module) is a miss too.
    old = json.loads(record.read_text())
    for member in old["members"]:
        del member["elf"]["python_module"]
    record.write_text(json.dumps({**old, "format": 1}))
    assert scan_wheel(wheel, cache=tmp_path / "scan", sha256=sha256) == cold
    assert json.loads(record.read_text())["format"] == 2
    assert {elf.path for elf in cold if elf.info.python_module} == {
        GREENLET_SO,
        "greenlet/tests/_test_extension.cpython-311-x86_64-linux-gnu.so",
        "greenlet/tests/_test_extension_cpp.cpython-311-x86_64-linux-gnu.so",
    }


def test_scan_skips_non_elf_and_broken_members(tmp_path: Path) -> None:
    wheel = make_wheel(
        tmp_path / "w.whl",
        {
            "pkg/__init__.py": b"",
            "pkg/_ext.so": HOST_SO,
            "pkg/tests/data/truncated.so": HOST_SO[:200],
            "pkg/tests/data/notes.txt": b"\x7fELF but not really" * 10,
        },
    )
    assert [elf.path for elf in scan_wheel(wheel, cache=tmp_path / "scan")] == ["pkg/_ext.so"]


def test_a_wheel_that_is_not_a_zip_is_refused_in_one_line(tmp_path: Path) -> None:
    wheel = tmp_path / "bad-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(Exception, match=r"wheel bad-1.0-py3-none-any.whl: cannot read it"):
        scan_wheel(wheel, cache=tmp_path / "scan")


# --- Layer shapes: links, whiteouts, opaque directories, ld.so.conf, musl ---


def provided_names(blobs: Sequence[Path]) -> dict[str, str]:
    return {lib.path: lib.name for lib in library_files(blobs)}


def test_layers_apply_links_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    lower = write_layer(
        tmp_path / "0.tar.gz",
        [
            ("usr/lib/x86_64-linux-gnu", None),
            ("lib", "usr/lib"),
            ("lib/x86_64-linux-gnu/libfoo.so.1", HOST_SO),  # through the merged-/usr link
            ("usr/lib/x86_64-linux-gnu/libfoo.so", "libfoo.so.1"),
            ("usr/lib/x86_64-linux-gnu/libgone.so.2", HOST_SO),
            ("usr/local/lib/libold.so.1", HOST_SO),
            ("etc/ld.so.conf", b"include /etc/ld.so.conf.d/*.conf\n"),
            ("etc/ld.so.conf.d/libc.conf", b"# local\n/usr/local/lib\n"),
            ("opt/app/libhidden.so.1", HOST_SO),
        ],
    )
    upper = write_layer(
        tmp_path / "1.tar.zst",
        [
            ("usr/lib/x86_64-linux-gnu/.wh.libgone.so.2", b""),
            ("usr/local/lib/.wh..wh..opq", b""),
            ("usr/local/lib/libnew.so.1", HOST_SO),
            ("usr/lib/x86_64-linux-gnu/libdangling.so.1", "/nowhere/libx.so.1"),
            ("usr/lib/x86_64-linux-gnu/libloop.so.1", "libloop.so.2"),
            ("usr/lib/x86_64-linux-gnu/libloop.so.2", "libloop.so.1"),
            ("usr/lib/x86_64-linux-gnu/README.txt", b"not a library"),
        ],
        compression="zstd",
    )
    assert provided_names([lower, upper]) == {
        "/usr/lib/x86_64-linux-gnu/libfoo.so": "libfoo.so",
        "/usr/lib/x86_64-linux-gnu/libfoo.so.1": "libfoo.so.1",
        "/usr/local/lib/libnew.so.1": "libnew.so.1",
    }
    assert "/usr/lib/x86_64-linux-gnu/libgone.so.2" in provided_names([lower])
    assert "/usr/local/lib/libold.so.1" in provided_names([lower])


def test_a_directory_only_ld_so_conf_names_is_searched(tmp_path: Path) -> None:
    # "stubs" is no library directory by name: its files are read in a second pass.
    layer = write_layer(
        tmp_path / "0.tar",
        [
            ("etc/ld.so.conf", b"include ld.so.conf.d/*.conf\n"),
            ("etc/ld.so.conf.d/vendor.conf", b"/opt/vendor/stubs\n"),
            ("etc/ld.so.conf.d/ignored.txt", b"/opt/ignored\n"),
            ("opt/vendor/stubs/libstub.so.1", HOST_SO),
            ("opt/ignored/libnot.so.1", HOST_SO),
        ],
        compression="none",
    )
    files = library_files([layer])
    assert [(f.path, f.info.machine) for f in files] == [
        ("/opt/vendor/stubs/libstub.so.1", HOST_MACHINE)
    ]


@pytest.mark.parametrize("compression", ["none", "xz", "zstd"])
def test_a_layer_is_indexed_alike_plain_or_compressed(tmp_path: Path, compression: str) -> None:
    # A plain tar is read by seeking, the others as streams: the same libraries either way,
    # links followed, and a directory only ld.so.conf names read in a second pass.
    entries: list[Entry] = [
        ("usr/lib/x86_64-linux-gnu", None),
        ("lib", "usr/lib"),
        ("lib/x86_64-linux-gnu/libfoo.so.1", HOST_SO),
        ("usr/lib/x86_64-linux-gnu/libfoo.so", "libfoo.so.1"),
        ("usr/lib/x86_64-linux-gnu/libbar.so.3", HOST_SO),
        ("etc/ld.so.conf", b"/opt/vendor/stubs\n"),
        ("opt/vendor/stubs/libstub.so.1", HOST_SO),
        ("usr/lib/x86_64-linux-gnu/notes.txt", b"not a library"),
    ]
    expected = library_files([write_layer(tmp_path / "0.tar.gz", entries)])
    assert {f.name for f in expected} == {
        "libbar.so.3", "libfoo.so", "libfoo.so.1", "libstub.so.1"
    }  # fmt: skip
    assert all(f.info is not None for f in expected)
    layer = write_layer(tmp_path / f"0.{compression}", entries, compression=compression)
    assert library_files([layer]) == expected


def test_musl_search_path(tmp_path: Path) -> None:
    loader = [
        ("lib/ld-musl-x86_64.so.1", HOST_SO),
        ("lib/libc.musl-x86_64.so.1", "ld-musl-x86_64.so.1"),
        ("usr/lib/libz.so.1", HOST_SO),
        ("opt/extra/libextra.so.1", HOST_SO),
    ]
    builtin = write_layer(tmp_path / "a.tar.gz", loader)
    assert set(provided_names([builtin]).values()) == {
        "ld-musl-x86_64.so.1",
        "libc.musl-x86_64.so.1",
        "libz.so.1",
    }
    path_file = write_layer(
        tmp_path / "b.tar.gz", [*loader, ("etc/ld-musl-x86_64.path", b"/lib\n/opt/extra\n")]
    )
    assert set(provided_names([path_file]).values()) == {
        "ld-musl-x86_64.so.1",
        "libc.musl-x86_64.so.1",
        "libextra.so.1",
    }


def test_the_base_index_is_cached_by_layer_digests(tmp_path: Path) -> None:
    layer = write_layer(tmp_path / "0.tar.gz", [("usr/lib/libfoo.so.1", HOST_SO)])
    layers = layers_of([layer])
    first = index_of(layers, cache=tmp_path / "idx")
    assert [p.name for p in first.providers] == ["libfoo.so.1"]
    layer.unlink()
    assert index_of(layers, cache=tmp_path / "idx") == first

    def unread(digest: Digest) -> Path:
        raise AssertionError(f"{digest} was asked for, but the record holds the index")

    digests = [digest for digest, _ in layers]
    assert index_base(digests, blobs=unread, cache=tmp_path / "idx") == first
    other = write_layer(tmp_path / "1.tar.gz", [("usr/lib/libbar.so.2", HOST_SO)])
    assert [p.name for p in index_of(layers_of([other]), cache=tmp_path / "idx").providers] == [
        "libbar.so.2"
    ]


def test_a_layer_that_is_not_a_tar_is_refused_in_one_line(tmp_path: Path) -> None:
    blob = tmp_path / "broken.tar.gz"
    blob.write_bytes(gzip.compress(b"this is no tar archive" * 40)[:50])
    with pytest.raises(Exception, match=r"base layer broken.tar.gz: cannot read it"):
        library_files([blob])


# --- The check itself, on the values it reads ---


def info(machine: str = "x86_64", needed: Sequence[str] = (), **needs: Sequence[str]) -> ElfInfo:
    return ElfInfo(
        machine=machine,
        elf_class=64,
        shared=True,
        needed=tuple(needed),
        version_needs=tuple(
            VersionNeed(library=lib.replace("_", "."), versions=tuple(v))
            for lib, v in sorted(needs.items())
        ),
    )


def module(needed: Sequence[str] = (), **needs: Sequence[str]) -> ElfInfo:
    """``info`` of an extension module (one that names its ``PyInit_`` function)."""
    return dataclasses.replace(info(needed=needed, **needs), python_module=True)


GLIBC = Provider(
    name="libc.so.6",
    path="/usr/lib/x86_64-linux-gnu/libc.so.6",
    machine="x86_64",
    versions=("GLIBC_2.17", "GLIBC_2.2.5", "GLIBC_2.34", "GLIBC_2.36", "GLIBC_PRIVATE"),
    package="libc6",
)


def test_only_the_newest_missing_version_of_each_family_is_reported() -> None:
    elf = module(
        needed=["libc.so.6", "ld-linux-x86-64.so.2"],
        libc_so_6=["GLIBC_2.17", "GLIBC_2.37", "GLIBC_2.38", "GLIBC_2.4"],
    )
    wheels = [("w 1", (WheelElf(path="w/x.so", info=elf),))]
    assert check_links(wheels, LibraryIndex(providers=(GLIBC,)), arch="amd64") == (
        Missing(
            wheel="w 1",
            member="w/x.so",
            library="libc.so.6",
            version="GLIBC_2.38",
            provided="GLIBC_2.36",
            provider=GLIBC,
        ),
    )


def test_versions_are_checked_per_machine_and_unversioned_providers_pass() -> None:
    plain = Provider(name="libplain.so.1", path="/usr/lib/libplain.so.1", machine="x86_64",
                     versions=())  # fmt: skip
    index = LibraryIndex(providers=(GLIBC, plain))
    files = (
        WheelElf(path="a.so", info=info(needed=["libplain.so.1"], libplain_so_1=["PLAIN_9"])),
        WheelElf(path="b.so", info=info(machine="aarch64", needed=["libc.so.6"])),
        WheelElf(path="c.so", info=info(needed=["libc.so.6"], libc_so_6=["GLIBC_2.34"])),
    )
    assert check_links([("w 1", files)], index, arch="amd64") == ()
    assert [m.member for m in check_links([("w 1", files)], index, arch="arm64")] == ["b.so"]


def test_modules_programs_and_what_they_link_are_loaded_the_rest_on_demand() -> None:
    program = dataclasses.replace(
        info(needed=["libgone.so.1"]), interpreter="/lib64/ld-linux-x86-64.so.2"
    )
    files = (
        WheelElf(path="w/_ext.abi3.so", info=module(needed=["libchain.so.1"])),
        WheelElf(path="w.libs/libchain.so.1", info=info(needed=["libdeep-0a1b.so.2"])),
        WheelElf(path="w.libs/libdeep-0a1b.so.2", info=info(needed=["libgone.so.1"])),
        WheelElf(path="w/bin/tool", info=program),
        WheelElf(path="w/lib/libctypes.so", info=info(needed=["libgone.so.1"])),  # ctypes opens it
        WheelElf(path="w/plugins/libplug.so.3", info=info(needed=["libgone.so.1"])),
        WheelElf(path="w/plugins/libplugdep.so.1", info=info(needed=["libgone.so.1"])),
        WheelElf(path="w/plugins/libuser.so.2", info=info(needed=["libplugdep.so.1"])),
    )
    wheels = [("w 1", files)]
    index = LibraryIndex(providers=(GLIBC,)).merged(index_wheels(wheels))
    found = check_links(wheels, index, arch="amd64")
    assert {m.member: m.on_demand for m in found} == {
        "w.libs/libdeep-0a1b.so.2": False,  # through libchain, which the module links
        "w/bin/tool": False,
        "w/lib/libctypes.so": True,
        "w/plugins/libplug.so.3": True,
        "w/plugins/libplugdep.so.1": True,  # only another plugin links it
    }


def test_what_only_optional_modules_load_is_on_demand_unless_another_links_it() -> None:
    files = (
        WheelElf(path="n/tbbpool.abi3.so", info=module(needed=["libtbb.so.12"])),
        WheelElf(path="n/omppool.abi3.so", info=module(needed=["libhelper.so.1"])),
        WheelElf(path="n.libs/libhelper.so.1", info=info(needed=["libgomp.so.1"])),
        WheelElf(path="n/_core.abi3.so", info=module(needed=["libstdc++.so.6"])),
    )
    wheels = [("n 1", files)]
    index = LibraryIndex(providers=(GLIBC,)).merged(index_wheels(wheels))
    missing = check_links(wheels, index, arch="amd64")
    assert not any(m.on_demand for m in missing)
    # The modules whose imports decide: each lacking module, and those linking a lacking library.
    assert importers(wheels, missing, arch="amd64") == {
        ("n 1", "n/tbbpool.abi3.so"),
        ("n 1", "n/omppool.abi3.so"),
        ("n 1", "n/_core.abi3.so"),
    }
    optional = frozenset({("n 1", "n/tbbpool.abi3.so"), ("n 1", "n/omppool.abi3.so")})
    found = check_links(wheels, index, arch="amd64", optional=optional)
    assert {m.member: m.on_demand for m in found} == {
        "n/tbbpool.abi3.so": True,
        "n.libs/libhelper.so.1": True,  # only an optional module links it
        "n/_core.abi3.so": False,
    }
    # A library a needed module links too must load: refused.
    core = WheelElf(path="n/_core.abi3.so", info=module(needed=["libhelper.so.1"]))
    wheels = [("n 1", (*files[:3], core))]
    found = check_links(wheels, index, arch="amd64", optional=optional)
    assert {m.member: m.on_demand for m in found} == {
        "n/tbbpool.abi3.so": True,
        "n.libs/libhelper.so.1": False,
    }


@pytest.mark.pypi
def test_numba_imports_its_threading_layers_under_a_guard(
    pypi_wheel: Callable[[str], Path],
) -> None:
    # Its real wheel: tbbpool needs libtbb.so.12, which no slim base has, and numba falls
    # back to another layer; _typeconv's handler raises again, so numba needs it.
    modules = ["numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool", "numba.core.typeconv._typeconv"]
    assert guarded_modules(pypi_wheel("numba-x86_64"), modules) == {
        "numba.np.ufunc.tbbpool",
        "numba.np.ufunc.omppool",
    }


def test_the_gpu_driver_libraries_come_from_the_container_runtime() -> None:
    # libcaffe2_nvrtc.so in PyTorch's CUDA wheels links libcuda.so.1, which the NVIDIA
    # container toolkit mounts into a container given a GPU; the CUDA runtime is the image's.
    linked = module(
        needed=["libcuda.so.1", "libnvidia-ml.so.1", "libcudart.so.13", "libc.so.6"],
        libcuda_so_1=["libcuda.so.1"],
    )
    wheels = [("torch 2", (WheelElf(path="torch/_C.abi3.so", info=linked),))]
    found = check_links(wheels, LibraryIndex(providers=(GLIBC,)), arch="amd64")
    assert [(m.library, m.on_demand) for m in found] == [("libcudart.so.13", False)]


def test_the_warning_for_plugins_is_one_line_naming_the_first_and_counting_the_rest() -> None:
    lacks = [
        Missing(wheel="p 1", member="p/libplug.so.1", library=library, on_demand=True)
        for library in ("libucp.so.0", "libfabric.so.1", "libucp.so.0", "libmpi.so.40")
    ]
    line = on_demand_line(lacks)
    assert "\n" not in line
    assert line.startswith(
        "p 1: p/libplug.so.1 needs libucp.so.0 (and 2 more: libfabric.so.1, libmpi.so.40), "
        "which the image does not have; its package loads these files only for a feature"
    )
    assert line.endswith("add what ships those libraries (a wheel, or a Debian package in "
                         "[tool.imgbuild] system-packages)")  # fmt: skip


def test_a_refusal_names_every_package_when_it_knows_them_all() -> None:
    # opencv-python's bundled Qt on a slim base: one change then mends the image.
    qt = "opencv_python.libs/libQt5Core-9088e21b.so.5.15.19"
    missing = [
        Missing(wheel="opencv-python 5", member=qt, library="libglib-2.0.so.0"),
        Missing(wheel="opencv-python 5", member="cv2/cv2.abi3.so", library="libGL.so.1"),
        Missing(wheel="opencv-python 5", member=qt, library="libgthread-2.0.so.0"),
    ]
    packages = {
        "libglib-2.0.so.0": "libglib2.0-0",
        "libgthread-2.0.so.0": "libglib2.0-0",
        "libGL.so.1": "libgl1",
    }
    assert refusal_line(missing, packages) == (
        f"opencv-python 5: {qt} needs libglib-2.0.so.0, which the image does not have (also "
        "missing: libGL.so.1, libgthread-2.0.so.0); add them with [tool.imgbuild] "
        'system-packages = ["libgl1", "libglib2.0-0"]'
    )
    # One package unknown: the first library's fix, and the others listed.
    partial = refusal_line(missing, {"libglib-2.0.so.0": "libglib2.0-0"})
    assert partial == (
        missing_line(missing[0], "libglib2.0-0")
        + " (also missing: libGL.so.1, libgthread-2.0.so.0)"
    )
    # A symbol version the image's library lacks is not mended by adding a package.
    old = Missing(wheel="w 1", member="w/x.so", library="libc.so.6", version="GLIBC_2.38",
                  provided="GLIBC_2.36", provider=GLIBC)  # fmt: skip
    assert refusal_line([old, missing[1]], packages) == (
        missing_line(old, "libc6") + " (also missing: libGL.so.1)"
    )
    assert refusal_line(missing[:1], packages) == missing_line(missing[0], "libglib2.0-0")


def test_lines_for_an_unknown_package_and_a_version() -> None:
    absent = Missing(wheel="w 1", member="w/x.so", library="libfoo.so.3")
    assert missing_line(absent, None) == (
        "w 1: w/x.so needs libfoo.so.3, which the image does not have; find the Debian "
        "package that ships it (apt-file search libfoo.so.3) and add it to [tool.imgbuild] "
        "system-packages"
    )
    old = Missing(wheel="w 1", member="w/x.so", library="libstdc++.so.6",
                  version="GLIBCXX_3.4.32", provided="GLIBCXX_3.4.30")  # fmt: skip
    assert missing_line(old, None) == (
        "w 1: w/x.so needs libstdc++.so.6 with symbol version GLIBCXX_3.4.32, but the image's "
        "libstdc++.so.6 has only up to GLIBCXX_3.4.30; use a base from a newer Debian release, "
        "or a build of the wheel made for an older libstdc++.so.6"
    )

"""Reading .debs without dpkg: every compression, the control part, and hostile members refused.

Synthetic .debs are built here with ``make_deb`` (a small ar writer of our own, so the bytes
are known); one real .deb from the live archive checks the reader against dpkg's own
``md5sums`` of it.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import random
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import pytest
import zstandard
from debian import deb822

from imagebuild.debian.archive import fetch_deb
from imagebuild.debian.closure import to_locked
from imagebuild.debian.deb import DebFile, read_control
from imagebuild.debian.model import IndexedPackage, LockedDeb
from imagebuild.errors import DebianError

# A member of a synthetic data.tar: bytes (a file), None (a directory), ("->", target)
# (a symlink), ("=>", target) (a hard link), or a TarInfo to add as it is.
Member = bytes | None | tuple[str, str] | tarfile.TarInfo


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """An ``ar`` archive as dpkg-deb writes one (16-byte names, even-padded members)."""
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n"
        out += header.encode("ascii") + data
        if len(data) % 2:
            out += b"\n"
    return bytes(out)


def tar_bytes(members: Mapping[str, Member], compression: str) -> bytes:
    """A tar of ``members`` compressed as a .deb part: ``""``, gz, xz, bz2 or zst."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, member in members.items():
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            info = tarfile.TarInfo(name)
            info.uname = info.gname = "root"
            if member is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif isinstance(member, tuple):
                kind, target = member
                info.type = tarfile.SYMTYPE if kind == "->" else tarfile.LNKTYPE
                info.linkname, info.mode = target, 0o777 if kind == "->" else 0o644
            else:
                info.size, info.mode = len(member), 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(member) if isinstance(member, bytes) else None)
    data = raw.getvalue()
    if compression == "gz":
        import gzip

        return gzip.compress(data, mtime=0)
    if compression == "xz":
        return lzma.compress(data)
    if compression == "bz2":
        import bz2

        return bz2.compress(data)
    if compression == "zst":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return data


def make_deb(
    path: Path,
    data: Mapping[str, Member],
    *,
    package: str = "demo",
    version: str = "1.0-1",
    arch: str = "amd64",
    extra: str = "",
    compression: str = "xz",
    control_compression: str = "gz",
    md5sums: bool = True,
    conffiles: tuple[str, ...] = (),
) -> Path:
    """Write a .deb at ``path`` whose data part holds ``data`` (names as dpkg-deb writes them)."""
    control = (
        f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\n{extra}"
        f"Maintainer: Nobody <nobody@example.org>\nDescription: a test package\n"
        f" made by tests/debian/test_deb.py\n"
    )
    control_members: dict[str, Member] = {"./": None, "./control": control.encode()}
    if md5sums:
        sums = "".join(
            f"{hashlib.md5(v).hexdigest()}  {k.removeprefix('./')}\n"
            for k, v in data.items()
            if isinstance(v, bytes)
        )
        control_members["./md5sums"] = sums.encode()
    if conffiles:
        control_members["./conffiles"] = "".join(f"{c}\n" for c in conffiles).encode()
    suffix = lambda c: f".{c}" if c else ""  # noqa: E731
    path.write_bytes(
        ar_archive(
            [
                ("debian-binary", b"2.0\n"),
                (
                    f"control.tar{suffix(control_compression)}",
                    tar_bytes(control_members, control_compression),
                ),
                (f"data.tar{suffix(compression)}", tar_bytes(data, compression)),
            ]
        )
    )
    return path


SAMPLE: dict[str, Member] = {
    "./": None,
    "./etc/": None,
    "./etc/demo.conf": b"answer = 42\n",
    "./usr/": None,
    "./usr/bin/": None,
    "./usr/bin/demo.sh": b"#!/bin/sh\necho demo\n",
    "./usr/bin/demo-again.sh": ("=>", "./usr/bin/demo.sh"),
    "./usr/bin/demo-link": ("->", "demo.sh"),
}


def read_all(path: Path) -> dict[str, tuple[str, bytes | None, str]]:
    """name -> (type, content, linkname) of every data member of the .deb at ``path``."""
    with DebFile(path) as deb:
        return {
            m.info.name: (
                m.info.type.decode(),
                m.stream.read() if m.stream is not None else None,
                m.info.linkname,
            )
            for m in deb.members()
        }


@pytest.mark.parametrize("compression", ["zst", "xz", "gz", "bz2", ""])
def test_every_data_compression_streams_the_same_members(tmp_path: Path, compression: str) -> None:
    deb = make_deb(
        tmp_path / "demo.deb", SAMPLE, compression=compression, conffiles=("/etc/demo.conf",)
    )

    members = read_all(deb)

    assert list(members) == [
        "etc",
        "etc/demo.conf",
        "usr",
        "usr/bin",
        "usr/bin/demo.sh",
        "usr/bin/demo-again.sh",
        "usr/bin/demo-link",
    ]
    assert members["etc/demo.conf"] == ("0", b"answer = 42\n", "")
    assert members["usr/bin/demo-again.sh"] == ("1", None, "usr/bin/demo.sh")
    assert members["usr/bin/demo-link"] == ("2", None, "demo.sh")
    control = read_control(deb)
    assert deb822.Deb822(control.control)["Package"] == "demo"
    assert control.control.endswith("test_deb.py\n")
    assert control.conffiles == ("/etc/demo.conf",)
    assert control.md5sums is not None
    conf_md5 = hashlib.md5(b"answer = 42\n").hexdigest()
    assert f"{conf_md5}  etc/demo.conf\n" in control.md5sums


@pytest.mark.parametrize("compression", ["zst", "xz", ""])
def test_control_part_in_any_compression_and_md5sums_may_be_absent(
    tmp_path: Path, compression: str
) -> None:
    deb = make_deb(tmp_path / "demo.deb", SAMPLE, control_compression=compression, md5sums=False)

    control = read_control(deb)

    assert control.md5sums is None
    assert control.conffiles == ()
    assert "Version: 1.0-1\n" in control.control


def test_modes_and_owners_are_kept(tmp_path: Path) -> None:
    setuid = tarfile.TarInfo("./usr/bin/su")
    setuid.mode, setuid.uid, setuid.gid = 0o4755, 0, 0
    shadow = tarfile.TarInfo("./usr/bin/chage")
    shadow.mode, shadow.uid, shadow.gid = 0o2755, 0, 42
    deb = make_deb(tmp_path / "modes.deb", {"./usr/bin/su": setuid, "./usr/bin/chage": shadow})

    with DebFile(deb) as opened:
        infos = {m.info.name: m.info for m in opened.members()}

    assert (infos["usr/bin/su"].mode, infos["usr/bin/su"].uid) == (0o4755, 0)
    assert (infos["usr/bin/chage"].mode, infos["usr/bin/chage"].gid) == (0o2755, 42)


def hostile(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    ("members", "member", "why"),
    [
        ({"./../etc/x": hostile("./../etc/x")}, "./../etc/x", "climbs out of the tree"),
        ({"./usr/../../x": hostile("./usr/../../x")}, "./usr/../../x", "climbs out of the tree"),
        ({"/etc/x": hostile("/etc/x")}, "/etc/x", "names an absolute path"),
        (
            {"./usr/x": hostile("./usr/x", tarfile.LNKTYPE, "../../etc/shadow")},
            "./usr/x",
            "climbs out of the tree",
        ),
        (
            {"./usr/x": hostile("./usr/x", tarfile.LNKTYPE, "/etc/shadow")},
            "./usr/x",
            "names an absolute path",
        ),
        (
            {
                "./usr/a": hostile("./usr/a", tarfile.LNKTYPE, "./usr/b"),
                "./usr/b": hostile("./usr/b"),
            },
            "./usr/a",
            "not an earlier file",
        ),
        ({"./dev/null": hostile("./dev/null", tarfile.CHRTYPE)}, "./dev/null", "device file"),
        ({"./dev/sda": hostile("./dev/sda", tarfile.BLKTYPE)}, "./dev/sda", "device file"),
        ({"./run/pipe": hostile("./run/pipe", tarfile.FIFOTYPE)}, "./run/pipe", "FIFO"),
    ],
)
def test_hostile_members_are_refused_in_one_line(
    tmp_path: Path, members: dict[str, Member], member: str, why: str
) -> None:
    deb = make_deb(tmp_path / "evil_1.0_amd64.deb", {"./": None, "./usr/": None, **members})

    with pytest.raises(DebianError) as caught:
        read_all(deb)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("evil_1.0_amd64.deb: member ")
    assert repr(member) in message and why in message and "refused" in message


def test_not_a_deb_and_a_truncated_deb_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(DebianError, match=r"^junk.deb: not a .deb \(no ar archive header\)"):
        DebFile(junk)

    whole = make_deb(tmp_path / "whole.deb", SAMPLE).read_bytes()
    cut = tmp_path / "cut.deb"
    cut.write_bytes(whole[: len(whole) - 40])
    with pytest.raises(DebianError, match=r"^cut.deb: ar member data.tar.xz is truncated"):
        DebFile(cut)

    wrong = tmp_path / "wrong.deb"
    wrong.write_bytes(ar_archive([("debian-binary", b"3.0\n"), ("data.tar", b"")]))
    with pytest.raises(DebianError, match=r"unsupported .deb format b'3.0'"):
        DebFile(wrong)


def test_a_corrupt_member_header_is_not_a_quiet_end(tmp_path: Path) -> None:
    # tarfile ends an archive quietly at a header whose checksum fails; the rest of the
    # package would be missing without a word.
    good = make_deb(tmp_path / "good.deb", SAMPLE, compression="").read_bytes()
    bad = tmp_path / "bad.deb"
    bad.write_bytes(good.replace(b"./etc/demo.conf", b"./etc/demo.conX", 1))

    with pytest.raises(DebianError) as caught:
        read_all(bad)

    assert str(caught.value).startswith("bad.deb: data.tar has a corrupt tar header after 'etc'")


def corrupt_in_the_middle(tmp_path: Path, compression: str) -> Path:
    """A .deb whose one 300 kB member's compressed bytes are zeroed halfway through."""
    noise = random.Random(0).randbytes(300_000)  # incompressible: the stream is mostly it
    good = make_deb(
        tmp_path / "good.deb", {"./": None, "./blob": noise}, compression=compression, md5sums=False
    ).read_bytes()
    middle = good.index(f"data.tar.{compression}".encode()) + 150_000
    bad = tmp_path / "bad.deb"
    bad.write_bytes(good[:middle] + bytes(64) + good[middle + 64 :])
    return bad


def test_content_that_fails_to_decompress_is_the_debs_error(tmp_path: Path) -> None:
    bad = corrupt_in_the_middle(tmp_path, "xz")

    with DebFile(bad) as deb:
        member = next(deb.members())  # the stream is read while the archive is there
        assert member.info.name == "blob" and member.stream is not None
        with pytest.raises(DebianError) as caught:
            member.stream.read()

    assert str(caught.value).startswith("bad.deb: cannot read data.tar.xz (")
    assert "\n" not in str(caught.value)


def test_a_zstd_frame_that_fails_its_checksum_is_refused(tmp_path: Path) -> None:
    # Read to the end of the part: the frame's checksum is checked there.
    with pytest.raises(DebianError) as caught:
        read_all(corrupt_in_the_middle(tmp_path, "zst"))

    assert str(caught.value).startswith("bad.deb: cannot read data.tar.zst (")


def test_a_corrupt_xz_part_fails_in_one_line(tmp_path: Path) -> None:
    good = make_deb(tmp_path / "good.deb", SAMPLE, compression="xz").read_bytes()
    start = good.index(b"data.tar.xz") + 60 - len(b"data.tar.xz")
    data = bytearray(good)
    data[start + 40 : start + 48] = b"\xff" * 8  # inside the xz stream's first block
    bad = tmp_path / "bad.deb"
    bad.write_bytes(bytes(data))

    with pytest.raises(DebianError) as caught:
        read_all(bad)

    assert str(caught.value).startswith("bad.deb: cannot read data.tar.xz (")
    assert "\n" not in str(caught.value)


# Real .debs: from the live archive through the stage's own fetchers (conftest's session
# cache), each checked against the sha256 its verified Packages index gives.

FetchReal = Callable[[str, str, tuple[str, ...]], list[tuple[LockedDeb, Path]]]


def real_debs(
    debian_http: httpx.Client,
    debian_cache: Path,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
) -> FetchReal:
    """``get(suite, arch, names)``: those packages' .debs, fetched once per session."""

    def get(suite: str, arch: str, names: tuple[str, ...]) -> list[tuple[LockedDeb, Path]]:
        index = {p.name: p for p in debian_packages(suite, arch)}
        locked = [to_locked(index[name]) for name in names]
        return [(deb, fetch_deb(debian_http, deb, cache=debian_cache)) for deb in locked]

    return get


@pytest.fixture(scope="session")
def fetch_real(
    debian_http: httpx.Client,
    debian_cache: Path,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
) -> FetchReal:
    return real_debs(debian_http, debian_cache, debian_packages)


@pytest.mark.debian
def test_a_real_deb_streams_what_its_md5sums_lists(fetch_real: FetchReal) -> None:
    ((locked, path),) = fetch_real("bookworm", "amd64", ("zlib1g",))

    control = read_control(path)
    sums = {
        line.split("  ", 1)[1]: line.split("  ", 1)[0]
        for line in (control.md5sums or "").splitlines()
    }
    with DebFile(path) as deb:
        streamed = {
            m.info.name: hashlib.md5(m.stream.read()).hexdigest()
            for m in deb.members()
            if m.stream is not None
        }

    assert deb822.Deb822(control.control)["Version"] == locked.version
    assert sums and streamed == sums
    assert any(name.startswith("lib/x86_64-linux-gnu/libz.so.1") for name in streamed)

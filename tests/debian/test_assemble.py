"""Assembling .debs into layers: real bookworm sets on amd64 and arm64, a system layer on top,
and the decisions (merged /usr, clashing files, hard links, drops) on synthetic .debs."""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest

from imagebuild.debian.assemble import (
    Account,
    AssembledLayer,
    Group,
    RootfsSpec,
    assemble_layer,
)
from imagebuild.debian.model import IndexedPackage, LockedDeb
from imagebuild.digest import Digest
from imagebuild.errors import DebianError
from imagebuild.image.store import BlobStore
from tests.debian.test_deb import FetchReal, Member, make_deb, real_debs

BASE = (
    "base-files",
    "ca-certificates",
    "gcc-12-base",
    "libc6",
    "libgcc-s1",
    "netbase",
    "tzdata",
    "zlib1g",
)
ACCOUNTS = (
    Account(name="root", uid=0, gid=0, home="/root", shell="/sbin/nologin"),
    Account(name="nonroot", uid=65532, gid=65532, home="/home/nonroot", shell="/sbin/nologin"),
)
GROUPS = (Group(name="root", gid=0), Group(name="nonroot", gid=65532))
MTIME = 1_700_000_000


def spec(arch: str, **changes: object) -> RootfsSpec:
    values: dict[str, object] = {
        "arch": arch,
        "accounts": ACCOUNTS,
        "groups": GROUPS,
        "symlinks": (("usr/bin/sh", "dash"),),
    }
    values.update(changes)
    return RootfsSpec(**values)  # type: ignore[arg-type]


class Tree:
    """A layer blob read back: its entries by name, in order, and their bytes."""

    def __init__(self, store: BlobStore, assembled: AssembledLayer) -> None:
        blob = store.path(assembled.layer.digest).read_bytes()
        raw = gzip.decompress(blob)
        # The layer is what the descriptor says it is: digests over the real bytes.
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == assembled.layer.digest
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == assembled.layer.diff_id
        assert len(blob) == assembled.layer.size
        self.data: dict[str, bytes] = {}
        with tarfile.open(store.path(assembled.layer.digest)) as tar:
            self.members = tar.getmembers()
            for member in self.members:
                if member.isfile():
                    stream = tar.extractfile(member)
                    assert stream is not None
                    self.data[member.name] = stream.read()
        self.names = [m.name for m in self.members]
        self.by_name = {m.name: m for m in self.members}

    def text(self, name: str) -> str:
        return self.data[name].decode()

    def resolve(self, name: str) -> tarfile.TarInfo | None:
        """The member ``name`` leads to, following symlinks within this layer, or None."""
        path = name.strip("/")
        for _ in range(40):
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                member = self.by_name.get("/".join(parts[:i]))
                if member is None:
                    return None
                if member.issym():
                    here = posixpath.dirname(member.name)
                    base = "" if member.linkname.startswith("/") else here
                    target = posixpath.join(base, member.linkname.lstrip("/"), *parts[i:])
                    path = posixpath.normpath(target).lstrip("/")
                    break
            else:
                return self.by_name[path]
        raise AssertionError(f"{name}: too many symlinks")


def check_layer_form(tree: Tree) -> None:
    """Sorted bytewise, parents first, each name once, fixed metadata."""
    assert tree.names == sorted(tree.names, key=os.fsencode)
    assert len(set(tree.names)) == len(tree.names)
    seen: set[str] = set()
    for member in tree.members:
        parent = posixpath.dirname(member.name)
        assert not parent or parent in seen, f"{member.name} comes before its directory"
        seen.add(member.name)
        assert member.mtime == MTIME
        assert (member.uname, member.gname) == ("", "")


@pytest.fixture(scope="session")
def fetch_real(
    debian_http: httpx.Client,
    debian_cache: Path,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
) -> FetchReal:
    return real_debs(debian_http, debian_cache, debian_packages)


@pytest.fixture(scope="module")
def bookworm_amd64(
    fetch_real: FetchReal, tmp_path_factory: pytest.TempPathFactory
) -> tuple[BlobStore, list[tuple[LockedDeb, Path]], AssembledLayer]:
    debs = fetch_real("bookworm", "amd64", BASE)
    store = BlobStore(tmp_path_factory.mktemp("store-amd64"))
    layer = assemble_layer(
        debs, spec=spec("amd64"), store=store, mtime=MTIME, created_by="imgbuild: base"
    )
    return store, debs, layer


@pytest.mark.debian
def test_a_real_bookworm_base_layer(
    bookworm_amd64: tuple[BlobStore, list[tuple[LockedDeb, Path]], AssembledLayer],
    tmp_path: Path,
) -> None:
    store, debs, assembled = bookworm_amd64
    tree = Tree(store, assembled)
    check_layer_form(tree)

    # Built again, elsewhere, from the .debs in another order: the same bytes.
    again = assemble_layer(
        list(reversed(debs)),
        spec=spec("amd64"),
        store=BlobStore(tmp_path / "other"),
        mtime=MTIME,
        created_by="imgbuild: base",
    )
    assert (again.layer.digest, again.layer.diff_id) == (
        assembled.layer.digest,
        assembled.layer.diff_id,
    )

    libc = tree.by_name["usr/lib/x86_64-linux-gnu/libc.so.6"]
    assert libc.isfile() and tree.data[libc.name][:4] == b"\x7fELF"
    assert assembled.files["/usr/lib/x86_64-linux-gnu/libc.so.6"] == "libc6"
    for alias in ("bin", "sbin", "lib", "lib64"):
        assert tree.by_name[alias].issym() and tree.by_name[alias].linkname == f"usr/{alias}"
        assert not any(n.startswith(f"{alias}/") for n in tree.names)
    loader = tree.resolve("/lib64/ld-linux-x86-64.so.2")
    assert loader is not None and loader.name == "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"

    assert tree.by_name["tmp"].isdir() and tree.by_name["tmp"].mode == 0o1777
    assert "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" in tree.text("etc/passwd")
    assert tree.text("etc/passwd").startswith("root:x:0:0:root:/root:/sbin/nologin\n")
    assert tree.text("etc/group") == "root:x:0:\nnonroot:x:65532:\n"
    home = tree.by_name["home/nonroot"]
    assert (home.uid, home.gid, home.mode) == (65532, 65532, 0o700)
    assert tree.by_name["usr/bin/sh"].linkname == "dash"

    bundle = tree.text("etc/ssl/certs/ca-certificates.crt")
    assert bundle.count("-----BEGIN CERTIFICATE-----") > 100
    assert bundle.count("-----BEGIN CERTIFICATE-----") == bundle.count("-----END CERTIFICATE-----")
    localtime = tree.resolve("etc/localtime")
    assert localtime is not None and tree.data[localtime.name].startswith(b"TZif")
    os_release = tree.resolve("etc/os-release")
    assert os_release is not None and "VERSION_CODENAME=bookworm" in tree.text(os_release.name)

    # What scanners read: a status.d entry per package, and a status file listing them all.
    for name in BASE:
        paragraph = tree.text(f"var/lib/dpkg/status.d/{name}")
        assert paragraph.startswith(f"Package: {name}\nStatus: install ok installed\n")
    assert "var/lib/dpkg/status.d/libc6.md5sums" in tree.data
    status = tree.text("var/lib/dpkg/status")
    assert [
        line.split(": ")[1] for line in status.splitlines() if line.startswith("Package: ")
    ] == list(BASE)
    assert assembled.packages == BASE

    # Docs go, licences stay; usr/share/doc/libgcc-s1 is a link to gcc-12-base's.
    assert tree.by_name["usr/share/doc/libgcc-s1"].linkname == "gcc-12-base"
    assert "usr/share/doc/libc6/copyright" in tree.data
    assert not any(
        n.startswith("usr/share/doc/libc6/") and not n.endswith("copyright") for n in tree.names
    )
    assert not any(n.startswith("usr/share/man/") for n in tree.names)


@pytest.mark.debian
def test_a_real_bookworm_arm64_base_layer(fetch_real: FetchReal, tmp_path: Path) -> None:
    debs = fetch_real("bookworm", "arm64", BASE)
    store = BlobStore(tmp_path / "store")

    assembled = assemble_layer(
        debs, spec=spec("arm64"), store=store, mtime=MTIME, created_by="base"
    )
    tree = Tree(store, assembled)
    check_layer_form(tree)

    assert tree.by_name["usr/lib/aarch64-linux-gnu/libc.so.6"].isfile()
    assert assembled.files["/usr/lib/aarch64-linux-gnu/libc.so.6"] == "libc6"
    assert tree.by_name["lib"].linkname == "usr/lib"
    assert "lib64" not in tree.by_name and not any(n.startswith("lib/") for n in tree.names)
    # The program interpreter arm64 binaries name: /lib/ld-linux-aarch64.so.1.
    loader = tree.resolve("/lib/ld-linux-aarch64.so.1")
    assert loader is not None and loader.name == "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1"
    assert tree.by_name["tmp"].mode == 0o1777
    assert "nonroot:x:65532:" in tree.text("etc/passwd")
    assert tree.text("etc/ssl/certs/ca-certificates.crt").count("BEGIN CERTIFICATE") > 100
    assert tree.resolve("etc/os-release") is not None
    assert "Architecture: arm64" in tree.text("var/lib/dpkg/status.d/libc6")


@pytest.mark.debian
def test_a_system_layer_on_top_of_a_real_base(
    bookworm_amd64: tuple[BlobStore, list[tuple[LockedDeb, Path]], AssembledLayer],
    fetch_real: FetchReal,
) -> None:
    store, base_debs, _ = bookworm_amd64
    system = fetch_real("bookworm", "amd64", ("libgomp1",))

    assembled = assemble_layer(
        system,
        spec=None,
        below=[path for _, path in base_debs],
        store=store,
        mtime=MTIME,
        created_by="imgbuild: system packages",
    )
    tree = Tree(store, assembled)
    check_layer_form(tree)

    assert assembled.packages == ("libgomp1",)
    assert assembled.files["/usr/lib/x86_64-linux-gnu/libgomp.so.1"] == "libgomp1"
    assert tree.text("var/lib/dpkg/status.d/libgomp1").startswith(
        "Package: libgomp1\nStatus: install ok installed\n"
    )
    assert "var/lib/dpkg/status.d/libc6" not in tree.by_name
    listed = [
        line.split(": ")[1]
        for line in tree.text("var/lib/dpkg/status").splitlines()
        if line.startswith("Package: ")
    ]
    assert listed == sorted((*BASE, "libgomp1"))
    # Only the packages' own files and the dpkg view: nothing the base layer makes.
    for made in ("etc/passwd", "tmp", "lib", "bin", "etc/ssl/certs/ca-certificates.crt"):
        assert made not in tree.by_name


# Synthetic .debs: the decisions, each on a case a real archive does not easily give.


def locked(
    path: Path, name: str, version: str = "1.0-1", arch: str = "amd64"
) -> tuple[LockedDeb, Path]:
    return (
        LockedDeb(
            name=name,
            version=version,
            architecture=arch,
            url=f"http://deb.example/pool/main/{path.name}",
            sha256=Digest("sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()),
            size=path.stat().st_size,
        ),
        path,
    )


def base_files(tmp_path: Path) -> tuple[LockedDeb, Path]:
    """A tiny base-files: os-release, /tmp, the bookworm-style real /bin and /lib directories."""
    members: dict[str, Member] = {
        "./": None,
        "./bin/": None,
        "./lib/": None,
        "./etc/": None,
        "./etc/os-release": ("->", "../usr/lib/os-release"),
        "./usr/": None,
        "./usr/lib/": None,
        "./usr/lib/os-release": b"ID=debian\nVERSION_CODENAME=bookworm\n",
        "./usr/share/": None,
        "./usr/share/doc/": None,
        "./usr/share/doc/base-files/": None,
        "./usr/share/doc/base-files/copyright": b"the licence\n",
        "./usr/share/doc/base-files/README": b"docs\n",
        "./usr/share/man/": None,
        "./usr/share/man/man5/": None,
        "./usr/share/man/man5/os-release.5.gz": b"man page\n",
    }
    return locked(
        make_deb(tmp_path / "base-files.deb", members, package="base-files"), "base-files"
    )


def build(
    tmp_path: Path, debs: Sequence[tuple[LockedDeb, Path]], **changes: object
) -> tuple[Tree, AssembledLayer]:
    store = BlobStore(tmp_path / "store")
    assembled = assemble_layer(
        debs, spec=spec("amd64", **changes), store=store, mtime=MTIME, created_by="test"
    )
    tree = Tree(store, assembled)
    check_layer_form(tree)
    return tree, assembled


def test_members_under_bin_and_lib_move_under_usr_hard_links_become_files(tmp_path: Path) -> None:
    tool = make_deb(
        tmp_path / "tool.deb",
        {
            "./": None,
            "./bin/": None,
            "./bin/tool.sh": b"#!/bin/sh\n",
            "./bin/tool-again.sh": ("=>", "./bin/tool.sh"),
            "./lib/": None,
            "./lib/x86_64-linux-gnu/": None,
            "./lib/x86_64-linux-gnu/libtool.so.1": b"\x7fELF library",
            "./lib64/": None,
            "./lib64/ld-tool.so": ("->", "/lib/x86_64-linux-gnu/libtool.so.1"),
        },
        package="tool",
    )

    tree, assembled = build(tmp_path, [base_files(tmp_path), locked(tool, "tool")])

    assert tree.data["usr/bin/tool.sh"] == tree.data["usr/bin/tool-again.sh"] == b"#!/bin/sh\n"
    assert tree.by_name["usr/bin/tool-again.sh"].isreg()
    assert tree.by_name["usr/bin/tool.sh"].mode == 0o755
    assert tree.by_name["usr/lib/x86_64-linux-gnu/libtool.so.1"].isfile()
    assert tree.by_name["usr/lib64/ld-tool.so"].linkname == "/lib/x86_64-linux-gnu/libtool.so.1"
    resolved = tree.resolve("lib64/ld-tool.so")
    assert resolved is not None and resolved.name == "usr/lib/x86_64-linux-gnu/libtool.so.1"
    assert [n for n in tree.names if n.split("/")[0] in ("bin", "lib", "lib64", "sbin")] == [
        "bin",
        "lib",
        "lib64",
        "sbin",
    ]
    assert all(tree.by_name[n].issym() for n in ("bin", "lib", "lib64", "sbin"))
    assert assembled.files["/usr/bin/tool-again.sh"] == "tool"
    assert "/usr/lib/os-release" in assembled.files and "/etc/passwd" not in assembled.files
    # Docs and man pages dropped, the licence kept, the doc directory kept for it.
    assert "usr/share/doc/base-files/copyright" in tree.data
    assert "usr/share/doc/base-files/README" not in tree.by_name
    assert "usr/share/man/man5" not in tree.by_name and "usr/share/man" in tree.by_name


def test_modes_with_setuid_and_owners_survive(tmp_path: Path) -> None:
    su = tarfile.TarInfo("./usr/bin/chage")
    su.mode, su.gid = 0o2755, 42
    deb = make_deb(
        tmp_path / "passwd.deb",
        {"./": None, "./usr/": None, "./usr/bin/": None, "./usr/bin/chage": su},
    )

    tree, _ = build(tmp_path, [base_files(tmp_path), locked(deb, "demo")])

    chage = tree.by_name["usr/bin/chage"]
    assert (chage.mode, chage.uid, chage.gid) == (0o2755, 0, 42)


def test_a_file_two_packages_ship_differently_needs_replaces(tmp_path: Path) -> None:
    def shipping(name: str, content: bytes, extra: str = "") -> tuple[LockedDeb, Path]:
        members: dict[str, Member] = {"./": None, "./etc/": None, "./etc/shared.conf": content}
        return locked(make_deb(tmp_path / f"{name}.deb", members, package=name, extra=extra), name)

    with pytest.raises(DebianError) as caught:
        build(tmp_path, [base_files(tmp_path), shipping("alpha", b"a\n"), shipping("beta", b"b\n")])
    assert str(caught.value).startswith(
        "beta.deb: /etc/shared.conf is also shipped by alpha, differently, "
        "and neither package declares Replaces on the other"
    )

    same, _ = build(
        tmp_path, [base_files(tmp_path), shipping("alpha", b"x\n"), shipping("beta", b"x\n")]
    )
    assert same.data["etc/shared.conf"] == b"x\n"

    # Whichever package comes first by name, the one that declares Replaces wins.
    replacing = shipping("alpha", b"new\n", "Replaces: beta (<< 2)\n")
    won, assembled = build(tmp_path, [base_files(tmp_path), shipping("beta", b"old\n"), replacing])
    assert won.data["etc/shared.conf"] == b"new\n"
    assert assembled.files["/etc/shared.conf"] == "alpha"

    # A versioned Replaces that the other package's version does not meet does not count.
    too_old = shipping("alpha", b"new\n", "Replaces: beta (<< 0.5)\n")
    with pytest.raises(DebianError, match="neither package declares Replaces"):
        build(tmp_path, [base_files(tmp_path), shipping("beta", b"old\n"), too_old])


def test_a_member_where_merged_usr_has_a_symlink_is_refused(tmp_path: Path) -> None:
    odd = make_deb(tmp_path / "odd.deb", {"./": None, "./lib": ("->", "/opt/lib")}, package="odd")

    with pytest.raises(
        DebianError, match=r"^odd.deb: member 'lib' is not a directory or a link to usr/lib"
    ):
        build(tmp_path, [base_files(tmp_path), locked(odd, "odd")])


def test_a_deb_that_is_not_the_locked_package_is_refused(tmp_path: Path) -> None:
    deb = make_deb(tmp_path / "demo.deb", {"./": None}, package="demo", version="2.0-1")

    with pytest.raises(DebianError) as caught:
        build(tmp_path, [base_files(tmp_path), locked(deb, "demo", version="1.0-1")])

    assert str(caught.value).startswith(
        "demo.deb: the .deb is demo 2.0-1 (amd64), the lock names demo 1.0-1 (amd64)"
    )


def test_a_base_without_os_release_or_with_an_unknown_zone_is_refused(tmp_path: Path) -> None:
    bare = make_deb(tmp_path / "bare.deb", {"./": None, "./etc/": None}, package="bare")
    with pytest.raises(DebianError, match=r"has no /etc/os-release; add base-files"):
        build(tmp_path, [locked(bare, "bare")])

    tzdata = make_deb(
        tmp_path / "tzdata.deb",
        {"./": None, "./usr/share/zoneinfo/Etc/UTC": b"TZif2..."},
        package="tzdata",
        arch="all",
    )
    with pytest.raises(DebianError, match=r"localtime 'Mars/Olympus': tzdata has no"):
        build(
            tmp_path,
            [base_files(tmp_path), locked(tzdata, "tzdata", arch="all")],
            localtime="Mars/Olympus",
        )
    tree, _ = build(tmp_path, [base_files(tmp_path), locked(tzdata, "tzdata", arch="all")])
    assert tree.by_name["etc/localtime"].linkname == "/usr/share/zoneinfo/Etc/UTC"


def test_trixie_style_merged_usr_symlinks_in_base_files_are_the_same_links(tmp_path: Path) -> None:
    members: dict[str, Member] = {
        "./": None,
        "./bin": ("->", "usr/bin"),
        "./lib": ("->", "usr/lib"),
        "./etc/": None,
        "./etc/os-release": ("->", "../usr/lib/os-release"),
        "./usr/": None,
        "./usr/lib/": None,
        "./usr/lib/os-release": b"ID=debian\n",
    }
    deb = make_deb(tmp_path / "base-files.deb", members, package="base-files")

    tree, _ = build(tmp_path, [locked(deb, "base-files")])

    assert tree.by_name["bin"].linkname == "usr/bin" and tree.by_name["usr/bin"].isdir()
    assert tree.by_name["lib"].linkname == "usr/lib"

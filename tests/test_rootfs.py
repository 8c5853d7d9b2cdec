"""A base's filesystem unpacked for its Python: layers in order, whiteouts, nothing escapes."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path, PurePosixPath

import pytest
import zstandard

from imagebuild import cache
from imagebuild.digest import Digest
from imagebuild.errors import ImageError
from imagebuild.image import untar
from imagebuild.image.descriptor import OCI_LAYER_TAR
from imagebuild.image.model import BaseImage
from imagebuild.image.rootfs import pack_rootfs, unpack_rootfs
from imagebuild.image.store import BlobStore
from imagebuild.install.native import resolve_in

Entry = tuple[str, str, bytes | str]  # kind (file, dir, sym, link), name, data or target


def _layer(store: BlobStore, entries: list[Entry]):  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
            elif kind == "dev":
                info.type = tarfile.CHRTYPE
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            tar.addfile(info)
    return store.put_bytes(buf.getvalue(), media_type=OCI_LAYER_TAR)


def _base(store: BlobStore, *layers: list[Entry]) -> BaseImage:
    descs = tuple(_layer(store, entries) for entries in layers)
    return BaseImage(
        reference="test",
        manifest_digest=Digest("sha256:" + "ab" * 32),
        config={},
        layers=descs,
        diff_ids=tuple(d.digest for d in descs),
    )


def test_layers_apply_in_order_with_whiteouts(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    base = _base(
        store,
        [
            ("dir", "usr/lib/python3.11", b""),
            ("file", "usr/lib/python3.11/os.py", b"first"),
            ("file", "usr/lib/python3.11/stat.py", b"x"),
            ("file", "usr/lib/python3.11/encodings/old.py", b"x"),
            ("file", "usr/bin/python3.11", b"ELF"),
            ("file", "usr/bin/bash", b"shell"),
            ("file", "usr/share/doc/README", b"docs"),
            ("sym", "lib", "usr/lib"),
            ("sym", "lib64", "/usr/lib"),
            ("dev", "usr/lib/null", b""),
        ],
        [
            ("file", "usr/lib/python3.11/os.py", b"second"),
            ("file", "usr/lib/python3.11/.wh.stat.py", b""),
            ("file", "usr/lib/python3.11/encodings/.wh..wh..opq", b""),
            ("file", "usr/lib/python3.11/encodings/new.py", b"y"),
            ("link", "usr/lib/python3.11/io.py", "usr/lib/python3.11/os.py"),
            ("file", "../../escape.py", b"no"),
            ("file", "lib64/through-an-absolute-link.py", b"no"),
        ],
    )
    root = unpack_rootfs(base, store, tmp_path / "rootfs")
    lib = root / "usr/lib/python3.11"
    assert (lib / "os.py").read_bytes() == b"second"
    assert (lib / "io.py").read_bytes() == b"second"
    assert not (lib / "stat.py").exists()
    assert sorted(p.name for p in (lib / "encodings").iterdir()) == ["new.py"]
    assert (root / "usr/bin/python3.11").read_bytes() == b"ELF"
    # Only what running Python needs: no shell, no docs, no devices.
    assert not (root / "usr/bin/bash").exists() and not (root / "usr/share").exists()
    assert not (root / "usr/lib/null").exists()
    # Nothing lands outside the tree, not even through an absolute link.
    assert not (tmp_path / "escape.py").exists()
    assert not Path("/usr/lib/through-an-absolute-link.py").exists()
    # Unpacked once: a second call finds the tree and leaves it alone.
    (lib / "marker").write_text("kept")
    assert unpack_rootfs(base, store, tmp_path / "rootfs") == root
    assert (lib / "marker").read_text() == "kept"


def test_links_resolve_inside_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").write_bytes(b"ld")
    (root / "lib").symlink_to("usr/lib")
    (root / "lib64").mkdir()
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    (root / "loop").symlink_to("loop")
    found = resolve_in(root, PurePosixPath("/lib64/ld-linux-x86-64.so.2"))
    assert found == root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert resolve_in(root, PurePosixPath("/loop/x")) is None
    assert resolve_in(root, PurePosixPath("/missing")) is None
    assert resolve_in(root, PurePosixPath("/../../lib")) == root / "usr/lib"


def test_a_directory_turned_into_a_link_leading_out_is_not_written_through(
    tmp_path: Path,
) -> None:
    """Where a member may go is worked out once per directory: a directory that a later
    member (or layer) replaces by a link out of the tree is asked again, not remembered."""
    outside = tmp_path / "outside"
    outside.mkdir()
    store = BlobStore(tmp_path / "blobs")
    base = _base(
        store,
        [
            ("file", "usr/lib/python3.11/encodings/a.py", b"a"),
            ("file", "usr/lib/x86_64-linux-gnu/a.so", b"a"),
            ("file", "usr/lib/x86_64-linux-gnu/.wh..wh..opq", b""),
            ("sym", "usr/lib/x86_64-linux-gnu", str(outside)),
            ("file", "usr/lib/x86_64-linux-gnu/same-layer.so", b"no"),
        ],
        [
            ("file", "usr/lib/python3.11/.wh.encodings", b""),
            ("sym", "usr/lib/python3.11/encodings", str(outside)),
            ("file", "usr/lib/python3.11/encodings/next-layer.py", b"no"),
            ("file", "usr/local/lib/python3.11/encodings/kept.py", b"yes"),
        ],
    )
    root = unpack_rootfs(base, store, tmp_path / "rootfs")
    assert list(outside.iterdir()) == []
    assert (root / "usr/local/lib/python3.11/encodings/kept.py").read_bytes() == b"yes"


def test_only_what_the_bases_python_needs_to_compile_is_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader, the C libraries, the standard library's modules a start imports and its
    encodings (the compile script runs without site and imports built-ins alone); not its
    other modules and packages, extension modules, site-packages, nor the library
    directories' subdirectories. The same tree whether the kernel copies the files or
    Python does."""
    store = BlobStore(tmp_path / "blobs")
    wanted = [
        "lib64/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/local/lib/libpython3.11.so.1.0",
        "lib/ld-musl-x86_64.so.1",
        "usr/lib/python3.11/os.py",
        "usr/lib/python3.11/posixpath.py",
        "usr/lib/python3.11/LICENSE.txt",
        "usr/lib/python3.11/encodings/__init__.py",
        "usr/lib/python3.11/encodings/utf_8.py",
        "usr/local/bin/python3.11",
    ]
    unwanted = [
        "usr/lib/python3.11/asyncio/base_events.py",
        "usr/lib/python3.11/tarfile.py",
        "usr/lib/python3.11/traceback.py",
        "usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
        "usr/lib/python3.11/site-packages/setuptools/__init__.py",
        "usr/lib/python3.11/site-packages/distutils-precedence.pth",
        "usr/lib/python3/dist-packages/apt/__init__.py",
        "usr/lib/x86_64-linux-gnu/gconv/UTF-16.so",
        "usr/lib/x86_64-linux-gnu/perl-base/strict.pm",
        "usr/lib/locale/C.utf8/LC_CTYPE",
        "usr/local/bin/pip",
    ]
    entries: list[Entry] = [("dir", "usr/lib/python3.11/lib-dynload", b"")]
    entries += [("file", name, name.encode()) for name in wanted + unwanted]
    base = _base(store, entries)
    trees = {}
    for kernel in (True, False):
        if not kernel:

            def declined(*args: object) -> int:
                raise OSError(errno.EXDEV, "cross-device copy declined")

            monkeypatch.setattr(os, "copy_file_range", declined)
        root = unpack_rootfs(base, store, tmp_path / f"rootfs-{kernel}")
        trees[kernel] = _listing(root)
        for name in wanted:
            assert (root / name).read_bytes() == name.encode()
        for name in unwanted:
            assert not (root / name).exists(), name
        assert (root / "usr/lib/python3.11/lib-dynload").is_dir()
    assert trees[True] == trees[False]


def test_a_base_is_unpacked_in_memory_when_there_is_room_else_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On ext4 an unpack's file creation cost a cold build 0.2-0.4 s of its critical path;
    where the memory staging root has room the tree goes there, and a tree already on disk
    (unpacked before, or where there was no room) is used where it is."""
    disk, memory = tmp_path / "cache/rootfs", tmp_path / "shm"
    memory.mkdir()
    monkeypatch.setattr(cache, "memory_scratch_root", lambda: memory)
    monkeypatch.setattr(cache, "_allows_exec", lambda _: True)
    assert cache.rootfs_home(disk, "ab" * 32) == memory / "rootfs"
    (disk / ("cd" * 32)).mkdir(parents=True)
    assert cache.rootfs_home(disk, "cd" * 32) == disk
    # A noexec /dev/shm (hardened hosts) could not start the base's loader.
    monkeypatch.setattr(cache, "_allows_exec", lambda _: False)
    assert cache.rootfs_home(disk, "ab" * 32) == disk
    monkeypatch.setattr(cache, "_allows_exec", lambda _: True)
    monkeypatch.setattr(cache, "memory_scratch_root", lambda: None)
    assert cache.rootfs_home(disk, "ab" * 32) == disk


def test_only_a_file_system_mounted_without_noexec_runs_programs() -> None:
    shm = Path("/dev/shm")
    exec_ok = "tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0\n"
    hardened = "tmpfs /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size=65536k 0 0\n"
    assert cache.mount_allows_exec(exec_ok, shm)
    assert not cache.mount_allows_exec(hardened, shm)
    assert not cache.mount_allows_exec(exec_ok + hardened, shm)  # the last mount hides others
    assert cache.mount_allows_exec(hardened + exec_ok, shm)
    assert not cache.mount_allows_exec("proc /proc proc rw 0 0\n", shm)  # not mounted


def test_trees_in_memory_no_build_used_for_a_day_go_when_another_is_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = tmp_path / "shm"
    monkeypatch.setattr(cache, "memory_scratch_root", lambda: memory)
    store = BlobStore(tmp_path / "blobs")
    base = _base(store, [("file", "usr/bin/python3.11", b"ELF")])
    home = memory / "rootfs"
    old, recent = home / "old", home / "recent"
    for tree in (old, recent):
        (tree / "usr/bin").mkdir(parents=True)
    two_days = time.time() - 2 * cache.ROOTFS_IDLE
    os.utime(old, (two_days, two_days))
    os.utime(recent, (time.time() - cache.ROOTFS_IDLE / 2,) * 2)
    disk_old = tmp_path / "cache/rootfs/old"
    disk_old.mkdir(parents=True)
    os.utime(disk_old, (two_days, two_days))

    root = unpack_rootfs(base, store, home, made=cache.forget_idle_trees)
    assert (root / "usr/bin/python3.11").read_bytes() == b"ELF"
    assert sorted(p.name for p in home.iterdir()) == sorted([root.name, "recent"])
    cache.forget_idle_trees(disk_old.parent)  # the disk cache's trees are not memory's to drop
    assert disk_old.is_dir()
    # A build that uses a kept tree marks it used, so another's sweep leaves it alone.
    os.utime(root, (two_days, two_days))
    assert unpack_rootfs(base, store, home) == root
    assert root.stat().st_mtime > time.time() - 60


def _listing(root: Path) -> dict[str, str]:
    """Each path below ``root``: a link's target, a file's bytes, or ``dir``."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = path.read_text()
    return found


@pytest.mark.parametrize("form", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_plain_layer_unpacks_as_its_gzip_does(tmp_path: Path, form: int) -> None:
    """The plain tar's walk steps over what is surely not wanted, and nothing else: long
    names (ustar prefixes, PAX and GNU headers), links and whiteouts come out the same."""
    long = "d" * 60 + "/" + "n" * 90
    entries: list[tuple[str, str, str]] = [("dir", "./usr", ""), ("dir", "./usr/lib", "")]
    for i in range(40):  # what a slim base is mostly made of: not wanted
        entries.append(("file", f"./usr/share/doc/pkg{i}/copyright", f"licence {i}"))
        entries.append(("file", f"./etc/junk{i}.conf", "x"))
    entries += [
        ("file", f"./usr/share/{long}.txt", "long and not wanted"),
        ("file", f"usr/lib/python3.11/encodings/{long}.py", "long and wanted"),
        ("file", "usr/lib/x86_64-linux-gnu/libz.so.1.2.13", "zlib"),
        ("sym", "usr/lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.2.13"),
        ("sym", "lib", "usr/lib"),
        ("file", "usr/local/bin/python3.11", "python"),
        ("link", "usr/local/bin/python3", "usr/local/bin/python3.11"),
        ("file", "usr/local/bin/pip", "not python"),
        ("file", "usr/lib/python3.11/gone.py", "removed below"),
        ("file", "usr/lib/python3.11/.wh.gone.py", ""),
        ("file", "./usr/lib/python3.11/os.py", "import sys"),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=form) as tar:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind in ("sym", "link"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data.encode())
                tar.addfile(info, io.BytesIO(data.encode()))
    store = BlobStore(tmp_path / "blobs")
    trees: dict[str, dict[str, str]] = {}
    for packed, blob in (("plain", buf.getvalue()), ("gzip", gzip.compress(buf.getvalue()))):
        desc = store.put_bytes(blob, media_type=OCI_LAYER_TAR)
        base = BaseImage(
            reference="test",
            manifest_digest=Digest("sha256:" + hashlib.sha256(blob).hexdigest()),
            config={},
            layers=(desc,),
            diff_ids=(desc.digest,),
        )
        trees[packed] = _listing(unpack_rootfs(base, store, tmp_path / packed))
    assert trees["plain"] == trees["gzip"]
    assert trees["plain"][f"usr/lib/python3.11/encodings/{long}.py"] == "long and wanted"
    assert trees["plain"]["usr/local/bin/python3"] == "python"
    assert "usr/lib/python3.11/gone.py" not in trees["plain"]
    assert not [name for name in trees["plain"] if name.startswith(("etc", "usr/share"))]
    assert "usr/local/bin/pip" not in trees["plain"]


def test_each_caches_build_environments_have_their_own_place_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = tmp_path / "shm"
    monkeypatch.setattr(cache, "memory_scratch_root", lambda: memory)
    monkeypatch.setattr(cache, "_allows_exec", lambda _: True)
    first = cache.build_envs_memory(tmp_path / "c1/build-envs")
    second = cache.build_envs_memory(tmp_path / "c2/build-envs")
    assert first is not None and second is not None
    assert first.parent == second.parent == memory / "build-envs" and first != second
    assert cache.build_envs_memory(tmp_path / "c1/build-envs") == first  # the same each time
    # Environments in memory unused for a day go (their lock files stay); on disk none do.
    old, recent = first / "old", first / "recent"
    for env in (old, recent):
        (env / "bin").mkdir(parents=True)
    (first / "old.lock").write_text("")
    two_days = time.time() - 2 * cache.ROOTFS_IDLE
    for path in (old, first / "old.lock"):
        os.utime(path, (two_days, two_days))
    cache.forget_idle_trees(first)
    assert sorted(p.name for p in first.iterdir()) == ["old.lock", "recent"]
    # No room in memory, or a noexec one: none (they are made in the cache on disk).
    monkeypatch.setattr(cache, "_allows_exec", lambda _: False)
    assert cache.build_envs_memory(tmp_path / "c1/build-envs") is None
    monkeypatch.setattr(cache, "_allows_exec", lambda _: True)
    monkeypatch.setattr(cache, "memory_scratch_root", lambda: None)
    assert cache.build_envs_memory(tmp_path / "c1/build-envs") is None


@pytest.mark.parametrize("unpacker", ["gnu-tar", "tarfile"])
def test_a_tree_kept_as_its_own_tar_unpacks_as_the_layers_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unpacker: str
) -> None:
    """What a runner takes from the registry cache instead of the base's layers
    (``pipeline.basecache``): the same names, bytes, links and modes, unpacked by GNU tar
    where there is one, else by the rules a layer is unpacked by."""
    if unpacker == "gnu-tar":
        assert untar.gnu_tar() is not None  # this host has it (Debian's tar)
    else:
        monkeypatch.setattr(untar, "gnu_tar", lambda: None)
    store = BlobStore(tmp_path / "blobs")
    base = _base(
        store,
        [
            ("dir", "usr/lib/x86_64-linux-gnu", b""),
            ("file", "usr/lib/x86_64-linux-gnu/libc.so.6", b"libc"),
            ("link", "usr/lib/x86_64-linux-gnu/libc-2.36.so", "usr/lib/x86_64-linux-gnu/libc.so.6"),
            ("sym", "lib64", "/usr/lib"),
            ("sym", "lib", "usr/lib"),
            ("file", "usr/lib/python3.11/os.py", b"os"),
            ("file", "usr/lib/python3.11/encodings/utf_8.py", b"utf8"),
            ("dir", "usr/lib/python3.11/lib-dynload", b""),
            ("file", "usr/bin/python3.11", b"ELF"),
        ],
    )
    from_layers = unpack_rootfs(base, store, tmp_path / "one")
    (from_layers / "usr/bin/python3.11").chmod(0o755)
    kept = tmp_path / "tree.tar.zst"
    pack_rootfs(from_layers, kept)
    # zstd, the plain tar's size in its frame (what lets it be decompressed in one call)
    plain_size = zstandard.get_frame_parameters(kept.read_bytes()).content_size
    assert plain_size == len(zstandard.ZstdDecompressor().decompress(kept.read_bytes()))
    from_tar = unpack_rootfs(base, store, tmp_path / "two", from_tar=kept)
    assert _listing(from_tar) == _listing(from_layers)
    copy = from_tar / "usr/lib/x86_64-linux-gnu/libc-2.36.so"
    assert copy.samefile(from_tar / "usr/lib/x86_64-linux-gnu/libc.so.6")  # a hard link again
    assert os.stat(from_tar / "usr/bin/python3.11").st_mode & 0o111
    # A tree kept gzipped (before zstd) unpacks the same.
    gzipped = tmp_path / "tree.tar.gz"
    gzipped.write_bytes(gzip.compress(zstandard.ZstdDecompressor().decompress(kept.read_bytes())))
    from_gzip = unpack_rootfs(base, store, tmp_path / "gz", from_tar=gzipped)
    assert _listing(from_gzip) == _listing(from_layers)
    # One that does not unpack raises (the build then unpacks the base's layers), and
    # leaves no tree behind.
    damaged = tmp_path / "damaged.tar.zst"
    damaged.write_bytes(kept.read_bytes()[: len(kept.read_bytes()) // 2])
    with pytest.raises(ImageError):
        unpack_rootfs(base, store, tmp_path / "three", from_tar=damaged)
    assert not [p for p in (tmp_path / "three").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["zstd", "zstd-unsized", "gzip"])
@pytest.mark.parametrize("whole", [True, False], ids=["in-one-call", "in-pieces"])
def test_gnu_tar_refuses_a_name_leading_out_of_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: bool, kind: str
) -> None:
    """``image.untar``: a kept tar naming ``..`` is refused, and nothing lands outside. A
    zstd (``untar.compress``'s, or one that does not tell its size) or a gzip (as kept
    before) is decompressed in one call, or in pieces when it is large or its size is not
    told; a damaged one raises."""
    if not whole:
        monkeypatch.setattr(untar, "_WHOLE", 0)
        monkeypatch.setattr(untar, "_PIECE", 7)
    source = tmp_path / "hostile.tar"
    with tarfile.open(source, mode="w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    hostile = tmp_path / f"hostile.{kind}"
    if kind == "gzip":
        hostile.write_bytes(gzip.compress(source.read_bytes()))
    elif kind == "zstd":
        untar.compress(source, hostile)
    else:
        with hostile.open("wb") as out, zstandard.ZstdCompressor().stream_writer(out) as z:
            z.write(source.read_bytes())
    into = tmp_path / "deep" / "into"
    into.mkdir(parents=True)
    plain = untar.plain_tar(hostile, tmp_path / "plain.tar")
    assert plain != hostile and plain.read_bytes() == source.read_bytes()
    assert untar.plain_tar(plain, tmp_path / "unused.tar") == plain  # plain already
    assert untar.extract(plain, into, seconds=30) is False
    assert not (tmp_path / "deep" / "outside.txt").exists()
    with pytest.raises(ValueError):
        untar.plain_tar(_truncated(hostile, tmp_path), tmp_path / "again.tar")


def _truncated(blob: Path, where: Path) -> Path:
    cut = where / f"cut-{blob.name}"
    cut.write_bytes(blob.read_bytes()[:-12])
    return cut


def test_what_this_hosts_python_reads_to_start_is_in_a_tree() -> None:
    """Each module file this host's interpreter reads to start as a native compiler does
    (``-I -S``, the probe's imports) is one the tree keeps: a Python release that reads
    another at its start fails here, not as a silent fall back to the engine."""
    from imagebuild.image.rootfs import _wanted
    from imagebuild.install.native import _PROBE

    # (a frozen module names its source in __file__ too; its spec says where it came from)
    report = (
        f"{_PROBE}\n"
        "specs = [getattr(m, '__spec__', None) for m in list(sys.modules.values())]\n"
        "print('\\n'.join(sorted(s.origin for s in specs if s is not None and s.has_location)))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", report], capture_output=True, text=True, check=True
    )
    files = [line for line in done.stdout.splitlines()[1:] if line.endswith(".py")]
    assert any(f.endswith("/encodings/__init__.py") for f in files)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in files:
        inside = Path(name).relative_to(stdlib)
        parts = ("usr", "lib", stdlib.name, *inside.parts)
        assert _wanted(parts), f"{inside} is read at every start but left out of a tree"

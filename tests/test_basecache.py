"""A pulled base's facts and Python kept for other runners (``pipeline.basecache``)."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import threading
import time
from pathlib import Path, PurePosixPath

import pytest

from imagebuild.debian.elf import read_elf
from imagebuild.digest import Digest
from imagebuild.errors import RegistryError
from imagebuild.image import untar
from imagebuild.image.rootfs import pack_rootfs
from imagebuild.install.native import PROBE_RECORD
from imagebuild.pipeline.basecache import ArrivingLayers, _left_out
from imagebuild.pipeline.bases import facts_from_json, facts_json
from imagebuild.target.base import BaseFacts

_HOST_LIBRARY_DIRS = (
    "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
)  # fmt: skip


def _host_library(name: str, extra: Path) -> Path:
    for directory in (str(extra), *_HOST_LIBRARY_DIRS):
        if (Path(directory) / name).exists():
            return Path(directory) / name
    raise AssertionError(f"{name} not on this host")


def _facts(arch: str) -> BaseFacts:
    return BaseFacts(
        interpreter=PurePosixPath("/usr/bin/python3.11"),
        python_version=(3, 11),
        libc="glibc",
        libc_version=(2, 36),
        shell=True,
        arch=arch,
    )


def test_a_kept_tree_leaves_the_libraries_its_python_never_loads(tmp_path: Path) -> None:
    """This host's own Python and what it loads, in a tree beside a library it does not
    load: the tree kept for other runners has the first and not the second, nor the
    answers the interpreter's probe gave on this host."""
    executable = Path(os.path.realpath(sys.executable))
    with executable.open("rb") as stream:
        info = read_elf(stream)
    assert info is not None and info.needed
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    tree = tmp_path / "tree"
    libdir = tree / ("usr/lib/x86_64-linux-gnu" if arch == "amd64" else "usr/lib/aarch64-linux-gnu")
    libdir.mkdir(parents=True)
    (tree / "usr/bin").mkdir()
    shutil.copy(executable, tree / "usr/bin/python3.11")
    (tree / "usr/lib/python3.11/encodings").mkdir(parents=True)
    (tree / "usr/lib/python3.11/os.py").write_text("")
    (tree / "usr/lib/python3.11/encodings/__init__.py").write_text("")
    wanted = set()
    todo = list(info.needed)
    while todo:  # what the loader would load, copied under the names it looks for
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        found = _host_library(name, executable.parent.parent / "lib")
        shutil.copy(found, libdir / name)
        with found.open("rb") as stream:
            more = read_elf(stream)
        todo.extend(more.needed if more is not None else ())
    # A versioned file behind a link, as Debian ships them, and a loader.
    first = sorted(name for name in wanted if not name.startswith("ld-"))[0]
    (libdir / first).rename(libdir / f"{first}.9.9")
    (libdir / first).symlink_to(f"{first}.9.9")
    if not (libdir / "ld-linux-x86-64.so.2").exists():
        shutil.copy(libdir / f"{first}.9.9", libdir / "ld-linux-x86-64.so.2")
    shutil.copy(libdir / f"{first}.9.9", libdir / "libunrelated.so.3")  # never loaded
    (libdir / "libunrelated.so").symlink_to("libunrelated.so.3")
    (tree / f"{PROBE_RECORD}0123").write_text("3.11.2")  # what this host's probe answered

    kept = tmp_path / "tree.tar.zst"
    pack_rootfs(tree, kept, leave=_left_out(tree, _facts(arch)))
    names = _names(kept, tmp_path / "plain.tar")
    assert wanted | {f"{first}.9.9", "ld-linux-x86-64.so.2", "python3.11", "os.py"} <= names
    assert "__init__.py" in names and "encodings" in names
    assert not names & {"libunrelated.so.3", "libunrelated.so", f"{PROBE_RECORD}0123"}

    # An interpreter that cannot be read: everything is kept.
    (tree / "usr/bin/python3.11").write_bytes(b"not ELF")
    pack_rootfs(tree, kept, leave=_left_out(tree, _facts(arch)))
    names = _names(kept, tmp_path / "again.tar")
    assert "libunrelated.so.3" in names and f"{PROBE_RECORD}0123" not in names


def _names(kept: Path, plain: Path) -> set[str]:
    """The file names in the kept tree's tar."""
    with tarfile.open(untar.plain_tar(kept, plain)) as tar:
        return {PurePosixPath(n).name for n in tar.getnames()}


def test_facts_read_back_as_they_were_kept_and_nonsense_reads_as_none() -> None:
    facts = _facts("amd64")
    assert facts_from_json(facts_json(facts)) == facts
    for nonsense in (None, [], {}, {**facts_json(facts), "python_version": ["3"]}, "x"):
        assert facts_from_json(nonsense) is None
    assert facts_from_json({**facts_json(facts), "extra": 1}) is None


class _Layers:
    def __init__(self) -> None:
        self.read: list[str] = []

    def path(self, digest: Digest) -> Path:
        self.read.append(digest)
        return Path("/layers") / digest


def test_arriving_layers_are_read_only_once_pulled_and_a_failed_pull_is_raised() -> None:
    layers, started, release = _Layers(), threading.Event(), threading.Event()

    def pull() -> None:
        started.set()
        release.wait(10)

    arriving = ArrivingLayers(layers, pull)
    arriving.start()
    started.wait(10)
    arriving.start()  # once: a second start is no second pull
    reader = threading.Thread(target=arriving.path, args=(Digest("sha256:" + "a" * 64),))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and layers.read == []  # waits for the pull
    release.set()
    reader.join(10)
    assert layers.read == ["sha256:" + "a" * 64]

    def fails() -> None:
        raise RegistryError("pulling base: blob sha256:ab does not match its digest")

    broken = ArrivingLayers(layers, fails)
    with pytest.raises(RegistryError, match="does not match"):
        broken.path(Digest("sha256:" + "b" * 64))
    with pytest.raises(RegistryError):
        broken.wait()
    assert ArrivingLayers(layers).path(Digest("sha256:" + "c" * 64)) == Path(
        "/layers/sha256:" + "c" * 64
    )


def test_arriving_layers_not_started_are_pulled_only_when_first_read() -> None:
    """An output that reads no layer (a registry push) never pulls them; a reader does."""
    pulls: list[str] = []
    layers = _Layers()
    arriving = ArrivingLayers(layers, lambda: pulls.append("pulled"))
    time.sleep(0.05)
    assert pulls == []
    assert arriving.path(Digest("sha256:" + "d" * 64)) == Path("/layers/sha256:" + "d" * 64)
    arriving.wait()
    assert pulls == ["pulled"]

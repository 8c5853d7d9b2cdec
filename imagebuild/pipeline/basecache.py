"""A pulled base's facts and its Python's tree, kept in the registry cache: its layers wait.

A CI runner that starts with an empty cache pulled the base's layers, inflated them to read
the base's facts (interpreter, libc, shell: ``target.base.inspect_layers``) and read them
again to unpack what its Python needs to compile (``image.rootfs``): 0.55 s of a FastAPI CI
run's longest chain before its first pyc. With ``--cache-to`` both are kept beside the
layers, under keys naming the base's manifest digest: the facts as JSON, the tree as
``image.rootfs.pack_rootfs`` lays it out (its ``TREE_FORMAT`` named in the key too). With
``--cache-from`` a runner that finds the facts takes them, and the tree when the base's
Python is to run here, and the base's layers are pulled on a thread of their own meanwhile
(``ArrivingLayers``): only what reads them waits for them (the image's output, a link check
the base's library record does not answer, a compile through the engine).

What the registry cache keeps is trusted as its layers are: a kept tree's interpreter
writes the image's pycs, as a kept layer's files go into the image. A tree is unpacked by
``image.rootfs``'s rules (nothing leaves it), and one that does not unpack is replaced by
the base's own layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from imagebuild.cache import CacheLayout, rootfs_home
from imagebuild.debian.elf import read_elf
from imagebuild.image.rootfs import TREE_FORMAT, pack_rootfs, tree_name
from imagebuild.install.native import PROBE_RECORD, library_dirs, resolve_in
from imagebuild.pipeline.bases import facts_json, known_facts, remember_facts

if TYPE_CHECKING:
    from imagebuild.digest import Digest
    from imagebuild.image.model import BaseImage
    from imagebuild.image.store import LayerFiles
    from imagebuild.pipeline.layers import RemoteLayers
    from imagebuild.target.base import BaseFacts

FACTS_TYPE = "application/vnd.imgbuild.base-facts.v1+json"
TREE_TYPE = "application/vnd.imgbuild.base-python.v1.tar+zstd"
_FORMAT = 1
"""Named in the keys: a runner never reads what was kept laid out otherwise."""


def facts_without_layers(
    base: BaseImage, cache: Path, remote: RemoteLayers | None
) -> BaseFacts | None:
    """The base's facts from the local cache, else the registry cache's; None: neither."""
    known = known_facts(base, cache)
    if known is not None or remote is None:
        return known
    kept = remote.find_file(_key("facts", base), FACTS_TYPE)
    if kept is None:
        return None
    try:
        data = json.loads(kept.read_bytes())
    except ValueError:
        return None  # not ours, or damaged: read off the layers instead
    return remember_facts(base, cache, data)


def kept_tree(base: BaseImage, remote: RemoteLayers | None) -> Path | None:
    """The tree of the base's Python the registry cache keeps (a tar), or None."""
    return remote.find_file(_key("python", base), TREE_TYPE) if remote is not None else None


def keep_base(base: BaseImage, facts: BaseFacts, cache: Path, remote: RemoteLayers | None) -> None:
    """Keep the base's facts, and its Python's tree if it is unpacked here, for other runners."""
    if remote is None:
        return
    name = tree_name(base)
    tree = rootfs_home(CacheLayout(cache).rootfs, name) / name
    data = json.dumps(facts_json(facts), sort_keys=True).encode()

    def write_facts(out: Path) -> None:
        out.write_bytes(data)

    remote.keep_file(_key("facts", base), FACTS_TYPE, write_facts)
    if tree.is_dir():
        remote.keep_file(
            _key("python", base),
            TREE_TYPE,
            lambda out: pack_rootfs(tree, out, leave=_left_out(tree, facts)),
        )


def _left_out(tree: Path, facts: BaseFacts) -> Callable[[Path], bool]:
    """What of the tree is not kept: the libraries its Python never loads, and its probe's answers.

    Another runner asks the interpreter itself: a tree that does not start there must not
    be taken on this one's word.
    """
    unloaded = _unloaded(tree, facts)
    return lambda path: path.name.startswith(PROBE_RECORD) or unloaded(path)


def _unloaded(tree: Path, facts: BaseFacts) -> Callable[[Path], bool]:
    """The libraries of the tree's library directories its Python never loads.

    What the interpreter needs (DT_NEEDED, and theirs, by the names the loader looks for
    and the links it follows) and the loaders are kept; the rest of a slim base's library
    directory (OpenSSL, SQLite, Berkeley DB, libstdc++: 17 of its 21 MB) is not. Where the
    interpreter cannot be read, everything is kept.
    """
    directories = library_dirs(tree, facts.arch)
    executable = resolve_in(tree, facts.interpreter)
    if executable is None:
        return lambda path: False
    needed: set[str] = set()
    todo, done = [executable], set()
    while todo:
        path = todo.pop()
        if path in done:
            continue
        done.add(path)
        with path.open("rb") as stream:
            info = read_elf(stream)
        for name in info.needed if info is not None else ():
            found = next((d / name for d in directories if (d / name).exists()), None)
            if found is None:
                continue
            needed.update(_link_names(tree, found))
            real = resolve_in(tree, _inside(tree, found))
            if real is not None:
                todo.append(real)
    if not needed:
        return lambda path: False  # nothing read: keep it all

    def leave(path: Path) -> bool:
        name = path.name
        return (
            ".so" in name
            and not name.startswith("ld-")  # the loaders
            and name not in needed
            and not path.is_dir()
            and resolve_in(tree, _inside(tree, path.parent)) in directories
        )

    return leave


def _link_names(tree: Path, path: Path, hops: int = 40) -> set[str]:
    """The names a lookup of ``path`` passes: its own, and each link's target on the way.

    An absolute link is followed inside ``tree``.
    """
    names = {path.name}
    while path.is_symlink() and hops > 0:
        target = PurePosixPath(os.readlink(path))
        names.add(target.name)
        path = tree.joinpath(*target.parts[1:]) if target.is_absolute() else path.parent / target
        hops -= 1
    return names


def _inside(tree: Path, path: Path) -> PurePosixPath:
    return PurePosixPath(path.relative_to(tree))


def _key(kind: str, base: BaseImage) -> str:
    material = f"imgbuild base-{kind} {_FORMAT} {TREE_FORMAT}\n{base.manifest_digest}"
    return hashlib.sha256(material.encode()).hexdigest()


class ArrivingLayers:
    """A base's layers (``LayerFiles``), maybe still being pulled on a thread of their own.

    The pull starts with ``start`` (the image's output reads them: they come meanwhile), or
    else when something first reads one (a link check, a compiler unpacking the base): an
    output that reads none (a registry push, which mounts them) never pulls them. Reading
    one (``path``) waits until all have arrived, and raises what stopped their pull. The
    thread is a daemon: a build that fails meanwhile does not wait for it to exit.
    """

    def __init__(self, layers: LayerFiles, pull: Callable[[], None] | None = None) -> None:
        self._layers = layers
        self._pull_them = pull
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._started = threading.Lock()
        if pull is None:
            self._done.set()

    def start(self) -> None:
        """Start pulling them on a thread of their own, unless that started already."""
        if self._pull_them is None or not self._started.acquire(blocking=False):
            return
        threading.Thread(
            target=self._pull, args=(self._pull_them,), name="imgbuild-base-layers", daemon=True
        ).start()

    def _pull(self, pull: Callable[[], None]) -> None:
        try:
            pull()
        except BaseException as exc:  # handed to whoever waits
            self._error = exc
        finally:
            self._done.set()

    def wait(self) -> None:
        """Return once the layers are in the store; raise what stopped their pull.

        Their pull starts now if it has not yet.
        """
        self.start()
        self._done.wait()
        if self._error is not None:
            raise self._error

    def path(self, digest: Digest) -> Path:
        """The layer ``digest`` as its reader wants it, once the layers have arrived."""
        self.wait()
        return self._layers.path(digest)

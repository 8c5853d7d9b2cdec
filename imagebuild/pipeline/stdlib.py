"""Bytecode for a built base's standard library, compiled like the venv's.

Debian's Python packages ship no ``.pyc``: their postinst compiles the standard library,
and no maintainer script runs in a built base. Without pycs every container start compiles
what it imports, in memory (nonroot cannot write them), about a quarter of a second for
json, ssl, asyncio and the like. So a build on a built base adds one layer of the standard
library's pycs, written by the compiler that compiles the venv (the base's own interpreter,
unchecked-hash pycs, the same bytes on every machine), and kept in the layer cache under the
base's digest and that interpreter.
"""

from __future__ import annotations

import hashlib
import posixpath
import shutil
from pathlib import Path, PurePosixPath

from imagebuild.cache import CacheLayout
from imagebuild.image.model import BaseImage
from imagebuild.image.mutate import stack_layer
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import LAYER_FORMAT, build_layer
from imagebuild.install.compilescript import COMPILE_SCRIPT_ID
from imagebuild.install.layers import BytecodeCompiler
from imagebuild.pipeline.layers import RemoteLayers
from imagebuild.pipeline.layerwork import read_layer_record, write_layer_record
from imagebuild.report import Reporter
from imagebuild.target.base import open_layer

STDLIB_VERSION = 2
"""Bumped when what the layer holds changes (invalidates kept layers)."""


def stdlib_layers(built_base: bool, compile_bytecode: bool) -> int:
    """How many layers the standard library's bytecode adds to a base (for the layer budget)."""
    return 1 if built_base and compile_bytecode else 0


def with_stdlib_bytecode(
    base: BaseImage,
    *,
    python: tuple[int, int],
    compiler: BytecodeCompiler,
    store: BlobStore,
    cache: CacheLayout,
    work: Path,
    reporter: Reporter,
    remote: RemoteLayers | None = None,
) -> BaseImage:
    """``base`` with a layer of its standard library's pycs on top.

    The layer is looked up in the local layer cache, then in the registry cache (``remote``,
    ``--cache-from``), and kept in both when it is made.
    """
    stdlib = f"usr/lib/python{python[0]}.{python[1]}/"
    material = (
        f"stdlib {STDLIB_VERSION} {LAYER_FORMAT} {base.manifest_digest} {compiler.identity}"
        f" {COMPILE_SCRIPT_ID}"
    )
    key = hashlib.sha256(material.encode()).hexdigest()
    record = cache.layers / f"{key}.json"
    layer = read_layer_record(record, store)
    if layer is not None and remote is not None:
        # A runner seeding the registry cache keeps what it has, not only what it makes.
        remote.keep([(key, layer)], reporter)
    if layer is None and remote is not None:
        layer = remote.find(key)
        if layer is not None:
            write_layer_record(record, layer)
    if layer is None:
        staging = work / f"stdlib-{base.manifest_digest[7:19]}"
        files = _sources(base, store, staging, stdlib)
        reporter.step(f"compile: {len(files)} modules of the base's standard library")
        compiler.compile(staging, [files])
        for source, _ in files:
            source.unlink()
        layer = build_layer(
            staging,
            store,
            mtime=0,
            created_by=f"imgbuild: bytecode of /{stdlib.rstrip('/')}",
        )
        shutil.rmtree(staging, ignore_errors=True)
        write_layer_record(record, layer)
        if remote is not None:
            remote.keep([(key, layer)], reporter)
    return stack_layer(base, layer, store)


def _sources(
    base: BaseImage, store: BlobStore, staging: Path, stdlib: str
) -> list[tuple[Path, PurePosixPath]]:
    """The standard library's ``.py`` files, copied out of the base's layers into ``staging``.

    A source that is a link (``sitecustomize.py`` points into ``/etc``) is copied as the
    file it points to: its pyc sits beside the link and hashes the target's bytes.
    """
    contents: dict[str, bytes] = {}
    links: dict[str, str] = {}
    for desc in base.layers:
        with open_layer(store.path(desc.digest)) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not name.endswith(".py"):
                    continue
                if member.issym() and name.startswith(stdlib):
                    links[name] = member.linkname
                elif member.isfile() and (stream := tar.extractfile(member)) is not None:
                    contents[name] = stream.read()
    for name, target in links.items():
        resolved = posixpath.normpath(
            target.lstrip("/")
            if target.startswith("/")
            else posixpath.join(posixpath.dirname(name), target)
        )
        if resolved in contents:
            contents[name] = contents[resolved]
    files = []
    for name in sorted(n for n in contents if n.startswith(stdlib)):
        dest = staging / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(contents[name])
        files.append((dest, PurePosixPath("/" + name)))
    return files

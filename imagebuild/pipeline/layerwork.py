"""Layers built in worker processes: each one staged, compiled and tarred by one worker.

Staging a layer (``installer`` spreading wheels) and writing its tar are Python code that
holds the GIL; in threads of one process they took turns, and a lock of many small
packages spent most of its cold build waiting for the lock rather than for a CPU. Each
worker process has its own interpreter and its own compile server (the target's Python,
kept running), so the CPUs are all at work from the first layer to the last.

A worker gets everything as plain values (paths, the layer's spec, the venv's layout, the
compiler's executable): the blob store is a directory any process may write to, and the
layer's cache record is written by the worker that made it. A layer's bytes depend only on
its own inputs, so which worker makes it, and in what order, changes nothing.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.cache import mark_used, write_json
from imagebuild.image.model import Layer
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
from imagebuild.install.layers import (
    BytecodeCompiler,
    CompileServer,
    HostCompiler,
    VenvLayout,
    compile_sources,
    install_wheel,
    stage_venv,
)
from imagebuild.install.plan import LayerSpec

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerTask:
    """One layer for a worker to make."""

    index: int
    """Its place in the plan (names its staging directory)."""
    spec: LayerSpec
    """What goes into it."""
    venv: VenvLayout
    """The venv's layout in the image."""
    compiler: HostCompiler | None
    """The target's interpreter for bytecode (None: no bytecode)."""
    store: Path
    """The blob store's root: the layer's blob goes there."""
    record: Path
    """Its layer cache record, written once the blob is in."""
    work: Path
    """The build's scratch directory (staging trees under ``work/layers``)."""
    mtime: int
    """``SOURCE_DATE_EPOCH`` for every tar entry."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerMade:
    """A worker's answer: the layer, and how many modules it compiled."""

    index: int
    """The task's ``index``."""
    layer: Layer
    """The layer, its blob in the store."""
    modules: int
    """Sources compiled into it."""


def worker_context() -> ForkServerContext:
    """How workers start: forked from a server process, not from this one, nor spawned.

    The build's own threads (downloads, the project's wheel) may hold locks a child forked
    from this process would inherit held; the fork server has no threads. It imports this
    module (and so ``installer`` and the tar writer) once, and each worker forked from it
    has them: a spawned worker imported them again, with the command line's modules (typer)
    as well, which cost a cold build about 0.2 s of CPU per worker.
    """
    import multiprocessing  # (a code change's build makes its one layer here: no workers)

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


_server: CompileServer | None = None  # this process's, started on its first layer
_server_of = ""  # the identity of the compiler it runs


def make_layer(task: LayerTask, *, in_worker: bool = True) -> LayerMade:
    """Stage ``task``'s layer, compile its sources, tar it into the store, record it.

    In a worker, sources go to the worker's compile server; ``in_worker=False`` (one layer
    made in the build's own process: a code change's) goes to this process's, when it was
    started early (``start_compile_server``), else runs the compiler once.
    """
    staging = stage_layer(task.index, task.spec, task.venv, task.work)
    sources = compile_sources(staging, task.venv) if task.compiler and task.spec.wheels else []
    if task.compiler is not None and sources:
        started = _server is not None and _server_of == task.compiler.identity
        if in_worker or started:
            _compile_server(task.compiler).compile([sources])
        else:
            task.compiler.compile(staging, [sources], jobs=1)
    layer = finish_layer(staging, task.spec, BlobStore(task.store), task.record, task.mtime)
    return LayerMade(index=task.index, layer=layer, modules=len(sources))


def finish_layer(
    staging: Path, spec: LayerSpec, store: BlobStore, record: Path, mtime: int
) -> Layer:
    """Tar a staged tree into the store, remove the tree, and record the layer in the cache."""
    layer = build_layer(staging, store, mtime=mtime, created_by=spec.description)
    shutil.rmtree(staging)
    write_layer_record(record, layer)
    return layer


def stage_layer(index: int, spec: LayerSpec, venv: VenvLayout, work: Path) -> Path:
    """The layer's tree as it goes into the image, under ``work/layers/<index>``."""
    staging = work / "layers" / str(index)
    staging.mkdir(parents=True)
    if spec.kind == "venv":
        stage_venv(staging, venv)
    for wheel in spec.wheels:
        install_wheel(wheel.path, staging, venv)
    for inside, data in spec.files:
        target = staging / str(inside).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return staging


def write_layer_record(record: Path, layer: Layer) -> None:
    """Remember ``layer`` under its key in the local layer cache.

    Not flushed to disk: ``read_layer_record`` takes a record that does not read back, or
    whose blob is gone, as none.
    """
    write_json(record, layer_json(layer), durable=False)


def read_layer_record(record: Path, store: BlobStore) -> Layer | None:
    """The layer a cache record names, if it reads back and its blob is still in the store.

    A record read back has its time touched: what ``imgbuild cache prune --unused-for`` goes by.
    """
    try:
        layer = Layer(**json.loads(record.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if not store.has(layer.digest):
        return None
    mark_used(record)
    return layer


def layer_json(layer: Layer) -> dict[str, object]:
    """A layer as its cache record keeps it (``Layer(**record)`` reads it back)."""
    return {
        "digest": layer.digest,
        "diff_id": layer.diff_id,
        "size": layer.size,
        "media_type": layer.media_type,
        "created_by": layer.created_by,
    }


def start_compile_server(compiler: BytecodeCompiler | None) -> None:
    """Start this process's compile server for ``compiler``'s layers made here.

    The build starts it as soon as the compiler is chosen: the interpreter starts (about
    30 ms) while the project's wheel is built, not after, when its layer waits for it. A
    compiler that is not an interpreter run here (the engine's) has none.
    """
    if isinstance(compiler, HostCompiler):
        _compile_server(compiler)


def _compile_server(compiler: HostCompiler) -> CompileServer:
    """This process's compile server: one interpreter start for all the layers it makes."""
    global _server, _server_of
    if _server is None or _server_of != compiler.identity:
        if _server is not None:
            _server.close()
        _server, _server_of = compiler.serve(), compiler.identity
        _close_at_exit(_server)
    return _server


def _close_at_exit(server: CompileServer) -> None:
    """Stop ``server`` when this process ends: a worker when its pool shuts down.

    A layer worker runs no ``atexit`` handlers (multiprocessing ends it), so it registers
    with multiprocessing's own finalizers; a build's process, which never imported
    multiprocessing (a code change's build makes its one layer itself), does not import it
    for this (7 ms before its last layer) and uses ``atexit``, which ``cli.main`` runs.
    """
    if "multiprocessing" in sys.modules:
        from multiprocessing.util import Finalize

        Finalize(server, server.close, exitpriority=10)
    else:
        atexit.register(server.close)

"""Building a platform's layers over the layer cache.

Each planned layer is looked up by the key of what goes into it (``install.keys``); only
the missing ones are staged, compiled (in one compiler run for all of them) and tarred.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from imagebuild.cache import write_json
from imagebuild.image.model import Layer
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import LAYER_FORMAT, build_layer
from imagebuild.install.keys import layer_key
from imagebuild.install.layers import (
    BytecodeCompiler,
    HostCompiler,
    Sources,
    VenvLayout,
    compile_sources,
    install_wheel,
    stage_venv,
)

if TYPE_CHECKING:
    from imagebuild.install.plan import LayerPlan, LayerSpec, PlannedWheel
    from imagebuild.report import Reporter


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerJob:
    """Where layers are built and kept, and how."""

    store: BlobStore
    """Where finished layers' blobs go."""
    records: Path
    """The layer cache: one JSON record per key (``CacheLayout.layers``)."""
    work: Path
    """Scratch directory of the build; staging trees go under ``work/layers``."""
    mtime: int
    """``SOURCE_DATE_EPOCH`` for every tar entry."""
    reporter: Reporter
    """Progress."""
    remote: RemoteLayers | None = None
    """The registry layer cache (``--cache-from``/``--cache-to``), if any."""
    fetch: Callable[[Sequence[PlannedWheel]], None] | None = None
    """Fetches wheels not in the wheel cache yet (``pipeline.wheels``); None: all are there."""


class RemoteLayers(Protocol):
    """Layers kept in a registry by cache key (``pipeline.remotecache.RegistryLayerCache``)."""

    def find(self, key: str) -> Layer | None:
        """The layer kept under ``key`` (its blob fetched into the store), or None."""
        ...

    def keep(self, kept: Sequence[tuple[str, Layer]], reporter: Reporter) -> None:
        """Keep these layers under their keys."""
        ...

    def find_record(self, key: str) -> bytes | None:
        """A record kept under ``key`` (a cache record: an ELF scan, an SBOM), or None."""
        ...

    def keep_record(self, key: str, data: bytes) -> None:
        """Keep the record ``data`` under ``key``."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltLayers:
    """A plan's layers and how many of them this build made (the rest came from the cache)."""

    layers: tuple[Layer, ...]
    """The layers, bottom first."""
    built: int
    """How many were staged and tarred now."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Staged:
    index: int
    spec: LayerSpec
    staging: Path
    record: Path


def build_layers(
    plan: LayerPlan, venv: VenvLayout, compiler: BytecodeCompiler | None, job: LayerJob
) -> BuiltLayers:
    """The layers of ``plan``, bottom first: from the caches, or staged, compiled and tarred."""
    found = _lookup(plan, venv, compiler, job)
    layers, missing = found.layers, found.missing
    report = job.reporter
    for index, spec, _ in missing:
        report.step(f"layer {index + 1}/{len(plan.layers)}: {spec.description}")
    if job.fetch is not None and missing:
        job.fetch([wheel for _, spec, _ in missing for wheel in spec.wheels])
    if compiler is None or isinstance(compiler, HostCompiler):
        layers.update(_build_overlapped(missing, venv, compiler, job))
    else:
        layers.update(_build_in_phases(missing, venv, compiler, job))
    ordered = tuple(layers[index] for index in range(len(plan.layers)))
    if job.remote is not None:
        job.remote.keep(
            [(found.keys[i], layer) for i, layer in enumerate(ordered) if i not in found.remote],
            report,
        )
    return BuiltLayers(layers=ordered, built=len(missing))


class _Progress:
    """The three phases' counts, as layers move through them on several threads.

    The number of modules to compile is known once every layer is staged; until then the
    compile phase's total is reported as unknown.
    """

    def __init__(self, reporter: Reporter, layers: int) -> None:
        self._reporter, self._lock, self._layers = reporter, threading.Lock(), layers
        self._done = {"install": 0, "compile": 0, "compress": 0}
        self.modules = 0
        reporter.progress("install", 0, layers, "layers")
        reporter.progress("compress", 0, layers, "layers")

    def staged(self, modules: int) -> None:
        """One more layer staged, with ``modules`` sources to compile."""
        with self._lock:
            self.modules += modules
            self._bump("install", 1, self._layers)
            self._bump("compile", 0, self._modules_total())

    def compiled(self, modules: int) -> None:
        """``modules`` more sources compiled."""
        with self._lock:
            self._bump("compile", modules, self._modules_total())

    def tarred(self) -> None:
        """One more layer in the store."""
        with self._lock:
            self._bump("compress", 1, self._layers)

    def _modules_total(self) -> int | None:
        return self.modules if self._done["install"] == self._layers else None

    def _bump(self, task: str, count: int, total: int | None) -> None:
        self._done[task] += count
        self._reporter.progress(task, self._done[task], total, _UNITS[task])


_UNITS = {"install": "layers", "compile": "modules", "compress": "layers"}


def _build_overlapped(
    missing: Sequence[tuple[int, LayerSpec, Path]],
    venv: VenvLayout,
    compiler: HostCompiler | None,
    job: LayerJob,
) -> dict[int, Layer]:
    """Each missing layer staged, then compiled and tarred while the next ones are staged.

    Staging is Python that holds the GIL, so layers are staged one at a time, here; each
    staged layer is handed to a worker that compiles it (a subprocess) and tars it (mostly
    zlib and hashing, outside the GIL), so the other CPUs work while the next layer is
    staged instead of one phase waiting for the whole of another. The biggest layers go
    first, so none is left compressing alone at the end. A layer's bytes depend only on its
    own inputs: the order changes nothing.
    """
    if not missing:
        return {}
    progress = _Progress(job.reporter, len(missing))
    biggest_first = sorted(missing, key=lambda m: -sum(w.size or 0 for w in m[1].wheels))
    made: dict[int, Layer] = {}
    with ThreadPoolExecutor(
        max_workers=os.cpu_count() or 1, thread_name_prefix="imgbuild-layer"
    ) as pool:
        futures: list[Future[tuple[int, Layer]]] = []
        try:
            for index, spec, record in biggest_first:
                staged = _stage(index, spec, venv, record, job.work)
                sources = compile_sources(staged.staging, venv) if compiler and spec.wheels else []
                progress.staged(len(sources))
                futures.append(
                    pool.submit(_compile_and_tar, staged, sources, compiler, job, progress)
                )
            for future in as_completed(futures):
                index, layer = future.result()
                made[index] = layer
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if progress.modules:
        job.reporter.step(f"compile: {progress.modules} modules, layer by layer")
    return made


def _compile_and_tar(
    staged: _Staged,
    sources: Sources,
    compiler: HostCompiler | None,
    job: LayerJob,
    progress: _Progress,
) -> tuple[int, Layer]:
    """A staged layer's bytecode (one process of its own), then its blob and cache record."""
    if compiler is not None and sources:
        # One process per layer: the layers compiled side by side already fill the CPUs.
        compiler.compile(staged.staging, [sources], jobs=1)
        progress.compiled(len(sources))
    layer = _finish(staged, job)
    progress.tarred()
    return staged.index, layer


def _build_in_phases(
    missing: Sequence[tuple[int, LayerSpec, Path]],
    venv: VenvLayout,
    compiler: BytecodeCompiler,
    job: LayerJob,
) -> dict[int, Layer]:
    """Stage every missing layer, compile them in one compiler run, then tar them.

    For a compiler that is costly to start (a container in the engine): one run for all.
    """
    report = job.reporter
    pending: list[_Staged] = []
    for done, (index, spec, record) in enumerate(missing):
        report.progress("install", done, len(missing), "layers")
        pending.append(_stage(index, spec, venv, record, job.work))
    if missing:
        report.progress("install", len(missing), len(missing), "layers")
    _compile(pending, venv, compiler, job)
    made: dict[int, Layer] = {}
    # Tarring and compressing is mostly zlib and hashing, which run outside the GIL: the
    # layers are written side by side, one per CPU.
    with ThreadPoolExecutor(
        max_workers=os.cpu_count() or 1, thread_name_prefix="imgbuild-tar"
    ) as pool:
        finished = pool.map(lambda s: _finish(s, job), pending)
        for done, (staged, layer) in enumerate(zip(pending, finished, strict=True)):
            report.progress("compress", done, len(pending), "layers")
            made[staged.index] = layer
    if pending:
        report.progress("compress", len(pending), len(pending), "layers")
    return made


@dataclass(frozen=True, kw_only=True, slots=True)
class _Found:
    layers: dict[int, Layer]
    """Layers found in the local or the registry cache, by position."""
    missing: list[tuple[int, LayerSpec, Path]]
    """The others: position, spec, and where their record goes."""
    keys: dict[int, str]
    """Every layer's cache key, by position."""
    remote: frozenset[int]
    """Positions found in the registry cache."""


def _lookup(
    plan: LayerPlan, venv: VenvLayout, compiler: BytecodeCompiler | None, job: LayerJob
) -> _Found:
    """Each planned layer in the local cache, else in the registry cache, else missing.

    The registry is asked about several layers at once (each answer is a manifest and a
    blob), as a runner with an empty local cache asks about all of them.
    """
    keys: dict[int, str] = {}
    records: dict[int, Path] = {}
    layers: dict[int, Layer] = {}
    for index, spec in enumerate(plan.layers):
        compiled_by = compiler.identity if compiler is not None and spec.wheels else None
        keys[index] = key = layer_key(spec, venv, compiled_by, job.mtime, layer_format=LAYER_FORMAT)
        records[index] = job.records / f"{key}.json"
        cached = _cached(records[index], job.store)
        if cached is not None:
            layers[index] = cached
    asked = [index for index in keys if index not in layers]
    remote: set[int] = set()
    if job.remote is not None and asked:
        finder = job.remote
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="imgbuild-find") as pool:
            answers = pool.map(lambda i: finder.find(keys[i]), asked)
            for index, found in zip(asked, answers, strict=True):
                if found is not None:
                    _write_record(records[index], found)
                    layers[index] = found
                    remote.add(index)
    missing = [(i, plan.layers[i], records[i]) for i in keys if i not in layers]
    return _Found(layers=layers, missing=missing, keys=keys, remote=frozenset(remote))


def _cached(record: Path, store: BlobStore) -> Layer | None:
    """The layer a record names, if its blob is still in the store."""
    if not record.is_file():
        return None
    data = json.loads(record.read_text(encoding="utf-8"))
    return Layer(**data) if store.has(data["digest"]) else None


def _stage(index: int, spec: LayerSpec, venv: VenvLayout, record: Path, work: Path) -> _Staged:
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
    return _Staged(index=index, spec=spec, staging=staging, record=record)


def _compile(
    pending: list[_Staged], venv: VenvLayout, compiler: BytecodeCompiler | None, job: LayerJob
) -> None:
    """One compiler run for every new layer (one container), each layer a group of its own."""
    groups = [compile_sources(s.staging, venv) for s in pending if s.spec.wheels]
    groups = [group for group in groups if group]
    modules = sum(len(group) for group in groups)
    if compiler is not None and groups:
        job.reporter.step(f"compile: {modules} modules")
        # One compiler run: its progress is its start and its end.
        job.reporter.progress("compile", 0, modules, "modules")
        compiler.compile(job.work / "layers", groups)
        job.reporter.progress("compile", modules, modules, "modules")


def _finish(staged: _Staged, job: LayerJob) -> Layer:
    """Tar a staged tree into the store and record it in the layer cache."""
    layer = build_layer(
        staged.staging, job.store, mtime=job.mtime, created_by=staged.spec.description
    )
    shutil.rmtree(staged.staging)
    _write_record(staged.record, layer)
    return layer


def _write_record(record: Path, layer: Layer) -> None:
    """Remember ``layer`` under its key in the local layer cache."""
    write_json(record, layer_json(layer))


def layer_json(layer: Layer) -> dict[str, object]:
    """A layer as its cache record keeps it (``Layer(**record)`` reads it back)."""
    return {
        "digest": layer.digest,
        "diff_id": layer.diff_id,
        "size": layer.size,
        "media_type": layer.media_type,
        "created_by": layer.created_by,
    }

"""Building a platform's layers over the layer cache.

Each planned layer is looked up by the key of what goes into it (``install.keys``); only
the missing ones are staged, compiled (in one compiler run for all of them) and tarred.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from imagebuild.image.model import Layer
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import LAYER_FORMAT
from imagebuild.install.keys import layer_key
from imagebuild.install.layers import (
    BytecodeCompiler,
    HostCompiler,
    VenvLayout,
    compile_sources,
)
from imagebuild.pipeline.layerwork import (
    LayerTask,
    finish_layer,
    make_layer,
    read_layer_record,
    stage_layer,
    worker_context,
    write_layer_record,
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

    @property
    def keeps(self) -> bool:
        """Whether the ``keep`` methods keep anything (a repository to keep in is named)."""
        ...

    def ask(self, keys: Sequence[str]) -> None:
        """Start looking for ``keys``: a later ``find`` of one of them takes that answer."""
        ...

    def find(self, key: str) -> Layer | None:
        """The layer kept under ``key`` (its blob fetched into the store), or None."""
        ...

    def keep(self, kept: Sequence[tuple[str, Layer]], reporter: Reporter) -> None:
        """Keep these layers under their keys."""
        ...

    def keep_set(self, layers: Sequence[tuple[str, Layer]]) -> None:
        """Keep a plan's layers (kept each under its key) as one set, for ``ask``."""
        ...

    def find_record(self, key: str) -> bytes | None:
        """A record kept under ``key`` (a cache record: an ELF scan, an SBOM), or None."""
        ...

    def keep_record(self, key: str, data: bytes) -> None:
        """Keep the record ``data`` under ``key``."""
        ...

    def find_file(self, key: str, media_type: str) -> Path | None:
        """A file of ``media_type`` kept under ``key`` (fetched into the store), or None."""
        ...

    def keep_file(self, key: str, media_type: str, make: Callable[[Path], None]) -> None:
        """Keep the file ``make`` writes at the path it is given, unless one is kept."""
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
    plan: LayerPlan,
    venv: VenvLayout,
    compiler: BytecodeCompiler | None,
    job: LayerJob,
    *,
    building: Callable[[], None] | None = None,
) -> BuiltLayers:
    """The layers of ``plan``, bottom first: from the caches, or staged, compiled and tarred.

    ``building`` is called once some layer is found in no cache, before any is made.
    """
    found = _lookup(plan, venv, compiler, job)
    layers, missing = found.layers, found.missing
    if missing and building is not None:
        building()
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
        job.remote.keep_set([(found.keys[i], layer) for i, layer in enumerate(ordered)])
    return BuiltLayers(layers=ordered, built=len(missing))


class _Progress:
    """The three phases' counts, as layers come back from the workers.

    A worker stages, compiles and tars a layer in one go: each layer counts in all three
    phases when it comes back. How many modules there are is known once every layer has.
    """

    def __init__(self, reporter: Reporter, layers: int) -> None:
        self._reporter, self._layers, self._done, self.modules = reporter, layers, 0, 0
        for task, unit in (("install", "layers"), ("compile", "modules"), ("compress", "layers")):
            reporter.progress(task, 0, layers if unit == "layers" else None, unit)

    def made(self, modules: int) -> None:
        """One more layer back, with ``modules`` sources compiled."""
        self._done += 1
        self.modules += modules
        last = self._done == self._layers
        self._reporter.progress("install", self._done, self._layers, "layers")
        self._reporter.progress("compile", self.modules, self.modules if last else None, "modules")
        self._reporter.progress("compress", self._done, self._layers, "layers")


def _build_overlapped(
    missing: Sequence[tuple[int, LayerSpec, Path]],
    venv: VenvLayout,
    compiler: HostCompiler | None,
    job: LayerJob,
) -> dict[int, Layer]:
    """Each missing layer made by a worker process: staged, compiled and tarred there.

    Workers run side by side, one per CPU and one more (a worker waiting for its compile
    server leaves its CPU to another); the biggest layers go first, so none is left running
    alone at the end (``pipeline.layerwork``).
    """
    if not missing:
        return {}
    progress = _Progress(job.reporter, len(missing))
    biggest_first = sorted(missing, key=lambda m: -sum(w.size or 0 for w in m[1].wheels))
    tasks = [
        LayerTask(
            index=index,
            spec=spec,
            venv=venv,
            compiler=compiler,
            store=job.store.root,
            record=record,
            work=job.work,
            mtime=job.mtime,
        )
        for index, spec, record in biggest_first
    ]
    made: dict[int, Layer] = {}
    if len(tasks) == 1:  # a code change: starting a worker would cost more than it saves
        answer = make_layer(tasks[0], in_worker=False)
        progress.made(answer.modules)
        return {answer.index: answer.layer}
    # (imported here: its module imports multiprocessing's, which a code change never uses)
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(tasks), (os.cpu_count() or 1) + 1)
    with ProcessPoolExecutor(max_workers=workers, mp_context=worker_context()) as pool:
        futures = [pool.submit(make_layer, task) for task in tasks]
        try:
            for future in as_completed(futures):
                answer = future.result()
                made[answer.index] = answer.layer
                progress.made(answer.modules)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if progress.modules:
        job.reporter.step(f"compile: {progress.modules} modules, layer by layer")
    return made


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
    keys = _keys(plan, venv, compiler.identity if compiler is not None else None, job)
    records = {index: job.records / f"{key}.json" for index, key in keys.items()}
    layers: dict[int, Layer] = {}
    for index, record in records.items():
        cached = read_layer_record(record, job.store)
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
                    write_layer_record(records[index], found)
                    layers[index] = found
                    remote.add(index)
    missing = [(i, plan.layers[i], records[i]) for i in keys if i not in layers]
    return _Found(layers=layers, missing=missing, keys=keys, remote=frozenset(remote))


def look_ahead(plan: LayerPlan, venv: VenvLayout, compiled_by: str | None, job: LayerJob) -> None:
    """Ask the registry cache now for the layers of ``plan`` the local cache lacks.

    They are keyed as if compiled by ``compiled_by``: the compiler expected, before it is
    ready. A runner with an empty local cache then fetches them while the base's Python is
    unpacked. A guess that proves wrong costs only those lookups.
    """
    if job.remote is None:
        return
    keys = _keys(plan, venv, compiled_by, job)
    job.remote.ask([key for key in keys.values() if not (job.records / f"{key}.json").is_file()])


def _keys(
    plan: LayerPlan, venv: VenvLayout, compiled_by: str | None, job: LayerJob
) -> dict[int, str]:
    """Each planned layer's cache key, by position (a layer with no wheels has no bytecode)."""
    return {
        index: layer_key(
            spec,
            venv,
            compiled_by if spec.wheels else None,
            job.mtime,
            layer_format=LAYER_FORMAT,
        )
        for index, spec in enumerate(plan.layers)
    }


def _stage(index: int, spec: LayerSpec, venv: VenvLayout, record: Path, work: Path) -> _Staged:
    staging = stage_layer(index, spec, venv, work)
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
    return finish_layer(staged.staging, staged.spec, job.store, staged.record, job.mtime)

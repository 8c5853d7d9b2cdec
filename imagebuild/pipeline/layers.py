"""Building a platform's layers over the layer cache.

Each planned layer is looked up by the key of what goes into it (``install.keys``); only
the missing ones are staged, compiled (in one compiler run for all of them) and tarred.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    VenvLayout,
    compile_sources,
    install_wheel,
    stage_venv,
)

if TYPE_CHECKING:
    from imagebuild.install.plan import LayerPlan, LayerSpec
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


class RemoteLayers(Protocol):
    """Layers kept in a registry by cache key (``pipeline.remotecache.RegistryLayerCache``)."""

    def find(self, key: str) -> Layer | None:
        """The layer kept under ``key`` (its blob fetched into the store), or None."""
        ...

    def keep(self, kept: Sequence[tuple[str, Layer]], reporter: Reporter) -> None:
        """Keep these layers under their keys."""
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
    pending: list[_Staged] = []
    for done, (index, spec, record) in enumerate(missing):
        report.progress("install", done, len(missing), "layers")
        report.step(f"layer {index + 1}/{len(plan.layers)}: {spec.description}")
        pending.append(_stage(index, spec, venv, record, job.work))
    if missing:
        report.progress("install", len(missing), len(missing), "layers")
    _compile(pending, venv, compiler, job)
    # Tarring and compressing is mostly zlib and hashing, which run outside the GIL: the
    # layers are written side by side, one per CPU.
    with ThreadPoolExecutor(
        max_workers=os.cpu_count() or 1, thread_name_prefix="imgbuild-tar"
    ) as pool:
        finished = pool.map(lambda s: _finish(s, job), pending)
        for done, (staged, layer) in enumerate(zip(pending, finished, strict=True)):
            report.progress("compress", done, len(pending), "layers")
            layers[staged.index] = layer
    if pending:
        report.progress("compress", len(pending), len(pending), "layers")
    ordered = tuple(layers[index] for index in range(len(plan.layers)))
    if job.remote is not None:
        job.remote.keep(
            [(found.keys[i], layer) for i, layer in enumerate(ordered) if i not in found.remote],
            report,
        )
    return BuiltLayers(layers=ordered, built=len(pending))


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
    """Each planned layer in the local cache, else in the registry cache, else missing."""
    layers: dict[int, Layer] = {}
    missing: list[tuple[int, LayerSpec, Path]] = []
    keys: dict[int, str] = {}
    remote: set[int] = set()
    for index, spec in enumerate(plan.layers):
        compiled_by = compiler.identity if compiler is not None and spec.wheels else None
        keys[index] = key = layer_key(spec, venv, compiled_by, job.mtime, layer_format=LAYER_FORMAT)
        record = job.records / f"{key}.json"
        cached = _cached(record, job.store)
        if cached is None and job.remote is not None:
            cached = job.remote.find(key)
            if cached is not None:
                _write_record(record, cached)
                remote.add(index)
        if cached is not None:
            layers[index] = cached
        else:
            missing.append((index, spec, record))
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
    return _Staged(index=index, spec=spec, staging=staging, record=record)


def _compile(
    pending: list[_Staged], venv: VenvLayout, compiler: BytecodeCompiler | None, job: LayerJob
) -> None:
    """One compiler run for every new layer: with the base's own Python, one container."""
    sources = [f for s in pending if s.spec.wheels for f in compile_sources(s.staging, venv)]
    if compiler is not None and sources:
        job.reporter.step(f"compile: {len(sources)} modules")
        # One compiler run: its progress is its start and its end.
        job.reporter.progress("compile", 0, len(sources), "modules")
        compiler.compile(job.work / "layers", sources)
        job.reporter.progress("compile", len(sources), len(sources), "modules")


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

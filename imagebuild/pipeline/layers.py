"""Building a platform's layers over the layer cache.

Each planned layer is looked up by the key of what goes into it (``install.keys``); only
the missing ones are staged, compiled (in one compiler run for all of them) and tarred.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.cache import write_json
from imagebuild.image.model import Layer
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
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
    """The layers of ``plan``, bottom first: from the cache, or staged, compiled and tarred."""
    layers: dict[int, Layer] = {}
    missing: list[tuple[int, LayerSpec, Path]] = []
    for index, spec in enumerate(plan.layers):
        compiled_by = compiler.identity if compiler is not None and spec.wheels else None
        record = job.records / f"{layer_key(spec, venv, compiled_by, job.mtime)}.json"
        cached = _cached(record, job.store)
        if cached is not None:
            layers[index] = cached
        else:
            missing.append((index, spec, record))
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
    return BuiltLayers(
        layers=tuple(layers[index] for index in range(len(plan.layers))), built=len(pending)
    )


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
    write_json(
        staged.record,
        {
            "digest": layer.digest,
            "diff_id": layer.diff_id,
            "size": layer.size,
            "media_type": layer.media_type,
            "created_by": layer.created_by,
        },
    )
    return layer

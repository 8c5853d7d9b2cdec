"""``run_plan``: the layers a build would make, their packages and sizes, and which are cached.

What ``imgbuild plan`` shows, without building anything: the lock is read (made first if
there is none, as a build would), the base pulled and read, the packages for the target
selected and planned exactly as a build plans them. Sizes are the wheels' as the lock
records them; a layer counts as cached when the local layer cache holds its key. Layers
whose key depends on a wheel not built yet (the project, local packages, sdists) are
decided at build time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imagebuild.cache import CacheLayout
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import LAYER_FORMAT
from imagebuild.install.keys import layer_key
from imagebuild.install.layers import VenvLayout
from imagebuild.install.plan import LayerPlan, LayerSpec, PlannedWheel, plan_layers
from imagebuild.lock.model import LockedPackage
from imagebuild.lock.select import select_packages, sort_sources
from imagebuild.pipeline.bases import base_facts, target_of
from imagebuild.pipeline.build import base_source, find_build_lock, open_project
from imagebuild.pipeline.layerwork import read_layer_record
from imagebuild.pipeline.ports import Ports
from imagebuild.pipeline.requests import BuildRequest
from imagebuild.pipeline.stdlib import stdlib_layers
from imagebuild.sinks.daemon import engine_base_tag


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannedLayer:
    """One layer of the plan."""

    position: int
    """Its place in imgbuild's stack, 1 at the bottom (the base's layers come before)."""
    kind: str
    """``venv``, ``dependency``, ``dependencies``, ``local`` or ``project``."""
    packages: tuple[str, ...]
    """``name version`` of each package in it."""
    size: int | None
    """The wheels' bytes as locked (None when one is built from source)."""
    cached: bool | None
    """Whether the local layer cache holds it; None: only known once it is built."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanResult:
    """The plan for one platform."""

    platform: str
    """``os/arch``."""
    base_layers: int
    """Layers of the base (and of its standard library's bytecode), counted against
    ``max_layers``."""
    max_layers: int
    """The budget (``[tool.imgbuild] max-layers``)."""
    layers: tuple[PlannedLayer, ...]
    """imgbuild's layers, bottom first."""

    def table_lines(self) -> list[str]:
        """A table for people: one line a layer."""
        total = self.base_layers + len(self.layers)
        lines = [
            f"{self.platform}: {len(self.layers)} layers on {self.base_layers} "
            f"(base), {total} of at most {self.max_layers}",
            f"{'#':>3}  {'kind':<12}  {'size':>10}  {'cached':<6}  packages",
        ]
        for layer in self.layers:
            size = "?" if layer.size is None else human_size(layer.size)
            cached = {True: "yes", False: "no", None: "-"}[layer.cached]
            packages = ", ".join(layer.packages) or "(venv skeleton)"
            lines.append(
                f"{layer.position:>3}  {layer.kind:<12}  {size:>10}  {cached:<6}  {packages}"
            )
        return lines

    def to_json(self) -> str:
        """The plan as JSON (``--format json``), keys sorted."""
        return json.dumps(
            {
                "platform": self.platform,
                "base_layers": self.base_layers,
                "max_layers": self.max_layers,
                "layers": [
                    {
                        "position": layer.position,
                        "kind": layer.kind,
                        "packages": list(layer.packages),
                        "size": layer.size,
                        "cached": layer.cached,
                    }
                    for layer in self.layers
                ],
            },
            indent=2,
            sort_keys=True,
        )


def run_plan(request: BuildRequest, *, ports: Ports) -> PlanResult:
    """Plan the first platform's layers of ``request`` as ``run_build`` would."""
    found = open_project(request, ports)
    lock = find_build_lock(request, found, ports)
    cache = CacheLayout(request.cache_dir)
    store = BlobStore(cache.blobs)
    pinned = dict(lock.recorded.bases) if lock.recorded is not None else {}
    base = base_source(found, pinned, request, lock, ports, store)
    platform = request.platforms[0]
    arch = platform.partition("/")[2]
    image = base.image(ports.registry, arch, store)
    facts = base_facts(image, store, request.cache_dir, arch, base.entry)
    target = target_of(arch, facts)
    settings = found.settings
    packages = select_packages(
        lock,
        root=found.project.name,
        target=target,
        extras=set(settings.extras),
        groups=set(settings.groups),
    )
    chosen, from_sdist, local = sort_sources(packages, target)
    wheels = [
        PlannedWheel(
            name=pkg.name,
            version=str(pkg.version),
            path=Path(wheel.filename),
            size=wheel.size or 0,
            sha256=wheel.sha256,
        )
        for pkg, wheel in chosen
    ]
    built = [_from_source(pkg) for pkg in (*from_sdist, *local)]
    project = found.project
    stdlib = stdlib_layers(base.built is not None, request.compile_bytecode)
    plan = plan_layers(
        [*wheels, *built[: len(from_sdist)]],
        PlannedWheel(name=project.name, version=str(project.version or ""), path=project.root),
        local=built[len(from_sdist) :],
        max_layers=settings.max_layers,
        base_layers=len(image.layers) + stdlib,
    )
    venv = VenvLayout(base_interpreter=facts.interpreter, python_version=facts.python_version)
    compiled = (
        f"image:{engine_base_tag(image.manifest_digest)}:{facts.interpreter}"
        if request.compile_bytecode
        else None
    )
    keyed = _Keyed(venv=venv, compiled=compiled, mtime=request.source_date_epoch, cache=cache)
    return PlanResult(
        platform=platform,
        base_layers=len(image.layers) + stdlib,
        max_layers=settings.max_layers,
        layers=_layers(plan, keyed, store),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Keyed:
    venv: VenvLayout
    compiled: str | None
    mtime: int
    cache: CacheLayout


def _from_source(pkg: LockedPackage) -> PlannedWheel:
    """A package built at build time: its wheel's digest (and so its layer key) is not known."""
    return PlannedWheel(name=pkg.name, version=str(pkg.version), path=Path(pkg.name), size=0)


def _layers(plan: LayerPlan, keyed: _Keyed, store: BlobStore) -> tuple[PlannedLayer, ...]:
    return tuple(
        PlannedLayer(
            position=position,
            kind=spec.kind,
            packages=tuple(f"{w.name} {w.version}" for w in spec.wheels),
            size=sum(w.size for w in spec.wheels) if _known(spec) else None,
            cached=_cached(spec, keyed, store) if _known(spec) else None,
        )
        for position, spec in enumerate(plan.layers, start=1)
    )


def _known(spec: LayerSpec) -> bool:
    """Whether every wheel of the layer is a locked file (so its key can be worked out)."""
    return spec.kind != "project" and all(w.sha256 is not None for w in spec.wheels)


def _cached(spec: LayerSpec, keyed: _Keyed, store: BlobStore) -> bool:
    compiled = keyed.compiled if spec.wheels else None
    key = layer_key(spec, keyed.venv, compiled, keyed.mtime, layer_format=LAYER_FORMAT)
    return read_layer_record(keyed.cache.layers / f"{key}.json", store) is not None


def human_size(size: int) -> str:
    """``size`` bytes as people read them: 512 B, 3.4 KiB, 120.0 MiB, 1.2 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"

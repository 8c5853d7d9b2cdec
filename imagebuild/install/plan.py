"""Layer planning: which wheels go into which layer, in which order (a pure function).

The plan is made to survive change. A registry stores layers by digest and an engine keeps
the layers it already has, so a rebuild costs only the layers whose contents changed; the
planner's job is to make one package's change touch as few layers as possible, however
large the lock:

- the venv skeleton comes first (it changes only with the base's Python);
- a big wheel (``big`` bytes or more) gets a layer of its own: its bytes dominate a push,
  and they are re-sent only when it changes;
- every other wheel goes to one of a fixed number of shared layers, chosen by a hash of its
  name alone. Adding, removing or bumping a small package changes its own shared layer and
  nothing else; a package whose bump carries it across ``big`` changes two (the shared layer
  it leaves and the one it gets). Grouping by position in a sorted list would not do this:
  one insertion shifts every group after it;
- workspace members and path dependencies (built from source, changing more often than
  indexed packages) come next, one layer each, then the project alone on top, since it
  changes on every commit.

The number of shared layers depends only on the budget (``max_layers`` less the base's
layers, the venv, the local packages and the project), never on how many packages there are,
so it too stays put as the lock grows. Engines refuse images deeper than 127 layers; the
default budget stays well below that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imagebuild.digest import Digest
from imagebuild.errors import LayerError

DEFAULT_MAX_LAYERS = 100
"""Layers in the whole image, the base's included (engines stop at 127)."""
BIG_WHEEL = 1 << 20
"""A wheel of this many bytes or more gets a layer of its own."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannedWheel:
    """A wheel to install, with the name and version it came from."""

    name: str
    """Canonical distribution name."""
    version: str
    """Version string as locked."""
    path: Path
    """The wheel file on the build host (in the cache)."""
    size: int = 0
    """The wheel's size in bytes (what decides whether it gets a layer of its own)."""
    sha256: Digest | None = None
    """The wheel's digest when already known (the lock's, checked on download)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerSpec:
    """One layer to build."""

    kind: str
    """``venv``, ``dependency`` (one wheel), ``dependencies`` (a shared layer), ``local`` or
    ``project``."""
    wheels: tuple[PlannedWheel, ...]
    """Wheels installed into this layer, sorted by name."""
    files: tuple[tuple[PurePosixPath, bytes], ...] = ()
    """Files written into the layer beside the wheels: path in the image, bytes (the SBOM)."""

    @property
    def description(self) -> str:
        """A short line for the image history (``created_by``)."""
        if self.kind == "venv":
            return "imgbuild: virtual environment"
        listed = ", ".join(f"{w.name} {w.version}" for w in self.wheels)
        return f"imgbuild: {self.kind} {listed}"


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerPlan:
    """All layers imgbuild adds on top of the base, bottom first."""

    layers: tuple[LayerSpec, ...]
    """In the order they are stacked."""


def plan_layers(
    dependencies: Sequence[PlannedWheel],
    project: PlannedWheel | None,
    *,
    local: Sequence[PlannedWheel] = (),
    max_layers: int = DEFAULT_MAX_LAYERS,
    base_layers: int = 0,
    big: int = BIG_WHEEL,
    project_later: bool = False,
) -> LayerPlan:
    """Plan the venv, dependency, local-package and project layers within ``max_layers``.

    ``base_layers`` is how many layers the base image already has: they count against
    ``max_layers`` too. With ``project_later``, the project's layer is counted in the
    budget but left out of the plan: it is added on top once its wheel is built. Raises
    ``LayerError`` when the budget leaves no room for the dependencies.
    """
    members = sorted(local, key=lambda w: w.name)
    fixed = 1 + len(members) + (project is not None or project_later)
    budget = max_layers - base_layers - fixed
    if budget < 1:
        raise LayerError(
            f"max-layers {max_layers} leaves no room for the dependencies: the base has "
            f"{base_layers} layers and imgbuild needs {fixed} more for the venv, local "
            "packages and the project",
            hint="raise [tool.imgbuild] max-layers (engines allow up to 127)",
        )
    alone_slots, shared_slots = _split_budget(budget)
    alone, shared = _sort_by_size(dependencies, big=big, slots=alone_slots)
    layers = [LayerSpec(kind="venv", wheels=())]
    layers.extend(LayerSpec(kind="dependency", wheels=(wheel,)) for wheel in alone)
    layers.extend(_shared_layers(shared, shared_slots))
    layers.extend(LayerSpec(kind="local", wheels=(member,)) for member in members)
    if project is not None:
        layers.append(LayerSpec(kind="project", wheels=(project,)))
    return LayerPlan(layers=tuple(layers))


SHARED_LAYERS = 32
"""Shared layers for small wheels, at most (fewer when the budget is tight)."""


def _split_budget(budget: int) -> tuple[int, int]:
    """Layers for big wheels alone, and shared ones (at most half, at least one).

    With the default budget, 32 shared layers hold a few small wheels each even in a lock of
    300, and 66 big wheels can have a layer each: more than the largest data-science locks
    have over 1 MiB.
    """
    shared = max(1, min(SHARED_LAYERS, (budget + 1) // 2))
    return budget - shared, shared


def _sort_by_size(
    dependencies: Sequence[PlannedWheel], *, big: int, slots: int
) -> tuple[list[PlannedWheel], list[PlannedWheel]]:
    """Big wheels that get a layer each (in name order), and the rest.

    Name order, not size order: a bump that changes a wheel's size must not move it past
    its neighbours. When more wheels are big than there are slots, the largest keep a
    layer of their own and the others share (then a change can touch a third layer).
    """
    by_size = sorted(dependencies, key=lambda w: (-w.size, w.name, w.version))
    chosen = {id(w) for w in [w for w in by_size if w.size >= big][:slots]}
    by_name = sorted(dependencies, key=lambda w: (w.name, w.version))
    return [w for w in by_name if id(w) in chosen], [w for w in by_name if id(w) not in chosen]


def _shared_layers(wheels: Sequence[PlannedWheel], slots: int) -> list[LayerSpec]:
    """Small wheels in ``slots`` shared layers by a hash of their name; empty ones dropped."""
    groups: dict[int, list[PlannedWheel]] = {}
    for wheel in wheels:
        groups.setdefault(_slot(wheel.name, slots), []).append(wheel)
    layers = []
    for slot in sorted(groups):
        members = tuple(sorted(groups[slot], key=lambda w: (w.name, w.version)))
        kind = "dependency" if len(members) == 1 else "dependencies"
        layers.append(LayerSpec(kind=kind, wheels=members))
    return layers


def _slot(name: str, slots: int) -> int:
    """A package's shared layer: from its name only, so a new version stays where it was."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % slots

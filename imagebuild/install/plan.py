"""Layer planning: which wheels go into which layer, in which order.

The order is chosen for caching: the venv skeleton first (it changes only with the base's
Python), then the locked dependencies, then the project's own wheel, which changes on
every commit and so sits alone in the last layer. A dependency layer's bytes depend only
on its wheels and the target, so its digest survives any change to other packages and a
rebuild re-pushes only what changed.

Each dependency gets a layer of its own until the image would pass ``max_layers``
(overlayfs stacks at most 128); beyond that, neighbouring packages in name order share
layers, so adding one package disturbs as few layers as possible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_LAYERS = 100


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannedWheel:
    """A wheel to install, with the name and version it came from."""

    name: str
    """Canonical distribution name."""
    version: str
    """Version string as locked."""
    path: Path
    """The wheel file on the build host (in the cache)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerSpec:
    """One layer to build."""

    kind: str
    """``venv``, ``dependency``/``dependencies``, ``local`` or ``project``."""
    wheels: tuple[PlannedWheel, ...]
    """Wheels installed into this layer, sorted by name."""

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
) -> LayerPlan:
    """Plan the venv, dependency, local-package and project layers (pure).

    ``local`` are workspace members and path dependencies: built from source like the
    project, they change more often than indexed packages and less often than the project,
    so each gets a layer between the two.
    """
    deps = sorted(dependencies, key=lambda w: (w.name, w.version))
    members = sorted(local, key=lambda w: w.name)
    budget = max(1, max_layers - 2 - len(members))
    per_layer = max(1, math.ceil(len(deps) / budget))
    layers = [LayerSpec(kind="venv", wheels=())]
    for start in range(0, len(deps), per_layer):
        chunk = tuple(deps[start : start + per_layer])
        layers.append(
            LayerSpec(kind="dependency" if per_layer == 1 else "dependencies", wheels=chunk)
        )
    layers.extend(LayerSpec(kind="local", wheels=(member,)) for member in members)
    if project is not None:
        layers.append(LayerSpec(kind="project", wheels=(project,)))
    return LayerPlan(layers=tuple(layers))

"""Layer planning: order for caching, big wheels alone, small ones in stable shared layers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from imagebuild.errors import LayerError
from imagebuild.install.plan import BIG_WHEEL, LayerPlan, PlannedWheel, plan_layers

MIB = 1 << 20


def _wheel(name: str, version: str = "1.0", size: int = 1000) -> PlannedWheel:
    return PlannedWheel(name=name, version=version, path=Path(f"/cache/{name}.whl"), size=size)


def _changed(before: LayerPlan, after: LayerPlan) -> int:
    """Layers of ``after`` that ``before`` does not have (what a push would send)."""
    return len(set(after.layers) - set(before.layers))


def test_venv_first_big_wheels_alone_project_last() -> None:
    deps = [_wheel("zeta"), _wheel("numpy", size=16 * MIB), _wheel("alpha"), _wheel("mid")]
    plan = plan_layers(deps, _wheel("app", "0.1"), local=[_wheel("member")])
    kinds = [layer.kind for layer in plan.layers]
    assert kinds[0] == "venv" and kinds[-2:] == ["local", "project"]
    assert plan.layers[1].wheels == (deps[1],)  # the big one, alone, right above the venv
    installed = sorted(w.name for layer in plan.layers[2:-2] for w in layer.wheels)
    assert installed == ["alpha", "mid", "zeta"]
    assert plan.layers[-1].description == "imgbuild: project app 0.1"


def test_a_version_bump_keeps_a_package_in_its_layer() -> None:
    deps = [_wheel(f"pkg{i}") for i in range(40)]
    before = plan_layers(deps, _wheel("app"))
    after = plan_layers([*deps[:7], _wheel("pkg7", "2.0"), *deps[8:]], _wheel("app"))
    assert _changed(before, after) == 1
    assert len(before.layers) == len(after.layers)


def test_the_base_counts_against_the_budget() -> None:
    deps = [_wheel(f"pkg{i}", size=2 * MIB) for i in range(200)]
    plan = plan_layers(deps, _wheel("app"), max_layers=100, base_layers=30)
    assert len(plan.layers) + 30 <= 100
    installed = sorted(w.name for layer in plan.layers[1:-1] for w in layer.wheels)
    assert installed == sorted(w.name for w in deps)


def test_a_budget_with_no_room_is_one_clear_error() -> None:
    with pytest.raises(LayerError) as caught:
        plan_layers([_wheel("a")], _wheel("app"), max_layers=10, base_layers=8)
    assert "max-layers 10" in str(caught.value) and "the base has 8 layers" in str(caught.value)


def _generated_lock(rng: random.Random, count: int) -> dict[str, PlannedWheel]:
    """A lock like a data team's: mostly small wheels, a tail of big compiled ones."""
    wheels = {}
    for i in range(count):
        name = f"pkg-{rng.randrange(10**6):06d}-{i}"
        size = int(rng.lognormvariate(11.5, 2))  # median ~100 KB, one in eight over 1 MiB
        wheels[name] = _wheel(name, f"1.{rng.randrange(50)}", size)
    return wheels


def _mutate(rng: random.Random, wheels: dict[str, PlannedWheel], step: int) -> str:
    """Bump, add or remove one package (a bump may change its size across the threshold)."""
    action = rng.choice(("bump", "add", "remove"))
    if action == "add":
        name = f"new-{step}"
        wheels[name] = _wheel(name, "1.0", int(rng.lognormvariate(11.5, 2)))
    elif action == "remove":
        del wheels[rng.choice(sorted(wheels))]
    else:
        old = wheels[name := rng.choice(sorted(wheels))]
        size = old.size if rng.random() < 0.7 else int(rng.lognormvariate(11.5, 2))
        wheels[name] = _wheel(name, old.version + ".1", size)
    return action


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    ("max_layers", "base_layers", "bound"),
    [
        (100, 0, 2),
        (100, 12, 2),
        # More big wheels than layers for them: the largest keep theirs, so a new big
        # wheel can push a smaller one into a shared layer (a third layer changes).
        (40, 5, 3),
    ],
)
def test_one_change_to_a_300_package_lock_touches_at_most_two_layers(
    seed: int, max_layers: int, base_layers: int, bound: int
) -> None:
    rng = random.Random(seed)
    wheels = _generated_lock(rng, 300)
    assert any(w.size >= BIG_WHEEL for w in wheels.values())
    project = _wheel("app")
    plan = plan_layers(
        list(wheels.values()), project, max_layers=max_layers, base_layers=base_layers
    )
    for step in range(60):
        action = _mutate(rng, wheels, step)
        after = plan_layers(
            list(wheels.values()), project, max_layers=max_layers, base_layers=base_layers
        )
        assert len(after.layers) + base_layers <= max_layers
        changed = _changed(plan, after)
        assert 1 <= changed <= bound or (action == "remove" and changed == 0), (step, action)
        installed = sorted(w.name for layer in after.layers[1:-1] for w in layer.wheels)
        assert installed == sorted(wheels)
        plan = after

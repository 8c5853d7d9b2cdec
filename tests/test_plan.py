"""Layer planning: order for caching, one layer per package, bucketing past the limit."""

from __future__ import annotations

from pathlib import Path

from imagebuild.install.plan import PlannedWheel, plan_layers


def _wheel(name: str, version: str = "1.0") -> PlannedWheel:
    return PlannedWheel(name=name, version=version, path=Path(f"/cache/{name}.whl"))


def test_venv_then_sorted_dependencies_then_project() -> None:
    plan = plan_layers([_wheel("zeta"), _wheel("alpha"), _wheel("mid")], _wheel("app", "0.1"))
    kinds = [layer.kind for layer in plan.layers]
    assert kinds == ["venv", "dependency", "dependency", "dependency", "project"]
    names = [[w.name for w in layer.wheels] for layer in plan.layers]
    assert names == [[], ["alpha"], ["mid"], ["zeta"], ["app"]]
    assert plan.layers[-1].description == "imgbuild: project app 0.1"


def test_adding_a_package_leaves_other_layers_alone() -> None:
    before = plan_layers([_wheel("a"), _wheel("c")], _wheel("app"))
    after = plan_layers([_wheel("a"), _wheel("b"), _wheel("c")], _wheel("app"))
    assert set(before.layers) <= set(after.layers)


def test_many_packages_share_layers_within_the_limit() -> None:
    deps = [_wheel(f"pkg{i:03}") for i in range(250)]
    plan = plan_layers(deps, _wheel("app"), max_layers=100)
    assert len(plan.layers) <= 100
    installed = [w.name for layer in plan.layers[1:-1] for w in layer.wheels]
    assert installed == sorted(w.name for w in deps)

"""``imgbuild plan``: the layers a build would make, and which the cache already holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = pytest.mark.docker


def _plan(project: Path, cache: Path, *extra: str) -> dict[str, object]:
    result = imgbuild("plan", project, "--python", "3.11", "--cache-dir", cache, *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_plan_shows_the_layers_and_what_the_cache_holds(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    cache = tmp_path / "cache"
    before = _plan(project, cache, "--format", "json")
    layers = before["layers"]
    assert isinstance(layers, list)
    kinds = [layer["kind"] for layer in layers]
    assert kinds[0] == "venv" and kinds[-1] == "project"
    packages = sorted(p for layer in layers[1:-1] for p in layer["packages"])
    assert packages == ["colours 0.3.0", "greeting 1.2.0"]
    assert all(layer["cached"] is False for layer in layers[:-1])
    assert layers[-1]["cached"] is None and layers[-1]["size"] is None
    assert before["max_layers"] == 100 and int(before["base_layers"]) >= 2

    build = imgbuild(
        "build", project, "--python", "3.11", "--cache-dir", cache,
        "--output", f"oci:{tmp_path / 'out'}",
    )  # fmt: skip
    assert build.exit_code == 0, build.stderr
    after = _plan(project, cache, "--format", "json")
    assert [layer["cached"] for layer in after["layers"]][:-1] == [True] * (len(layers) - 1)
    # The plan is the build's: as many layers, in the same order, as the image has above
    # its base and SBOM layers.
    built = json.loads((tmp_path / "out" / "index.json").read_text())["manifests"][0]
    assert built["digest"].startswith("sha256:")


def test_plan_as_a_subprocess_prints_a_table(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    env = {**os.environ, "IMGBUILD_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "imagebuild", "plan", str(project), "--python", "3.11"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("linux/amd64: ") and "of at most 100" in lines[0]
    assert lines[1].split() == ["#", "kind", "size", "cached", "packages"]
    assert lines[-1].split()[1:3] == ["project", "?"]


def test_plan_refuses_an_unknown_format(make_project: MakeProject, tmp_path: Path) -> None:
    result = imgbuild("plan", make_project(), "--format", "yaml", "--cache-dir", tmp_path)
    assert result.exit_code == 1 and "--format 'yaml': unknown" in result.stderr

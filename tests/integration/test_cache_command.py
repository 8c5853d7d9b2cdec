"""``imgbuild cache`` on caches real builds filled: what stays builds the same image again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, build_layout, imgbuild
from tests.test_cache_admin import ROOT, _Holder

pytestmark = pytest.mark.docker


def _digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def test_a_pruned_or_cleaned_cache_builds_the_same_image(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    cache = tmp_path / "cache"
    first = build_layout(project, cache, tmp_path / "o1")
    assert "fetching " in first.stderr
    digest = _digest(tmp_path / "o1")

    size = imgbuild("cache", "size", "--cache-dir", cache)
    assert size.exit_code == 0, size.stderr
    names = {line.split()[0] for line in size.stdout.splitlines()}
    assert {"wheels", "blobs", "layers", "total"} <= names

    # A CI cache: downloads dropped, what was built kept; the next build needs no wheel.
    pruned = imgbuild("cache", "prune", "--ci", "--cache-dir", cache)
    assert pruned.exit_code == 0, pruned.stderr
    assert not (cache / "wheels").exists() and (cache / "layers").is_dir()
    again = build_layout(project, cache, tmp_path / "o2")
    assert "fetching " not in again.stderr
    assert _digest(tmp_path / "o2") == digest

    cleaned = imgbuild("cache", "clean", "--cache-dir", cache)
    assert cleaned.exit_code == 0, cleaned.stderr
    assert [p.name for p in cache.iterdir()] == [".lock"]
    cold = build_layout(project, cache, tmp_path / "o3")
    assert "fetching " in cold.stderr
    assert _digest(tmp_path / "o3") == digest


def test_a_build_waits_while_the_cache_is_cleaned(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    cache = tmp_path / "cache"
    cache.mkdir()
    clean = _Holder(cache, "alone", tmp_path)
    build = subprocess.Popen(
        [
            sys.executable, "-m", "imagebuild", "build", str(project), "--locked",
            "--python", "3.11", "--cache-dir", str(cache), "--output", f"oci:{tmp_path / 'o'}",
        ],
        cwd=ROOT,
        env={**os.environ, "IMGBUILD_SERVER": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert build.stderr is not None
    line = build.stderr.readline()
    assert "waiting for imgbuild cache clean or prune to end" in line, line
    assert not (cache / "tmp").exists()  # nothing started
    clean.release()
    _, err = build.communicate(timeout=300)
    assert build.returncode == 0, err
    assert (tmp_path / "o" / "index.json").is_file()

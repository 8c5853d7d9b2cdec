"""``imgbuild cache`` on caches real builds filled: what stays builds the same image again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    assert (
        (cache / "CACHEDIR.TAG")
        .read_text()
        .startswith("Signature: 8a477f597d28d172789f06886806bc55\n")
    )
    assert (cache / ".gitignore").read_text() == "*\n"

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
    assert sorted(p.name for p in cache.iterdir()) == [".gitignore", ".lock", "CACHEDIR.TAG"]
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


def test_pruning_unused_layers_keeps_what_the_last_build_read(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    cache = tmp_path / "cache"
    build_layout(project, cache, tmp_path / "v1")
    v1 = _digest(tmp_path / "v1")
    # Forty days pass; then a code change is built: it reads every record but the old
    # project layer's, and makes a new one.
    then = time.time() - 40 * 86400
    for record in (cache / "layers").iterdir():
        os.utime(record, (then, then))
    source = project / "src" / "demo_app" / "__init__.py"
    first = source.read_text()
    source.write_text(first + "\nCHANGED = True\n")
    build_layout(project, cache, tmp_path / "v2")
    v2 = _digest(tmp_path / "v2")
    blobs = set((cache / "blobs" / "sha256").iterdir())

    pruned = imgbuild("cache", "prune", "--unused-for", "30", "--cache-dir", cache)
    assert pruned.exit_code == 0, pruned.stderr
    gone = blobs - set((cache / "blobs" / "sha256").iterdir())
    v1_layers = {d.removeprefix("sha256:") for d in _layers(tmp_path / "v1")}
    v2_layers = {d.removeprefix("sha256:") for d in _layers(tmp_path / "v2")}
    assert {p.name for p in gone} == v1_layers - v2_layers  # the old project layer only

    again = build_layout(project, cache, tmp_path / "v2b")
    assert "1 new" not in again.stderr and "0 new" in again.stderr
    assert _digest(tmp_path / "v2b") == v2
    source.write_text(first)
    back = build_layout(project, cache, tmp_path / "v1b")
    assert "1 new" in back.stderr  # the project layer, made again
    assert _digest(tmp_path / "v1b") == v1


def _layers(layout: Path) -> list[str]:
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    blob = layout / "blobs" / "sha256" / manifest.removeprefix("sha256:")
    return [layer["digest"] for layer in json.loads(blob.read_text())["layers"]]

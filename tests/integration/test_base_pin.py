"""The lock pins the base image: its tag may move, the locked build does not.

A researcher's `imgbuild build --locked` years later must give the same digest although
`python3-debian12:latest` has moved since. Here a tag in the test registry is moved (with
the distribution API) from the distroless base to the slim one between two builds.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.index_server import LocalIndex
from tests.integration.conftest import MakeProject, imgbuild, index_settings

pytestmark = pytest.mark.docker


def _point_tag(registry: str, source: str, target: str) -> None:
    """Point ``target`` (repository:tag) at the image ``source`` names, as ``skopeo copy``
    within one registry would: its blobs mounted from the source repository, then its
    manifest put at the tag (the distribution API, spoken directly)."""
    from_repo, _, from_tag = source.rpartition(":")
    to_repo, _, to_tag = target.rpartition(":")
    accept = ", ".join(
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    )
    with httpx.Client(base_url=f"http://{registry}/v2", timeout=60) as http:
        got = http.get(f"/{from_repo}/manifests/{from_tag}", headers={"Accept": accept})
        got.raise_for_status()
        manifest = got.json()
        for blob in (manifest["config"], *manifest["layers"]):
            mounted = http.post(
                f"/{to_repo}/blobs/uploads/",
                params={"mount": blob["digest"], "from": from_repo},
                headers={"Content-Length": "0"},
            )
            assert mounted.status_code == 201, mounted.text
        put = http.put(
            f"/{to_repo}/manifests/{to_tag}",
            content=got.content,
            headers={"Content-Type": got.headers["Content-Type"]},
        )
        assert put.status_code == 201, put.text


def _manifest_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def test_locked_build_keeps_the_base_after_its_tag_moves(
    docker_env: TestInfra, make_project: MakeProject, demo_index: LocalIndex, tmp_path: Path
) -> None:
    registry = docker_env.registry
    tag = f"moving-{tmp_path.name.replace('_', '-').lower()[-40:]}"
    base = f"{registry}/imgbuild-test/moving-base:{tag}"
    _point_tag(registry, "distroless/python3-debian12:latest", f"imgbuild-test/moving-base:{tag}")
    project = make_project(
        tool=index_settings(demo_index.url) + f'base = "{base}"\nplatforms = ["linux/amd64"]\n'
    )
    (project / "uv.lock").unlink()
    cache = tmp_path / "cache"

    def lock(*args: str) -> dict[str, str]:
        result = imgbuild("lock", project, "--cache-dir", cache, *args)
        assert result.exit_code == 0, result.stderr
        return tomllib.loads((project / "pylock.toml").read_text())["tool"]["imgbuild"]["bases"]

    def build(name: str) -> tuple[str, str]:
        layout = tmp_path / name
        result = imgbuild(
            "build", project, "--locked", "--cache-dir", cache, "--output", f"oci:{layout}"
        )
        assert result.exit_code == 0, result.stderr
        return _manifest_digest(layout), result.stderr

    first = lock()
    assert set(first) == {base} and first[base].startswith("sha256:")
    # A base given by reference is pulled (at its pin) to learn the targets to check.
    checked = imgbuild("lock", project, "--check", "--cache-dir", cache)
    assert checked.exit_code == 0, checked.stderr
    before, log = build("before")
    assert "(pinned by pylock.toml)" in log

    # Upstream moves the tag (here: to the slim image, also Python 3.11).
    _point_tag(registry, "library/python:3.11-slim-bookworm", f"imgbuild-test/moving-base:{tag}")
    after, _ = build("after")
    assert after == before  # same lock, same base, same image

    assert lock() == first  # re-locking keeps the pin, as it keeps package pins
    upgraded = lock("--upgrade")
    assert upgraded[base] != first[base]
    moved, _ = build("moved")
    assert moved != before

"""An engine that does not share this host's files (remote DOCKER_HOST, Docker-in-Docker).

Bytecode is compiled by the base's own Python inside that engine (where it cannot run on
this host): sources go in and pycs come out through the engine's API, so the build works
although the engine cannot see the build's working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from imagebuild.install import native
from tests.fixtures.docker_engine import RemoteEngine, TestInfra
from tests.integration.conftest import MakeProject, imgbuild
from tests.integration.test_build import CHECK_PYC

pytestmark = pytest.mark.docker


def test_build_compiles_and_loads_through_an_engine_without_our_files(
    infra: TestInfra,
    remote_engine: RemoteEngine,
    make_project: MakeProject,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    project = make_project()
    tag = "imgbuild-test/remote:1"
    # The base's Python would run on this host itself (``install.native``): as on a host
    # of another CPU, it runs in the engine instead.
    monkeypatch.setattr(native, "host_arch", lambda: None)
    monkeypatch.setenv("DOCKER_HOST", remote_engine.host)
    engine = remote_engine.client
    _remove_loaded_bases(engine)  # what the build loads is then this build's doing
    monkeypatch.setenv("IMGBUILD_REGISTRY_MIRRORS", infra.mirrors)
    cache = tmp_path / "cache"
    try:
        result = imgbuild(
            "build",
            project,
            "--tag",
            tag,
            "--python",
            "3.11",
            "--compile-with",
            "image",
            "--cache-dir",
            cache,
        )
        assert result.exit_code == 0, result.stderr

        # The test means something only if the engine really cannot see the build's files.
        base = next(
            t for i in engine.images.list() for t in i.tags if t.startswith("imgbuild-base:")
        )
        seen = engine.containers.run(
            base,
            [
                "/usr/bin/python3.11",
                "-c",
                "import os, sys; print(os.path.exists(sys.argv[1]))",
                str(cache),
            ],
            entrypoint=[],
            network_mode="none",
            remove=True,
        )
        assert bytes(seen).decode().strip() == "False"

        site = "/app/.venv/lib/python3.11/site-packages"
        report = json.loads(
            bytes(
                engine.containers.run(
                    tag,
                    ["-c", CHECK_PYC, site],
                    entrypoint="/app/.venv/bin/python",
                    network_mode="none",
                    remove=True,
                )
            )
        )
        assert report["count"] >= 5
        assert report["missing"] == [] and report["bad"] == []
        out = json.loads(bytes(engine.containers.run(tag, network_mode="none", remove=True)))
        assert out["msg"] == "hello image"
    finally:
        try:
            engine.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass
        _remove_loaded_bases(engine)


def _remove_loaded_bases(engine: docker.DockerClient) -> None:
    """Remove the bases imgbuild loaded into ``engine`` to run their Python there."""
    for image in engine.images.list():
        for name in image.tags:
            if name.startswith("imgbuild-base:"):
                engine.images.remove(name, force=True)

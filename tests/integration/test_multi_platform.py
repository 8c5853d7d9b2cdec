"""Images for linux/amd64 and linux/arm64 in one image index, on an amd64-only engine.

The base is the two-platform index dev/infra.sh pushes; a dependency has a different wheel
per architecture. Each platform's image must hold its own wheel, pure layers must be the
same blobs on both, and arm64's bytecode comes from the base's amd64 Python (no emulator).
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from imagebuild.image.validate import validate_layout
from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.index_server import LocalIndex
from tests.integration.conftest import MakeProject, imgbuild, index_settings

pytestmark = pytest.mark.docker

MULTI_BASE = "imgbuild-test/python3-multi:latest"


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _files(layer: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_two_platforms_make_one_index(
    docker_env: TestInfra, make_project: MakeProject, demo_index: LocalIndex, tmp_path: Path
) -> None:
    for tag, arch in (("manylinux_2_17_x86_64", "x86_64"), ("manylinux_2_17_aarch64", "aarch64")):
        demo_index.add_wheel(
            "archlib",
            "1.0",
            tags=f"cp311-cp311-{tag}",
            files={"archlib.py": f"ARCH = {arch!r}\n"},
        )
    registry = docker_env.registry
    project = make_project(
        dependencies=("colours>=0.3", "archlib"),
        tool=index_settings(demo_index.url)
        + f'base = "{registry}/{MULTI_BASE}"\nplatforms = ["linux/amd64", "linux/arm64"]\n',
    )
    (project / "uv.lock").unlink()
    cache = tmp_path / "cache"
    locked = imgbuild("lock", project, "--cache-dir", cache)
    assert locked.exit_code == 0, locked.stderr

    layout = tmp_path / "oci"
    pushed = f"{registry}/imgbuild-test/multi-app:1"
    both = ("--platform", "linux/amd64", "--platform", "linux/arm64")
    built = imgbuild(
        "build",
        project,
        "--locked",
        *both,
        "--cache-dir",
        cache,
        "--tag",
        pushed,
        "--output",
        f"oci:{layout}",
        "--output",
        "registry",
    )
    assert built.exit_code == 0, built.stderr
    assert "linux/arm64 bytecode by the base's linux/amd64 python3.11" in built.stderr
    validate_layout(layout)

    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.index.v1+json"
    index = json.loads(_blob(layout, entry["digest"]))
    platforms = [m["platform"]["architecture"] for m in index["manifests"]]
    assert platforms == ["amd64", "arm64"]
    layers = {
        m["platform"]["architecture"]: [
            layer["digest"] for layer in json.loads(_blob(layout, m["digest"]))["layers"]
        ]
        for m in index["manifests"]
    }
    # Each image holds its own architecture's wheel, with its bytecode.
    for arch, machine in (("amd64", "x86_64"), ("arm64", "aarch64")):
        files = {}
        for digest in layers[arch][1:]:
            files.update(_files(_blob(layout, digest)))
        site = "app/.venv/lib/python3.11/site-packages"
        assert files[f"{site}/archlib.py"] == f"ARCH = {machine!r}\n".encode()
        assert f"{site}/__pycache__/archlib.cpython-311.pyc" in files
    # The base differs per platform; the venv, the pure colours and greeting layers and the
    # project layer are the same blobs on both. So does the SBOM: it lists archlib's wheel
    # for that platform, with that wheel's hash.
    shared = set(layers["amd64"]) & set(layers["arm64"])
    assert len(shared) == len(layers["amd64"]) - 3  # all but the base, archlib and the SBOM

    # The registry serves the same index under the tag.
    response = httpx.get(
        f"http://{registry}/v2/imgbuild-test/multi-app/manifests/1",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    )
    assert response.headers["Docker-Content-Digest"] == entry["digest"]
    # The engine pulls its own platform from the index, and it runs.
    docker_env.client.images.pull(pushed)
    try:
        out = docker_env.client.containers.run(pushed, network_mode="none", remove=True)
        assert json.loads(bytes(out))["msg"] == "hello image"
    finally:
        docker_env.client.images.remove(pushed, force=True)


def test_two_platforms_cannot_be_loaded_into_docker(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    result = imgbuild(
        "build",
        project,
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: --output docker takes one platform, and 2 were given; pass one --platform, or "
        "write the image index with --output registry, oci:DIR or oci-archive:FILE"
    )

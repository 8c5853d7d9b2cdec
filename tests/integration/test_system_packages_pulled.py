"""System packages on a base pulled from a registry: the Debian-based one gets a layer.

The infra's distroless stand-in (``127.0.0.1:5055/distroless/python3-debian12``, reached
through the registry mirrors like gcr.io's image) is a Debian 12 image whose dpkg records
its packages in ``status.d``: libmagic1 and its Depends are resolved against bookworm,
leaving out what the base has, installed in a layer of their own above the base's, and the
file-types example runs on it. These read the live Debian archive and use the engine and
registry of ``dev/infra.sh``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import imgbuild
from tests.integration.test_debian_bases import layer_files, read_layout, run_in_image

pytestmark = [pytest.mark.docker, pytest.mark.debian, pytest.mark.pypi]

REPO = Path(__file__).resolve().parents[2]


def test_a_pulled_debian_base_gets_a_layer_of_the_packages_it_lacks(
    docker_env: TestInfra, image_cleanup: list[str], tmp_path: Path
) -> None:
    root = tmp_path / "file-types"
    shutil.copytree(REPO / "examples" / "file-types", root)
    (root / "pylock.toml").unlink()  # locked for the built base's Python 3.13
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'base = "distroless"\npython = "3.11"\n')
    tag = "imgbuild-test/pulled-system-packages:1"
    image_cleanup.append(tag)
    layout = tmp_path / "layout"
    built = imgbuild(
        "build", root, "--tag", tag, "--cache-dir", tmp_path / "cache",
        "--output", "docker", "--output", f"oci:{layout}",
    )  # fmt: skip
    assert built.exit_code == 0, built.stderr
    image = read_layout(layout)
    # One history entry per layer: the base's, then the system packages', then Python's.
    assert len(image.history) == len(image.layers)
    system = [i for i, h in enumerate(image.history) if h.startswith("imgbuild: system packages")]
    assert len(system) == 1 and image.history[system[0] + 1] == "imgbuild: virtual environment"
    assert "libmagic1" in image.history[system[0]], image.history
    # Only what the base lacked: libc6 and zlib1g, which libmagic1 depends on, are the base's.
    files = layer_files(image.layers[system[0]])
    entries = {n.rsplit("/", 1)[1] for n in files if n.startswith("var/lib/dpkg/status.d/")}
    assert {"libmagic1", "libmagic-mgc"} <= entries
    assert not entries & {"libc6", "zlib1g", "libc6.md5sums"}
    # The base's own dpkg view is kept, not replaced by the layer's.
    assert "var/lib/dpkg/status" not in files
    status, out = run_in_image(docker_env, tag, "--self-test")
    assert status == 0, out
    assert "4/4 identified" in out

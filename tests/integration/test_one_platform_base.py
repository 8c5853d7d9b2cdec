"""A base published for one platform gives the implicit lock one platform, and says so.

The test registry's bases are amd64-only (a single image's manifest), except
imgbuild-test/python3-multi (an index over linux/amd64 and linux/arm64).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from imagebuild.image.validate import validate_layout
from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.index_server import LocalIndex
from tests.integration.conftest import MakeProject, imgbuild, index_settings

pytestmark = pytest.mark.docker


def _environments(lock: Path) -> list[str]:
    return list(tomllib.loads(lock.read_text())["environments"])


@pytest.mark.parametrize("platform_args", [(), ("--platform", "linux/amd64")])
def test_implicit_lock_on_a_one_platform_base(
    docker_env: TestInfra,
    make_project: MakeProject,
    demo_index: LocalIndex,
    tmp_path: Path,
    platform_args: tuple[str, ...],
) -> None:
    base = f"{docker_env.registry}/distroless/python3-debian12:latest"
    project = make_project(tool=index_settings(demo_index.url) + f'base = "{base}"\n')
    (project / "uv.lock").unlink()  # no lock: the build locks first
    layout = tmp_path / "layout"
    built = imgbuild(
        "build", project, *platform_args, "--cache-dir", tmp_path / "cache",
        "--output", f"oci:{layout}",
    )  # fmt: skip
    assert built.exit_code == 0, built.stderr
    validate_layout(layout)
    assert (
        f"base {base} is published for linux/amd64 only: the lock covers linux/amd64, "
        "not linux/amd64, linux/arm64" in built.stderr
    )
    environments = _environments(project / "pylock.toml")
    assert len(environments) == 1 and "x86_64" in environments[0]
    # The lock it wrote is current: a --locked build takes it as it is, with no warning.
    again = imgbuild(
        "build", project, "--locked", "--cache-dir", tmp_path / "cache",
        "--output", f"oci:{tmp_path / 'again'}",
    )  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert "published for" not in again.stderr


def test_a_platform_the_base_lacks_is_refused(
    docker_env: TestInfra, make_project: MakeProject, demo_index: LocalIndex, tmp_path: Path
) -> None:
    base = f"{docker_env.registry}/distroless/python3-debian12:latest"
    project = make_project(
        tool=index_settings(demo_index.url) + f'base = "{base}"\nplatforms = ["linux/arm64"]\n'
    )
    (project / "uv.lock").unlink()
    result = imgbuild("lock", project, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: pulling {base}: image is for linux/amd64, not linux/arm64")


def test_implicit_lock_on_a_multi_platform_base_covers_both(
    docker_env: TestInfra, make_project: MakeProject, demo_index: LocalIndex, tmp_path: Path
) -> None:
    base = f"{docker_env.registry}/imgbuild-test/python3-multi:latest"
    project = make_project(tool=index_settings(demo_index.url) + f'base = "{base}"\n')
    (project / "uv.lock").unlink()
    result = imgbuild("lock", project, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.stderr
    assert "published for" not in result.stderr
    environments = _environments(project / "pylock.toml")
    assert len(environments) == 2

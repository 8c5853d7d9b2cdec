"""The shipped examples, built from their real uv.lock (wheels from PyPI) and run.

Marked ``pypi`` as well as ``docker``: these are the few tests that download from the
live index (through the wheel cache, so only the first run pays).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagebuild.image.validate import validate_layout
from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import imgbuild

pytestmark = [pytest.mark.docker, pytest.mark.pypi]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel cache for the example builds, so each wheel is downloaded once."""
    return tmp_path_factory.mktemp("example-cache")


@pytest.mark.parametrize("base", ["distroless", "debian-slim"])
def test_fastapi_service_self_test(
    docker_env: TestInfra, image_cleanup: list[str], shared_cache: Path, base: str
) -> None:
    tag = f"imgbuild-test/hello-api-{base}:dev"
    image_cleanup.append(tag)
    result = imgbuild(
        "build",
        EXAMPLES / "fastapi-service",
        "--tag",
        tag,
        "--base",
        base,
        "--python",
        "3.11",
        "--locked",
        "--cache-dir",
        shared_cache,
    )
    assert result.exit_code == 0, result.stderr
    output = docker_env.client.containers.run(
        tag, ["--self-test"], network_mode="none", remove=True
    )
    report = json.loads(bytes(output).decode().strip().splitlines()[-1])
    assert report["uid"] == 65532
    assert report["python"].startswith("3.11")
    text = json.dumps(report)
    assert '"ok"' in text and "world" in text
    config = docker_env.client.api.inspect_image(tag)["Config"]
    assert config["Entrypoint"] == ["/app/.venv/bin/hello-api"]
    assert "8000/tcp" in config["ExposedPorts"]


@pytest.mark.parametrize("python", ["3.11", "3.13"])
def test_numeric_analysis_report(
    docker_env: TestInfra, image_cleanup: list[str], shared_cache: Path, python: str
) -> None:
    tag = f"imgbuild-test/numstats:{python}"
    image_cleanup.append(tag)
    result = imgbuild(
        "build",
        EXAMPLES / "numeric-analysis",
        "--tag",
        tag,
        "--python",
        python,
        "--locked",
        "--cache-dir",
        shared_cache,
    )
    assert result.exit_code == 0, result.stderr
    output = bytes(docker_env.client.containers.run(tag, network_mode="none", remove=True))
    summary = json.loads(output.decode().strip().splitlines()[-1])
    assert summary
    versions = (
        bytes(
            docker_env.client.containers.run(
                tag,
                ["-c", "import numpy, sys; print(numpy.__version__, *sys.version_info[:2])"],
                entrypoint="/app/.venv/bin/python",
                network_mode="none",
                remove=True,
            )
        )
        .decode()
        .split()
    )
    # The lock forks numpy by Python version: the target's marker environment decides.
    assert versions[1:] == python.split(".")
    assert versions[0] == ("2.4.6" if python == "3.11" else "2.5.5")


def test_daemonless_build_compiles_with_the_bases_own_python(
    docker_env: TestInfra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no engine at all, the base's Python runs here and writes the engine's bytes."""

    def build(name: str, *extra: str) -> tuple[str, str]:
        layout = tmp_path / name
        result = imgbuild(
            "build", EXAMPLES / "fastapi-service", "--python", "3.11",
            "--cache-dir", tmp_path / f"cache-{name}", "--output", f"oci:{layout}", *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        validate_layout(layout)
        return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"], (
            result.stderr
        )

    reachable, _ = build("engine-reachable")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    without, log = build("no-engine", "--compile-with", "image")
    assert without == reachable
    assert "warning" not in log
    # A host interpreter is still there to be asked for (its patch release may differ).
    host, _ = build("host", "--compile-with", "host")
    assert host.startswith("sha256:")

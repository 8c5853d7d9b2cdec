"""``imgbuild dockerfile`` built by the real engine (BuildKit) and run with no network.

As benchmarks/build.py does for uv's own Dockerfile, uv comes from a local FROM-scratch
"tools" image (``--uv-image``) standing in for ghcr.io/astral-sh/uv, which cannot be
reached here. The one departure from the rendered text: the host's CA bundle is copied into
the builder stage, because this machine reaches PyPI (for the project's build backend)
through a TLS-intercepting proxy. ``--network host`` lets uv reach the local test index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import uv

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = pytest.mark.docker

DOCKER = "/usr/bin/docker"
TOOLS = "imgbuild-test/uv-tools:latest"
CA = "/etc/ssl/certs/ca-certificates.crt"


def _docker(infra: TestInfra, *args: str) -> str:
    env = {**os.environ, "DOCKER_HOST": infra.docker_host, "DOCKER_BUILDKIT": "1"}
    proc = subprocess.run(
        [DOCKER, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"docker {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _tools_image(infra: TestInfra, work: Path) -> None:
    context = work / "tools"
    context.mkdir()
    shutil.copy2(uv.find_uv_bin(), context / "uv")
    shutil.copy2(os.environ.get("SSL_CERT_FILE", CA), context / "ca-certificates.crt")
    (context / "Dockerfile").write_text(
        "FROM scratch\nCOPY uv /uv\nCOPY ca-certificates.crt /ca-certificates.crt\n"
    )
    _docker(infra, "build", "-q", "-t", TOOLS, str(context))


def test_the_rendered_dockerfile_builds_and_runs_as_the_image_would(
    docker_env: TestInfra, make_project: MakeProject, image_cleanup: list[str], tmp_path: Path
) -> None:
    # A Dockerfile starts FROM a pulled base (the infra's distroless-like one).
    project = make_project(
        tool='\n[tool.imgbuild]\nbase = "distroless"\nenv = { GREETING = "hi $USER" }\n'
    )
    _tools_image(docker_env, tmp_path)
    image_cleanup.append(TOOLS)
    dockerfile = tmp_path / "Dockerfile"
    # A real subprocess, as a user would run it.
    proc = subprocess.run(
        [sys.executable, "-m", "imagebuild", "dockerfile", str(project), "--uv-image", TOOLS,
         "--output", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "IMGBUILD_REGISTRY_MIRRORS": docker_env.mirrors},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = dockerfile.read_text()
    # The same text from the in-process CLI, on stdout.
    printed = imgbuild("dockerfile", project, "--uv-image", TOOLS)
    assert printed.exit_code == 0 and printed.stdout == text

    copy_uv = f"COPY --from={TOOLS} /uv /bin/uv\n"
    assert text.count(copy_uv) == 1
    built_text = text.replace(
        copy_uv,
        copy_uv + f"COPY --from={TOOLS} /ca-certificates.crt /etc/ssl/certs/host-ca.crt\n"
        "ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt\n",
    )
    (tmp_path / "build.Dockerfile").write_text(built_text)
    tag = "imgbuild-test/uv-dockerfile:1"
    image_cleanup.append(tag)
    _docker(docker_env, "build", "--network", "host", "-f", str(tmp_path / "build.Dockerfile"),
            "-t", tag, str(project))  # fmt: skip

    out = _docker(docker_env, "run", "--rm", "--network", "none", tag, "--flag")
    result = json.loads(out)
    assert result["uid"] == 65532 and result["msg"] == "hello image"
    assert result["argv"] == ["--flag"] and result["exe"] == "/app/.venv/bin/python"
    config = json.loads(_docker(docker_env, "image", "inspect", tag))[0]["Config"]
    assert config["Entrypoint"] == ["/app/.venv/bin/demo-app"]
    assert "GREETING=hi $USER" in config["Env"] and "VIRTUAL_ENV=/app/.venv" in config["Env"]
    assert config["Labels"]["org.opencontainers.image.source"] == (
        "https://github.com/example/demo-app"
    )
    assert config["WorkingDir"] == "/app" and config["User"] == "65532"
    # Bytecode was compiled in the builder (UV_COMPILE_BYTECODE=1).
    listing = _docker(
        docker_env, "run", "--rm", "--network", "none", "--entrypoint", "/app/.venv/bin/python",
        tag, "-c", "import greeting, os, sys; print(os.path.isfile(greeting.__cached__), sys.prefix)",
    )  # fmt: skip
    assert listing.split() == ["True", "/app/.venv"]

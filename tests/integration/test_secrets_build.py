"""Secrets in the package directory never reach the image (``build.secrets``, end to end).

The project is built by hatchling, which (without a ``.gitignore``) packs ``.env``, ``id_rsa``
and ``.npmrc`` lying in the package directory. imgbuild refuses that build in one line; with
a ``.dockerignore`` leaving them out, the image builds and no layer holds them.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = pytest.mark.docker

SECRETS = {
    ".env": "DATABASE_PASSWORD=hunter2\n",
    "id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    ".npmrc": "//registry.npmjs.org/:_authToken=npm_secret\n",
}


def _layer_members(layout: Path) -> set[str]:
    """Every path in every layer of the image in the OCI layout ``layout``."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    names: set[str] = set()
    for layer in manifest["layers"]:
        with tarfile.open(blobs / layer["digest"].split(":")[1]) as tar:
            names.update(tar.getnames())
    return names


def test_secrets_refused_then_left_out_by_dockerignore(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    package = project / "src" / "demo_app"
    for name, content in SECRETS.items():
        (package / name).write_text(content)
    args = ("build", project, "--python", "3.11", "--base", "debian-slim", "--no-compile",
            "--cache-dir", tmp_path / "cache")  # fmt: skip

    refused = imgbuild(*args, "--output", f"oci:{tmp_path / 'refused'}")
    assert refused.exit_code == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, refused.stderr
    assert "demo_app/.env" in errors[0] and "allow-secrets" in errors[0]
    assert "hunter2" not in refused.stderr
    assert not (tmp_path / "refused").exists()

    (project / ".dockerignore").write_text("**/.env\n**/id_rsa\n**/.npmrc\n")
    built = imgbuild(*args, "--output", f"oci:{tmp_path / 'built'}")
    assert built.exit_code == 0, built.stderr
    members = _layer_members(tmp_path / "built")
    ours = [m for m in members if "/demo_app/" in m]
    assert any(m.endswith("/demo_app/__init__.py") for m in ours), ours
    assert [m for m in ours if m.rsplit("/", 1)[-1] in SECRETS] == []

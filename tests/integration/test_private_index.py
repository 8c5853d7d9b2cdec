"""A project on a private index that demands credentials, as CI publishes it.

The credentials come from the variables uv reads (``UV_INDEX_<NAME>_USERNAME`` and
``_PASSWORD``) for a named ``[[tool.uv.index]]``; the lock must not record them, and the
build must find them again for every download.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagebuild.image.validate import validate_layout
from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.index_server import LocalIndex
from tests.integration.conftest import imgbuild

pytestmark = pytest.mark.docker


def test_lock_and_build_with_credentials_from_the_environment(
    docker_env: TestInfra, fresh_index: LocalIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh_index.add_wheel("secret-lib", "1.0", files={"secret_lib.py": "X = 1\n"})
    fresh_index.basic_auth = ("ci-bot", "s3cret")
    project = tmp_path / "p"
    (project / "src" / "p").mkdir(parents=True)
    (project / "src" / "p" / "__init__.py").write_text("import secret_lib\n")
    (project / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [project]
        name = "p"
        version = "1"
        requires-python = ">=3.11"
        dependencies = ["secret-lib"]

        [[tool.uv.index]]
        name = "corp"
        url = "{fresh_index.url}"

        # hatchling comes from PyPI, after the private index
        [[tool.uv.index]]
        name = "pypi"
        url = "https://pypi.org/simple/"
        default = true

        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        """)
    )
    cache = tmp_path / "cache"

    refused = imgbuild("lock", project, "--python", "3.11", "--cache-dir", cache)
    assert refused.exit_code == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "answered 401" in errors[0]
    assert "UV_INDEX_<NAME>_USERNAME" in errors[0]

    monkeypatch.setenv("UV_INDEX_CORP_USERNAME", "ci-bot")
    monkeypatch.setenv("UV_INDEX_CORP_PASSWORD", "s3cret")
    locked = imgbuild("lock", project, "--python", "3.11", "--cache-dir", cache)
    assert locked.exit_code == 0, locked.stderr
    text = (project / "pylock.toml").read_text()
    assert "s3cret" not in text and "ci-bot" not in text
    assert f'index = "{fresh_index.url}"' in text

    layout = tmp_path / "image"
    built = imgbuild(
        "build",
        project,
        "--locked",
        "--python",
        "3.11",
        "--cache-dir",
        cache,
        "--output",
        f"oci:{layout}",
    )
    assert built.exit_code == 0, built.stderr
    validate_layout(layout)
    downloads = [p for m, p in fresh_index.requests if p.startswith("/files/secret_lib")]
    assert downloads  # the wheel itself came from the private index, with the credentials

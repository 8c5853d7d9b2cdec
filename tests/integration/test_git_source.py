"""A git dependency end to end: locked from a git server on 127.0.0.1, built at the locked
commit into its own layer, and run in the image (from imgbuild's pylock and from uv.lock)."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.git_server import GitDaemon, GitProject
from tests.fixtures.index_server import LocalIndex
from tests.integration.conftest import build_layout, imgbuild, index_settings, uv_lock

pytestmark = pytest.mark.docker

_GREETER = "import colours\n\ndef greet():\n    return {'from': 'git', 'red': colours.RED}\n"


def _project(root: Path, git_url: str, index_url: str) -> Path:
    """app -> greeter (git, tag v1) -> colours (index)."""
    (root / "src" / "app").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [project]
        name = "app"
        version = "1.0"
        requires-python = ">=3.11"
        dependencies = ["greeter"]

        [project.scripts]
        app = "app:main"

        [tool.uv.sources]
        greeter = {{ git = "{git_url}", tag = "v1" }}

        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        """)
        + index_settings(index_url)
    )
    (root / "src" / "app" / "__init__.py").write_text(
        "import json, greeter\n\ndef main():\n    print(json.dumps(greeter.greet()))\n"
    )
    return root


def test_git_dependency_runs_in_the_image(
    docker_env: TestInfra,
    demo_index: LocalIndex,
    git_daemon: GitDaemon,
    image_cleanup: list[str],
    tmp_path: Path,
) -> None:
    repo = GitProject(git_daemon.base / "greeter", "greeter")
    commit = repo.commit("0.5", requires=["colours>=0.3"], files={"greeter/__init__.py": _GREETER})
    repo.tag("v1")
    repo.commit("0.6", files={"greeter/__init__.py": "raise SystemExit('not the tag')\n"})
    root = _project(tmp_path / "app", f"{git_daemon.url}/greeter", demo_index.url)
    cache = tmp_path / "cache"
    locked = imgbuild("lock", root, "--python", "3.11", "--cache-dir", cache)
    assert locked.exit_code == 0, locked.stderr
    entries = {p["name"]: p for p in tomllib.loads((root / "pylock.toml").read_text())["packages"]}
    assert entries["greeter"]["vcs"]["commit-id"] == commit
    assert "colours" in entries

    tag = "imgbuild-test/git-source:1"
    image_cleanup.append(tag)
    build_layout(root, cache, tmp_path / "layout", "--tag", tag, "--output", "docker")
    output = docker_env.client.containers.run(tag, network_mode="none", remove=True)
    assert json.loads(bytes(output)) == {"from": "git", "red": "#f00"}
    history = [h["CreatedBy"] for h in docker_env.client.api.history(tag)]
    assert "imgbuild: local greeter 0.5" in history  # a layer of its own

    # The same project locked by real uv (which takes https, ssh and file git URLs, not
    # git://): uv.lock's git source builds the same way.
    (root / "pylock.toml").unlink()
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(f"{git_daemon.url}/greeter", repo.url))
    uv_lock(root, demo_index.url)
    uv_tag = "imgbuild-test/git-source:uv"
    image_cleanup.append(uv_tag)
    build_layout(root, cache, tmp_path / "layout-uv", "--tag", uv_tag, "--output", "docker")
    output = docker_env.client.containers.run(uv_tag, network_mode="none", remove=True)
    assert json.loads(bytes(output)) == {"from": "git", "red": "#f00"}

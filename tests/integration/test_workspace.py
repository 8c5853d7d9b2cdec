"""uv workspaces: members resolved from source, locked as directories, built into layers."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path

import pytest

from imagebuild.image.validate import validate_layout
from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.index_server import LocalIndex
from tests.integration.conftest import build_layout, imgbuild, index_settings, uv_lock

pytestmark = pytest.mark.docker


def _workspace(root: Path, index_url: str) -> Path:
    """app (root) -> greeter (member, workspace source) -> colours (index)."""
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

        [tool.uv.workspace]
        members = ["packages/*"]

        [tool.uv.sources]
        greeter = {{ workspace = true }}

        [tool.imgbuild]
        index-url = "{index_url}"
        # hatchling is not on the local index (see conftest.index_settings)
        extra-index-urls = ["https://pypi.org/simple/"]

        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        """)
    )
    (root / "src" / "app" / "__init__.py").write_text(
        "import json, greeter\n\ndef main():\n    print(json.dumps(greeter.greet()))\n"
    )
    member = root / "packages" / "greeter"
    (member / "src" / "greeter").mkdir(parents=True)
    (member / "pyproject.toml").write_text(
        textwrap.dedent("""\
        [project]
        name = "greeter"
        version = "0.2"
        requires-python = ">=3.11"
        dependencies = ["colours>=0.3"]

        [project.scripts]
        greeter = "greeter:main"

        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        """)
    )
    (member / "src" / "greeter" / "__init__.py").write_text(
        "import colours\n\ndef greet():\n    return {'from': 'greeter', 'red': colours.RED}\n\n"
        "def main():\n    print(greet())\n"
    )
    return root


def test_workspace_lock_and_build(
    docker_env: TestInfra, demo_index: LocalIndex, image_cleanup: list[str], tmp_path: Path
) -> None:
    root = _workspace(tmp_path / "ws", demo_index.url)
    cache = tmp_path / "cache"
    result = imgbuild("lock", root, "--python", "3.11", "--cache-dir", cache)
    assert result.exit_code == 0, result.stderr
    lock = tomllib.loads((root / "pylock.toml").read_text())
    entries = {p["name"]: p for p in lock["packages"]}
    assert entries["greeter"]["directory"] == {"path": "packages/greeter", "editable": False}
    assert entries["app"]["directory"]["path"] == "."
    assert {"colours", "greeting"} <= set(entries)  # the member's dependencies, from the index

    tag = "imgbuild-test/workspace:1"
    image_cleanup.append(tag)
    layout = tmp_path / "layout"
    build_layout(root, cache, layout, "--tag", tag, "--output", "docker")
    output = docker_env.client.containers.run(tag, network_mode="none", remove=True)
    assert json.loads(bytes(output)) == {"from": "greeter", "red": "#f00"}
    history = [h["CreatedBy"] for h in docker_env.client.api.history(tag)]
    assert "imgbuild: local greeter 0.2" in history
    assert history[0] == "imgbuild: project app 1.0"  # newest first: the project is last

    # Editing the member's requirements makes the lock stale.
    member = root / "packages" / "greeter" / "pyproject.toml"
    member.write_text(member.read_text().replace('"colours>=0.3"', '"colours>=0.3", "extra-lib"'))
    check = imgbuild("lock", root, "--check", "--python", "3.11")
    assert check.exit_code == 1
    assert "local project 'greeter'" in check.stderr and "extra-lib" in check.stderr


def test_member_lock_and_build_with_package(
    docker_env: TestInfra, demo_index: LocalIndex, tmp_path: Path
) -> None:
    root = _workspace(tmp_path / "ws", demo_index.url)
    cache = tmp_path / "cache"
    result = imgbuild(
        "lock", root, "--package", "greeter", "--python", "3.11", "--cache-dir", cache
    )
    assert result.exit_code == 0, result.stderr
    assert (root / "pylock.greeter.toml").is_file() and not (root / "pylock.toml").exists()
    # The member has no index settings: the workspace root's apply, as in uv.
    entries = {
        p["name"]: p for p in tomllib.loads((root / "pylock.greeter.toml").read_text())["packages"]
    }
    assert entries["colours"]["index"] == demo_index.url
    layout = tmp_path / "layout"
    build_layout(root, cache, layout, "--package", "greeter")
    unknown = imgbuild("lock", root, "--package", "nope")
    assert unknown.exit_code == 1
    assert "no workspace member named 'nope'" in unknown.stderr


def test_uv_workspace_lock_builds(
    docker_env: TestInfra, demo_index: LocalIndex, tmp_path: Path
) -> None:
    """A workspace locked by real uv: the member comes from its directory source."""
    root = _workspace(tmp_path / "ws", demo_index.url)
    uv_lock(root, demo_index.url)
    layout = tmp_path / "layout"
    built = build_layout(root, tmp_path / "cache", layout)
    assert "lock: uv.lock" in built.stderr


def _virtual_workspace(root: Path, index_url: str) -> Path:
    """A virtual root (no [project]); app -> lib (workspace source) -> colours (index)."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[tool.uv.workspace]\nmembers = ["packages/*"]\n' + index_settings(index_url)
    )
    backend = '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    for name, body, code in (
        (
            "app",
            'dependencies = ["lib"]\n[project.scripts]\napp = "app:main"\n'
            "[tool.uv.sources]\nlib = { workspace = true }\n",
            "import json, lib\n\ndef main():\n    print(json.dumps(lib.colour()))\n",
        ),
        (
            "lib",
            'dependencies = ["colours>=0.3"]\n',
            "import colours\n\ndef colour():\n    return {'from': 'lib', 'red': colours.RED}\n",
        ),
        ("other", 'dependencies = ["extra-lib"]\n', "X = 1\n"),
    ):
        member = root / "packages" / name
        (member / "src" / name).mkdir(parents=True)
        (member / "pyproject.toml").write_text(
            f'[project]\nname = "{name}"\nversion = "1.0"\nrequires-python = ">=3.11"\n'
            + body
            + backend
        )
        (member / "src" / name / "__init__.py").write_text(code)
    uv_lock(root, index_url)
    return root


def test_virtual_workspace_package_from_uv_lock(
    docker_env: TestInfra, demo_index: LocalIndex, image_cleanup: list[str], tmp_path: Path
) -> None:
    """`build --package app --locked` from the root uv.lock that uv wrote: the member's
    closure (lib from source, colours and greeting from the index, not `other`'s
    extra-lib), and its console script runs; a member's directory finds the same lock."""
    root = _virtual_workspace(tmp_path / "ws", demo_index.url)
    assert not list(root.rglob("pylock*.toml"))
    cache = tmp_path / "cache"
    tag = "imgbuild-test/virtual-workspace:1"
    image_cleanup.append(tag)
    layout = tmp_path / "layout"
    built = imgbuild(
        "build", root, "--package", "app", "--locked", "--python", "3.11", "--tag", tag,
        "--cache-dir", cache, "--output", "docker", "--output", f"oci:{layout}",
    )  # fmt: skip
    assert built.exit_code == 0, built.stderr
    assert "lock: uv.lock" in built.stderr
    validate_layout(layout)
    output = docker_env.client.containers.run(tag, network_mode="none", remove=True)
    assert json.loads(bytes(output)) == {"from": "lib", "red": "#f00"}
    history = [h["CreatedBy"] for h in docker_env.client.api.history(tag)]
    assert history[0] == "imgbuild: project app 1.0"
    assert "imgbuild: local lib 1.0" in history
    assert not any("extra-lib" in h or "other" in h for h in history)

    # In the member's directory, as `uv sync` there: the same lock, the same image.
    again = tmp_path / "again"
    from_member = imgbuild(
        "build", root / "packages" / "app", "--frozen", "--python", "3.11",
        "--cache-dir", cache, "--output", f"oci:{again}",
    )  # fmt: skip
    assert from_member.exit_code == 0, from_member.stderr
    index = json.loads((again / "index.json").read_text())
    first = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == first["manifests"][0]["digest"]

    # A member's edit makes the workspace's lock stale for every member, as in uv.
    other = root / "packages" / "other" / "pyproject.toml"
    other.write_text(other.read_text().replace('["extra-lib"]', '["extra-lib", "greeting"]'))
    stale = imgbuild(
        "build", root, "--package", "app", "--locked", "--python", "3.11",
        "--cache-dir", cache, "--output", f"oci:{tmp_path / 'stale'}",
    )  # fmt: skip
    assert stale.exit_code == 1
    assert (
        "error: uv.lock is out of date with pyproject.toml: member 'other' (packages/other): "
        "dependency 'greeting' was added" in stale.stderr
    )

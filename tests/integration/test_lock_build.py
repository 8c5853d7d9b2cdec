"""imgbuild's own lock feeding its own build, over the local package index."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.index_server import LocalIndex
from tests.integration.conftest import MakeProject, imgbuild, index_settings

pytestmark = pytest.mark.docker


def test_lock_then_locked_build(
    docker_env: TestInfra, make_project: MakeProject, demo_index: LocalIndex, tmp_path: Path
) -> None:
    project = make_project(tool=index_settings(demo_index.url))
    (project / "uv.lock").unlink()
    cache = tmp_path / "cache"
    result = imgbuild("lock", project, "--python", "3.11", "--cache-dir", cache)
    assert result.exit_code == 0, result.stderr
    lock = tomllib.loads((project / "pylock.toml").read_text())
    assert lock["created-by"] == "imgbuild"
    names = {p["name"]: p for p in lock["packages"]}
    assert set(names) == {"colours", "demo-app", "extra-lib", "greeting"}
    assert names["extra-lib"]["marker"] == "'dev' in dependency_groups"
    assert "marker" not in names["colours"]
    wheel = names["greeting"]["wheels"][0]
    assert wheel["hashes"]["sha256"] and wheel["size"] > 0 and wheel["url"].startswith("http")
    assert len(lock["environments"]) == 2  # linux/amd64 and linux/arm64 for Python 3.11

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
    assert "lock: pylock.toml" in built.stderr

    # Tightening a specifier that still admits the pin keeps the lock current...
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"colours>=0.3"', '"colours>=0.3,<1"'))
    assert imgbuild("lock", project, "--check", "--python", "3.11").exit_code == 0
    # ...adding a dependency does not, and --locked refuses before building.
    pyproject.write_text(
        pyproject.read_text().replace('"colours>=0.3,<1"', '"colours>=0.3,<1", "extra-lib"')
    )
    check = imgbuild("lock", project, "--check", "--python", "3.11")
    assert check.exit_code == 1
    assert check.stderr.strip() == (
        "error: pylock.toml is out of date with pyproject.toml: dependency 'extra-lib' "
        "was added; run 'imgbuild lock' (or drop --locked)"
    )
    refused = imgbuild(
        "build",
        project,
        "--locked",
        "--python",
        "3.11",
        "--cache-dir",
        cache,
        "--output",
        f"oci:{tmp_path / 'refused'}",
    )
    assert refused.exit_code == 1
    assert not (tmp_path / "refused").exists()


def test_build_without_a_lock_locks_first(
    docker_env: TestInfra,
    make_project: MakeProject,
    demo_index: LocalIndex,
    image_cleanup: list[str],
    tmp_path: Path,
) -> None:
    project = make_project(tool=index_settings(demo_index.url))
    (project / "uv.lock").unlink()
    tag = "imgbuild-test/locks-first:1"
    image_cleanup.append(tag)
    result = imgbuild(
        "build", project, "--python", "3.11", "--tag", tag, "--cache-dir", tmp_path / "cache"
    )
    assert result.exit_code == 0, result.stderr
    assert (project / "pylock.toml").is_file()
    output = docker_env.client.containers.run(tag, network_mode="none", remove=True)
    assert json.loads(bytes(output))["msg"] == "hello image"


def test_build_outside_the_locked_targets_is_refused(
    docker_env: TestInfra, make_project: MakeProject, demo_index: LocalIndex, tmp_path: Path
) -> None:
    project = make_project(tool=index_settings(demo_index.url))
    (project / "uv.lock").unlink()
    assert imgbuild("lock", project, "--python", "3.11").exit_code == 0
    result = imgbuild(
        "build",
        project,
        "--python",
        "3.13",
        "--frozen",
        "--cache-dir",
        tmp_path / "cache",
        "--output",
        f"oci:{tmp_path / 'out'}",
    )
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: pylock.toml: the target matches none of the lock's environments")


def test_new_release_keeps_the_lock_until_upgrade(
    docker_env: TestInfra, fresh_index: LocalIndex, tmp_path: Path
) -> None:
    """A new upstream release never makes a lock stale; --upgrade-package takes it."""
    fresh_index.add_wheel("tool", "1.0.0", files={"tool.py": "V = 1\n"})
    fresh_index.add_wheel("other", "1.0.0", files={"other.py": "V = 1\n"})
    project = tmp_path / "p"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["tool>=1", "other"]\n'
        f'[tool.imgbuild]\nindex-url = "{fresh_index.url}"\n'
    )

    def pins() -> dict[str, str]:
        lock = tomllib.loads((project / "pylock.toml").read_text())
        return {p["name"]: p["version"] for p in lock["packages"] if "version" in p}

    cache = tmp_path / "cache"
    assert imgbuild("lock", project, "--python", "3.11", "--cache-dir", cache).exit_code == 0
    assert pins() == {"tool": "1.0.0", "other": "1.0.0"}
    fresh_index.add_wheel("tool", "1.1.0", files={"tool.py": "V = 2\n"})
    fresh_index.add_wheel("other", "1.1.0", files={"other.py": "V = 2\n"})
    assert imgbuild("lock", project, "--check", "--python", "3.11").exit_code == 0
    relock = imgbuild("lock", project, "--python", "3.11", "--cache-dir", cache)
    assert relock.exit_code == 0, relock.stderr
    assert pins() == {"tool": "1.0.0", "other": "1.0.0"}
    one = imgbuild(
        "lock", project, "--python", "3.11", "--upgrade-package", "tool", "--cache-dir", cache
    )
    assert one.exit_code == 0, one.stderr
    assert pins() == {"tool": "1.1.0", "other": "1.0.0"}
    every = imgbuild("lock", project, "--python", "3.11", "--upgrade", "--cache-dir", cache)
    assert every.exit_code == 0, every.stderr
    assert pins() == {"tool": "1.1.0", "other": "1.1.0"}


def test_conflict_is_explained_in_one_line(
    docker_env: TestInfra, fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_wheel("lib", "1.0", files={"lib.py": ""}, requires=["base<2"])
    fresh_index.add_wheel("base", "1.5", files={"base.py": ""})
    fresh_index.add_wheel("base", "2.1", files={"base.py": ""})
    project = tmp_path / "p"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["lib", "base>=2"]\n'
        f'[tool.imgbuild]\nindex-url = "{fresh_index.url}"\n'
    )
    result = imgbuild("lock", project, "--python", "3.11", "--cache-dir", tmp_path / "c")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "base<2 (required by lib 1.0) conflicts with base>=2 (from pyproject.toml)" in line
    assert not (project / "pylock.toml").exists()


def test_sdist_only_dependency_is_locked_and_built(
    docker_env: TestInfra, fresh_index: LocalIndex, image_cleanup: list[str], tmp_path: Path
) -> None:
    """Metadata through its PEP 517 backend when locking; a pure wheel built for the image."""
    fresh_index.add_wheel("helper", "1.0", files={"helper.py": "NAME = 'helper'\n"})
    fresh_index.add_sdist(
        "srconly",
        "2.0",
        requires=["helper"],
        files={"srconly/__init__.py": "import helper\nVALUE = 'from sdist ' + helper.NAME\n"},
    )
    project = tmp_path / "p"
    (project / "src" / "p").mkdir(parents=True)
    (project / "src" / "p" / "__init__.py").write_text(
        "import srconly\n\ndef main():\n    print(srconly.VALUE)\n"
    )
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["srconly"]\n[project.scripts]\np = "p:main"\n'
        + index_settings(fresh_index.url)
        + '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    )
    cache = tmp_path / "cache"
    locked = imgbuild("lock", project, "--python", "3.11", "--cache-dir", cache)
    assert locked.exit_code == 0, locked.stderr
    entries = {
        p["name"]: p for p in tomllib.loads((project / "pylock.toml").read_text())["packages"]
    }
    assert "sdist" in entries["srconly"] and "wheels" not in entries["srconly"]
    assert entries["helper"]["version"] == "1.0"  # read from the sdist's metadata
    tag = "imgbuild-test/sdist-only:1"
    image_cleanup.append(tag)
    built = imgbuild(
        "build", project, "--locked", "--python", "3.11", "--tag", tag, "--cache-dir", cache
    )
    assert built.exit_code == 0, built.stderr
    output = docker_env.client.containers.run(tag, network_mode="none", remove=True)
    assert bytes(output).decode().strip() == "from sdist helper"


def test_platform_sdist_is_refused_at_build(
    docker_env: TestInfra, fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_sdist("native", "1.0", tags="cp311-cp311-linux_x86_64")
    project = tmp_path / "p"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["native"]\n'
        f'[tool.imgbuild]\nindex-url = "{fresh_index.url}"\n'
    )
    cache = tmp_path / "cache"
    assert imgbuild("lock", project, "--python", "3.11", "--cache-dir", cache).exit_code == 0
    built = imgbuild(
        "build",
        project,
        "--frozen",
        "--python",
        "3.11",
        "--cache-dir",
        cache,
        "--output",
        f"oci:{tmp_path / 'out'}",
    )
    assert built.exit_code == 1
    errors = [line for line in built.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        (
            "error: sdist native-1.0.tar.gz: builds a platform wheel "
            "(native-1.0-cp311-cp311-linux_x86_64.whl); imgbuild only builds pure-Python "
            "sdists; use a version with a wheel for the target"
        )
    ]
    assert not (tmp_path / "out").exists()

"""End to end: system packages from Debian, the ELF check that asks for them, the base lock.

A wheel whose extension needs a library the base lacks is refused, naming the package
to add, and runs once it is added; the file-types example, whose pure-Python dependency
loads libmagic with ctypes, runs only with its ``system-packages`` line; a project's lock
records its base's .debs, a build from it fetches exactly those, and adding a system
package makes it stale.

These read the live Debian archive and PyPI, and use the engine of ``dev/infra.sh``.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import tomlkit

from tests.debian.conftest import DEBIAN_MIRROR, SECURITY_MIRROR, LoopbackMirror
from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import imgbuild
from tests.integration.test_debian_bases import (
    Layout,
    error_lines,
    layer_files,
    loopback_mirrors,
    read_layout,
    run_in_image,
    status_entries,
)

pytestmark = [pytest.mark.docker, pytest.mark.debian, pytest.mark.pypi]

REPO = Path(__file__).resolve().parents[2]

# Runs in the greenlet image: two greenlets hand a value back and forth.
SWITCH = """
import greenlet

def child(x):
    y = greenlet.getcurrent().parent.switch(x + 1)
    return y * 2

g = greenlet.greenlet(child)
print(greenlet.__version__, g.switch(1), g.switch(21), g.dead)
"""


def _mini_definition(path: Path) -> None:
    """debian.toml's recipe without libstdc++6 and libgomp1, Python 3.11 only."""
    recipe = tomllib.loads((REPO / "base-images" / "debian.toml").read_text())
    packages = recipe["build"]["packages"]
    recipe["name"] = "mini"
    recipe["build"]["packages"] = [p for p in packages if p not in ("libstdc++6", "libgomp1")]
    assert len(recipe["build"]["packages"]) == len(packages) - 2
    recipe["python"] = [p for p in recipe["python"] if p["version"] == "3.11"]
    path.write_text(tomlkit.dumps(recipe))


def _greenlet_project(root: Path) -> Path:
    (root / "src" / "switcher").mkdir(parents=True)
    (root / "src" / "switcher" / "__init__.py").write_text("")
    _mini_definition(root / "mini.toml")
    (root / "pyproject.toml").write_text(
        """\
[project]
name = "switcher"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["greenlet==3.1.1"]

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.imgbuild]
base = "mini.toml"
platforms = ["linux/amd64"]
"""
    )
    return root


def test_an_extension_missing_a_library_is_refused_until_it_is_added(
    docker_env: TestInfra, image_cleanup: list[str], tmp_path: Path
) -> None:
    root = _greenlet_project(tmp_path / "switcher")
    tag = "imgbuild-test/d-greenlet:1"
    image_cleanup.append(tag)
    layout = tmp_path / "image"
    args = ("--tag", tag, "-o", "docker", "-o", f"oci:{layout}", "--cache-dir", tmp_path / "c")

    refused = imgbuild("build", root, *args)
    assert refused.exit_code == 1
    (line,) = error_lines(refused.stderr)
    assert line.startswith("error: greenlet 3.1.1: greenlet/_greenlet.cpython-311-"), line
    assert "needs libstdc++.so.6" in line, line
    assert line.endswith('system-packages = ["libstdc++6"]'), line
    assert not layout.exists()
    with pytest.raises(docker.errors.ImageNotFound):
        docker_env.client.images.get(tag)

    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'system-packages = ["libstdc++6"]\n')
    built = imgbuild("build", root, *args)
    assert built.exit_code == 0, built.stderr
    image = read_layout(layout)
    assert image.history[0].startswith("imgbuild: mini base, Debian bookworm ("), image.history
    assert image.history[1] == "imgbuild: system packages libstdc++6", image.history
    status, out = run_in_image(docker_env, tag, "-c", SWITCH, entrypoint="/app/.venv/bin/python")
    assert status == 0, out
    assert out.split() == ["3.1.1", "2", "42", "True"]


def _system_rows(pylock: Path, arch: str) -> set[str]:
    table = tomllib.loads(pylock.read_text())["tool"]["imgbuild"]["debian"]
    return {r["name"] for r in table["debs"] if r["arch"] == arch and r["layer"] == "system"}


def test_file_types_example_needs_its_system_package(
    docker_env: TestInfra, image_cleanup: list[str], tmp_path: Path
) -> None:
    root = tmp_path / "file-types"
    shutil.copytree(REPO / "examples" / "file-types", root, ignore=shutil.ignore_patterns("dist"))
    cache = tmp_path / "cache"
    tag, without_tag = "imgbuild-test/d-filetypes:1", "imgbuild-test/d-filetypes:without"
    image_cleanup.extend([tag, without_tag])

    # The lock the example ships is current; the test locks afresh all the same, so it does
    # not depend on the archive still serving the .debs that lock names.
    assert imgbuild("lock", root, "--check", "--cache-dir", cache).exit_code == 0
    (root / "pylock.toml").unlink()
    locked = imgbuild("lock", root, "--cache-dir", cache)
    assert locked.exit_code == 0, locked.stderr
    table = tomllib.loads((root / "pylock.toml").read_text())["tool"]["imgbuild"]["debian"]
    assert table["system-packages"] == ["libmagic1"]
    for arch in ("amd64", "arm64"):
        system = _system_rows(root / "pylock.toml", arch)
        assert system & {"libmagic1", "libmagic1t64"} and "libmagic-mgc" in system, system
    built = imgbuild("build", root, "--locked", "--tag", tag, "--cache-dir", cache)
    assert built.exit_code == 0, built.stderr
    history = [h["CreatedBy"] for h in docker_env.client.api.history(tag)]
    (system_layer,) = [h for h in history if h.startswith("imgbuild: system packages ")]
    assert "libmagic-mgc" in system_layer and "libmagic1" in system_layer
    status, out = run_in_image(docker_env, tag, "--self-test")
    assert status == 0, out
    assert "4/4 identified" in out

    # The same project without the line: it builds (python-magic is pure Python, so no
    # ELF file asks for libmagic), and fails when the library is looked up at run time.
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    assert 'system-packages = ["libmagic1"]\n' in text
    pyproject.write_text(text.replace('system-packages = ["libmagic1"]\n', ""))
    assert imgbuild("lock", root, "--cache-dir", cache).exit_code == 0
    assert _system_rows(root / "pylock.toml", "amd64") == set()
    built = imgbuild("build", root, "--locked", "--tag", without_tag, "--cache-dir", cache)
    assert built.exit_code == 0, built.stderr
    history = [h["CreatedBy"] for h in docker_env.client.api.history(without_tag)]
    assert not [h for h in history if h.startswith("imgbuild: system packages")]
    status, out = run_in_image(docker_env, without_tag, "--self-test")
    assert status != 0
    assert "ImportError: failed to find libmagic" in out, out


# The base lock: recorded, reused byte for byte, refused once a system package is added.

LOCK_PROJECT = """\
[project]
name = "locked-app"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = []

[project.scripts]
locked-app = "locked_app:main"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.imgbuild]
python = "3.11"
platforms = ["linux/amd64"]
"""


@pytest.fixture
def mirrors() -> Iterator[tuple[LoopbackMirror, LoopbackMirror]]:
    """``loopback_mirrors()`` for one test."""
    with loopback_mirrors() as pair:
        yield pair


def _locked_project(root: Path) -> Path:
    (root / "src" / "locked_app").mkdir(parents=True)
    (root / "src" / "locked_app" / "__init__.py").write_text(
        "import sys\n\ndef main():\n    print('locked', sys.version_info[:2])\n"
    )
    (root / "pyproject.toml").write_text(LOCK_PROJECT)
    return root


def _add_setting(root: Path, line: str) -> None:
    """Add ``line`` to the project's ``[tool.imgbuild]`` (its last table)."""
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + line + "\n")


def _locked_debs(root: Path) -> list[dict[str, Any]]:
    """The base lock's rows, checked for what a rebuild needs."""
    table = tomllib.loads((root / "pylock.toml").read_text())["tool"]["imgbuild"]["debian"]
    assert (table["flavor"], table["suite"], table["system-packages"]) == ("debian", "bookworm", [])
    rows: list[dict[str, Any]] = table["debs"]
    for row in rows:
        assert set(row) >= {"arch", "layer", "name", "version", "url", "sha256", "size"}, row
        assert (row["arch"], row["layer"]) == ("amd64", "base")
        assert re.fullmatch(r"[0-9a-f]{64}", row["sha256"]), row
        assert row["url"].startswith((f"{DEBIAN_MIRROR}/pool/", f"{SECURITY_MIRROR}/pool/"))
        assert row["url"].endswith(f"_{row['architecture']}.deb")
    names = {row["name"] for row in rows}
    assert {"libc6", "python3.11-minimal", "ca-certificates", "tzdata"} <= names
    return rows


def _build_from_lock(
    root: Path, tmp_path: Path, run: str, mirrors: tuple[LoopbackMirror, LoopbackMirror]
) -> tuple[Layout, list[str]]:
    """``build --locked`` in empty caches (this run's): the image, and the URLs the two
    mirrors were asked for, as deb.debian.org URLs."""
    main, security = mirrors
    main.requests.clear()
    security.requests.clear()
    out = tmp_path / f"image-{run}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGBUILD_DEBIAN_CACHE", str(tmp_path / f"debian-{run}"))
        built = imgbuild(
            "build", root, "--locked", "--cache-dir", tmp_path / f"cache-{run}",
            "-o", f"oci:{out}",
        )  # fmt: skip
    assert built.exit_code == 0, built.stderr
    asked = [f"{DEBIAN_MIRROR}/{path}" for path in main.requests]
    asked += [f"{SECURITY_MIRROR}/{path}" for path in security.requests]
    return read_layout(out), sorted(asked)


def test_base_lock_is_recorded_reused_and_refused_when_stale(
    docker_env: TestInfra, tmp_path: Path, mirrors: tuple[LoopbackMirror, LoopbackMirror]
) -> None:
    root = _locked_project(tmp_path / "project")
    lock_cache = ("--cache-dir", tmp_path / "cache-lock")
    locked = imgbuild("lock", root, *lock_cache)
    assert locked.exit_code == 0, locked.stderr
    rows = _locked_debs(root)
    assert imgbuild("lock", root, "--check", *lock_cache).exit_code == 0

    # A build from the lock, in empty caches, asks the mirrors for exactly the locked
    # .debs (by pool path: the mirror is configurable) and nothing else; twice, same image.
    main, security = mirrors
    _add_setting(root, f'debian-mirror = "{main.url}"\ndebian-security-mirror = "{security.url}"')
    one, asked_one = _build_from_lock(root, tmp_path, "one", mirrors)
    two, asked_two = _build_from_lock(root, tmp_path, "two", mirrors)
    assert asked_one == asked_two == sorted(row["url"] for row in rows)
    assert one.manifest_digest == two.manifest_digest
    # The scanner's view of that image is the lock's package list.
    status = layer_files(one.layers[0])["var/lib/dpkg/status"]
    assert status is not None
    installed = status_entries(status.decode())
    assert {name: para["Version"] for name, para in installed.items()} == {
        row["name"]: row["version"] for row in rows
    }

    # A system package added: the lock's base packages are stale, said in one line.
    _add_setting(root, 'system-packages = ["libyaml-0-2"]')
    check = imgbuild("lock", root, "--check", *lock_cache)
    assert check.exit_code == 1
    (line,) = error_lines(check.stderr)
    assert "stale" in line and "libyaml-0-2" in line, check.stderr
    out = tmp_path / "refused"
    refused = imgbuild(
        "build", root, "--locked", "--cache-dir", tmp_path / "cache-one", "-o", f"oci:{out}"
    )
    assert refused.exit_code == 1
    (line,) = error_lines(refused.stderr)
    assert "stale" in line and "libyaml-0-2" in line and "imgbuild lock" in line, refused.stderr
    assert not out.exists()

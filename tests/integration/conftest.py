"""Helpers for end-to-end builds: generated projects locked by real uv, a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebuild.cli import app
from imagebuild.image.validate import validate_layout
from tests.fixtures.index_server import LocalIndex

UV = shutil.which("uv")


@dataclass
class CliResult:
    """Exit code and the two output streams of one imgbuild run."""

    exit_code: int
    stdout: str
    stderr: str


def imgbuild(*args: str | Path) -> CliResult:
    """Run the imgbuild CLI in-process, as a user would type it."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


def build_layout(root: Path, cache: Path, layout: Path, *extra: str | Path) -> CliResult:
    """``build --locked --python 3.11`` into the OCI layout ``layout`` (plus ``extra``),
    checked to succeed and to write a valid layout."""
    built = imgbuild(
        "build", root, "--locked", "--python", "3.11", "--cache-dir", cache,
        "--output", f"oci:{layout}", *extra,
    )  # fmt: skip
    assert built.exit_code == 0, built.stderr
    validate_layout(layout)
    return built


def build_from_pypi(tmp_path: Path, name: str, dependency: str, tag: str) -> list[str]:
    """Build a project ``name`` needing only ``dependency`` (from PyPI) on debian-slim into
    the engine as ``tag``; checked to succeed, its ``warning:`` lines returned."""
    project = tmp_path / name
    (project / "src" / name).mkdir(parents=True)
    (project / "src" / name / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "1.0"\nrequires-python = ">=3.11"\n'
        f'dependencies = ["{dependency}"]\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    )
    built = imgbuild(
        "build", project, "--tag", tag, "--base", "debian-slim", "--python", "3.11",
        "--cache-dir", tmp_path / "cache", "--output", "docker",
    )  # fmt: skip
    assert built.exit_code == 0, built.stderr
    return [line for line in built.stderr.splitlines() if line.startswith("warning:")]


def index_settings(index_url: str) -> str:
    """A ``[tool.imgbuild]`` table: the local index first, then PyPI for the build backend
    (hatchling), which the local index does not serve. Build requirements come only from
    a project's own indexes, so a project naming just the local index could not build."""
    return (
        f'\n[tool.imgbuild]\nindex-url = "{index_url}"\n'
        'extra-index-urls = ["https://pypi.org/simple/"]\n'
    )


def uv_lock(project: Path, index_url: str) -> None:
    """Lock ``project`` with real uv against the local index only."""
    assert UV is not None, "uv is required (dev/test installs it)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    subprocess.run(
        [
            UV,
            "lock",
            "--index-url",
            index_url,
            "--no-config",
            "--quiet",
            "--python",
            sys.executable,
            "--no-python-downloads",
        ],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def demo_index(package_index: LocalIndex) -> LocalIndex:
    """Two small libraries on the local index: greeting (with a console script) and colours."""
    package_index.add_wheel(
        "greeting",
        "1.2.0",
        files={
            "greeting/__init__.py": "def hello(name):\n    return f'hello {name}'\n",
            "greeting/cli.py": "def main():\n    print('greeting cli')\n",
        },
        entry_points={"console_scripts": {"greet": "greeting.cli:main"}},
    )
    package_index.add_wheel(
        "colours",
        "0.3.0",
        files={"colours.py": "RED = '#f00'\n", "colours_data/palette.py": "P = [1, 2]\n"},
        requires=["greeting>=1"],
    )
    package_index.add_wheel("extra-lib", "2.0.0", files={"extra_lib/__init__.py": "X = 1\n"})
    return package_index


MakeProject = Callable[..., Path]


@pytest.fixture
def make_project(tmp_path: Path, demo_index: LocalIndex) -> MakeProject:
    """Write a locked project ``demo-app`` using the demo index; returns its directory."""

    def make(
        *,
        dependencies: Sequence[str] = ("colours>=0.3",),
        tool: str = "",
        name: str = "project",
    ) -> Path:
        root = tmp_path / name
        (root / "src" / "demo_app").mkdir(parents=True)
        deps = ", ".join(f'"{d}"' for d in dependencies)
        (root / "pyproject.toml").write_text(
            textwrap.dedent(
                f"""\
                [project]
                name = "demo-app"
                version = "0.1.0"
                description = "A demo application"
                license = "MIT"
                requires-python = ">=3.11"
                dependencies = [{deps}]

                [project.scripts]
                demo-app = "demo_app:main"

                [project.urls]
                Source = "https://github.com/example/demo-app"

                [dependency-groups]
                dev = ["extra-lib"]

                [build-system]
                requires = ["hatchling"]
                build-backend = "hatchling.build"
                """
            )
            + tool
        )
        (root / "src" / "demo_app" / "__init__.py").write_text(
            textwrap.dedent(
                """\
                import json, os, sys

                import colours
                import greeting


                def main():
                    print(json.dumps({"uid": os.getuid(), "msg": greeting.hello("image"),
                                      "red": colours.RED, "exe": sys.executable,
                                      "argv": sys.argv[1:]}))
                """
            )
        )
        uv_lock(root, demo_index.url)
        return root

    return make

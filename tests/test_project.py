from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from imagebuild.errors import ProjectError
from imagebuild.project.spec import load_project


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


FULL = """
[project]
name = "My_App.Server"
version = "1.2.0"
description = "A service"
requires-python = ">=3.11"
license = "mit OR apache-2.0"
authors = [{name = "Ada", email = "ada@example.org"}, {email = "ops@example.org"}]
dependencies = ["httpx>=0.27", "Click", "anyio[trio]>=4; python_version >= '3.11'"]

[project.optional-dependencies]
Fast_Json = ["orjson"]

[project.scripts]
serve = "my_app.server:main"

[project.urls]
Source = "https://example.org/src"

[dependency-groups]
test = ["pytest>=8", {include-group = "Lint"}]
lint = ["ruff"]

[tool.uv]
dev-dependencies = ["ipython"]

[tool.imgbuild]
base = "python:3.11-slim"
layers = [{name = "deps"}]

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
"""


def test_full_project(tmp_path: Path) -> None:
    spec = load_project(write(tmp_path, FULL))
    assert spec.root == tmp_path.absolute()
    assert spec.name == "my-app-server"
    assert spec.version == Version("1.2.0")
    assert spec.description == "A service"
    assert spec.requires_python == SpecifierSet(">=3.11")
    assert spec.license == "MIT OR Apache-2.0"
    assert spec.authors == ("Ada <ada@example.org>", "ops@example.org")
    # sorted by canonical name
    assert [str(r) for r in spec.dependencies] == [
        'anyio[trio]>=4; python_version >= "3.11"',
        "Click",
        "httpx>=0.27",
    ]
    assert list(spec.optional_dependencies) == ["fast-json"]
    assert [str(r) for r in spec.optional_dependencies["fast-json"]] == ["orjson"]
    assert {g: [str(r) for r in reqs] for g, reqs in spec.dependency_groups.items()} == {
        "dev": ["ipython"],
        "lint": ["ruff"],
        "test": ["pytest>=8", "ruff"],
    }
    assert spec.scripts == {"serve": "my_app.server:main"}
    assert spec.urls == {"Source": "https://example.org/src"}
    assert spec.tool_imgbuild == {"base": "python:3.11-slim", "layers": [{"name": "deps"}]}
    assert type(spec.tool_imgbuild) is dict
    assert spec.has_build_system
    assert spec.dynamic == ()
    assert spec.pyproject == tmp_path.absolute() / "pyproject.toml"


def test_minimal_and_dynamic(tmp_path: Path) -> None:
    spec = load_project(write(tmp_path, '[project]\nname = "x"\ndynamic = ["version"]\n'))
    assert spec.version is None
    assert spec.dynamic == ("version",)
    assert spec.requires_python is None
    assert spec.dependencies == ()
    assert spec.tool_imgbuild == {}
    assert not spec.has_build_system


def test_pyproject_path_accepted(tmp_path: Path) -> None:
    write(tmp_path, '[project]\nname = "x"\nversion = "1"\n')
    assert load_project(tmp_path / "pyproject.toml").name == "x"


def test_legacy_dev_dependencies_merge_into_dev_group(tmp_path: Path) -> None:
    spec = load_project(
        write(
            tmp_path,
            """
            [project]
            name = "x"
            version = "1"
            [dependency-groups]
            Dev = ["pytest"]
            [tool.uv]
            dev-dependencies = ["mypy"]
            """,
        )
    )
    assert [str(r) for r in spec.dependency_groups["dev"]] == ["mypy", "pytest"]


def test_license_text_and_file(tmp_path: Path) -> None:
    (tmp_path / "LICENSE").write_text("All rights reserved\n")
    spec = load_project(
        write(tmp_path, '[project]\nname = "x"\nversion = "1"\nlicense = {file = "LICENSE"}\n')
    )
    assert spec.license == "All rights reserved\n"
    spec = load_project(
        write(tmp_path, '[project]\nname = "x"\nversion = "1"\nlicense = {text = "MIT"}\n')
    )
    assert spec.license == "MIT"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProjectError) as info:
        load_project(tmp_path)
    text = str(info.value)
    assert "\n" not in text
    assert "no pyproject.toml in" in text
    assert "run imgbuild in a directory with a pyproject.toml" in text


BAD_CASES = [
    ("[project\n", "invalid TOML"),
    ("[tool]\n", "project: the [project] table is missing"),
    ('[project]\nversion = "1"\n', "project.name: missing"),
    ('[project]\nname = "-x-"\nversion = "1"\n', "project.name: invalid project name '-x-'"),
    ('[project]\nname = "x"\n', "project.version: missing"),
    ('[project]\nname = "x"\nversion = "one"\n', "project.version: invalid version 'one'"),
    (
        '[project]\nname = "x"\nversion = "1"\ndynamic = ["version"]\n',
        "project.version: is set but also listed in project.dynamic",
    ),
    (
        '[project]\nname = "x"\nversion = "1"\ndependencies = ["a", "b", "foo>>1"]\n',
        "project.dependencies[2]: invalid requirement 'foo>>1'",
    ),
    (
        '[project]\nname = "x"\nversion = "1"\nrequires-python = "3.11"\n',
        "project.requires-python: invalid specifier '3.11'",
    ),
    (
        '[project]\nname = "x"\nversion = "1"\n[project.optional-dependencies]\nfast = ["a b"]\n',
        "project.optional-dependencies.fast[0]: invalid requirement 'a b'",
    ),
    (
        (
            '[project]\nname = "x"\nversion = "1"\n[dependency-groups]\na = [{include-group = "b"}]\n'
            'b = [{include-group = "a"}]\n'
        ),
        "include-group cycle",
    ),
    (
        '[project]\nname = "x"\nversion = "1"\n[dependency-groups]\na = [{include-group = "c"}]\n',
        "dependency-groups.a[0]: includes unknown group 'c'",
    ),
    (
        '[project]\nname = "x"\nversion = "1"\n[dependency-groups]\na = ["x"]\nA = ["y"]\n',
        "is defined twice",
    ),
    (
        '[project]\nname = "x"\nversion = "1"\nlicense = "Not A License"\n',
        "project.license: invalid SPDX license expression",
    ),
    (
        '[project]\nname = "x"\nversion = "1"\n[tool]\nimgbuild = 3\n',
        "tool.imgbuild: must be a table",
    ),
    ('[project]\nname = "x"\nversion = "1"\nscripts = {a = 1}\n', "project.scripts.a"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_invalid(tmp_path: Path, text: str, expected: str) -> None:
    write(tmp_path, text)
    with pytest.raises(ProjectError) as info:
        load_project(tmp_path)
    message = str(info.value)
    assert expected in message
    assert "pyproject.toml" in message
    assert "\n" not in message

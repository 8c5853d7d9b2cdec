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


# -- [[tool.uv.index]] and index order (imagebuild.project.indexes) --------------------------

UV_INDEXES = """
[project]
name = "p"
version = "1"

[[tool.uv.index]]
name = "internal"
url = "https://pkgs.example/simple/"

[[tool.uv.index]]
name = "torch"
url = "https://torch.example/simple/"
explicit = true

[[tool.uv.index]]
name = "mirror"
url = "https://mirror.example/simple/"
default = true
"""


def test_uv_indexes_are_parsed_once_into_values(tmp_path: Path) -> None:
    from imagebuild.project.spec import UvIndex

    project = load_project(write(tmp_path, UV_INDEXES))
    assert project.uv_indexes == (
        UvIndex(url="https://pkgs.example/simple/", name="internal"),
        UvIndex(url="https://torch.example/simple/", name="torch", explicit=True),
        UvIndex(url="https://mirror.example/simple/", name="mirror", default=True),
    )


def test_lock_indexes_default_is_pypi(tmp_path: Path) -> None:
    from imagebuild.project.indexes import PYPI, lock_indexes
    from imagebuild.project.settings import parse_settings

    project = load_project(write(tmp_path, '[project]\nname = "p"\nversion = "1"\n'))
    assert lock_indexes(parse_settings({}), project) == (PYPI,)


def test_lock_indexes_follow_uv_order(tmp_path: Path) -> None:
    from imagebuild.project.indexes import lock_indexes
    from imagebuild.project.settings import parse_settings

    project = load_project(write(tmp_path, UV_INDEXES))
    # Declared indexes first, explicit ones only for pinned sources, the default last.
    assert lock_indexes(parse_settings({}), project) == (
        "https://pkgs.example/simple/",
        "https://mirror.example/simple/",
    )
    settings = parse_settings({"extra-index-urls": ["https://x/simple/"]})
    assert lock_indexes(settings, project)[0] == "https://x/simple/"
    settings = parse_settings(
        {"index-url": "https://a/simple/", "extra-index-urls": ["https://b/simple/"]}
    )
    assert lock_indexes(settings, project) == ("https://a/simple/", "https://b/simple/")


def test_workspace_member_takes_the_roots_indexes(tmp_path: Path) -> None:
    from imagebuild.project.indexes import index_entries, lock_indexes
    from imagebuild.project.settings import parse_settings
    from imagebuild.project.workspace import load_workspace

    root = write(
        tmp_path,
        UV_INDEXES.replace('[project]\nname = "p"\nversion = "1"\n', "")
        + '\n[tool.uv.workspace]\nmembers = ["m"]\n',
    )
    (root / "m").mkdir()
    write(root / "m", '[project]\nname = "m"\nversion = "1"\n')
    workspace = load_workspace(root)
    member = workspace.members["m"]
    assert lock_indexes(parse_settings({}), member, workspace) == (
        "https://pkgs.example/simple/",
        "https://mirror.example/simple/",
    )
    (root / "pyproject.toml").write_text(
        '[tool.imgbuild]\nindex-url = "https://root/simple/"\n[tool.uv.workspace]\nmembers = ["m"]\n'
    )
    workspace = load_workspace(root)
    assert lock_indexes(parse_settings({}), member, workspace) == ("https://root/simple/",)
    assert [(e.url, e.name) for e in index_entries(["https://a/"], member, workspace)] == [
        ("https://a/", None)
    ]


def test_index_entries_name_every_declared_index(tmp_path: Path) -> None:
    from imagebuild.net.credentials import IndexEntry
    from imagebuild.project.indexes import index_entries

    project = load_project(write(tmp_path, UV_INDEXES))
    assert index_entries(["https://use/simple/"], project, None) == [
        IndexEntry(url="https://use/simple/"),
        IndexEntry(url="https://pkgs.example/simple/", name="internal"),
        IndexEntry(url="https://torch.example/simple/", name="torch"),
        IndexEntry(url="https://mirror.example/simple/", name="mirror"),
    ]

"""[tool.imgbuild] parsing: accepted shapes and one-line errors with dotted paths."""

from __future__ import annotations

import pytest

from imagebuild.project.settings import ImageSettings, parse_python_version, parse_settings
from imagebuild.errors import ProjectError


def test_defaults_run_as_nonroot_on_the_built_debian_base() -> None:
    settings = parse_settings({})
    assert settings == ImageSettings()
    assert settings.user == "65532"
    assert settings.base == "debian"
    assert settings.system_packages == ()
    assert settings.workdir == "/app"


def test_full_table_is_normalised() -> None:
    settings = parse_settings(
        {
            "base": "debian-slim",
            "python": "3.13",
            "entrypoint": "hello-api",
            "cmd": ["--port", "8000"],
            "user": 1000,
            "env": {"B": "2", "A": 1},
            "labels": {"team": "data"},
            "ports": [8000, 80, 8000],
            "groups": ["prod", "prod"],
            "max-layers": 60,
        }
    )
    assert settings.max_layers == 60
    assert settings.python == (3, 13)
    assert settings.entrypoint == ("hello-api",)
    assert settings.user == "1000"
    assert settings.env == (("A", "1"), ("B", "2"))
    assert settings.ports == (80, 8000)
    assert settings.groups == ("prod",)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"bsae": "x"}, "tool.imgbuild.bsae: unknown setting"),
        ({"python": "3"}, "tool.imgbuild.python: Python version '3' must look like '3.11'"),
        ({"cmd": [1, 2]}, "tool.imgbuild.cmd: expected a list of strings"),
        ({"env": {"A": [1]}}, "tool.imgbuild.env.A: expected a string"),
        ({"ports": [0]}, "tool.imgbuild.ports: expected a list of port numbers"),
        ({"base": 3}, "tool.imgbuild.base: expected a string"),
        ({"max-layers": 200}, "tool.imgbuild.max-layers: expected a whole number from 3 to 127"),
        ({"max-layers": "50"}, "tool.imgbuild.max-layers: expected a whole number from 3 to 127"),
        ({"max-layers": True}, "tool.imgbuild.max-layers: expected a whole number from 3 to 127"),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ProjectError) as info:
        parse_settings(table)
    assert message in info.value.message
    assert info.value.message.startswith("pyproject.toml: ")
    assert "\n" not in str(info.value)


def test_python_version_parsing() -> None:
    assert parse_python_version(" 3.11 ", "--python") == (3, 11)
    with pytest.raises(ProjectError, match="--python"):
        parse_python_version("2.7", "--python")


def test_lock_settings() -> None:
    settings = parse_settings(
        {
            "index-url": "http://127.0.0.1:8080/simple/",
            "extra-index-urls": ["http://127.0.0.1:8081/simple/"],
            "platforms": ["linux/amd64"],
            "prereleases": True,
        }
    )
    assert settings.index_url == "http://127.0.0.1:8080/simple/"
    assert settings.extra_index_urls == ("http://127.0.0.1:8081/simple/",)
    assert settings.platforms == ("linux/amd64",)
    assert settings.prereleases is True
    with pytest.raises(ProjectError, match="tool.imgbuild.platforms: unsupported platform"):
        parse_settings({"platforms": ["windows/amd64"]})

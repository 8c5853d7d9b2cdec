"""Bad inputs through the CLI: each is one ``error:`` line (what, where, how to fix), exit 1.

One data table holds the cases that used to end in a traceback or be accepted silently
(issue 12): each row is a project, the arguments, the environment, and the words the one
line must hold. Rows that need the test registry (a base is pulled before the check can
be made) are marked ``docker``. The module prints how many bad inputs it tried.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebuild.cli import app
from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import demo_index, make_project  # noqa: F401 (fixtures)

TRIED: list[str] = []

PYPROJECT = """\
[project]
name = "demo"
version = "1.0"
requires-python = "{requires}"

[project.scripts]
demo = "demo:main"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
{tool}"""

# A lock of a project without dependencies: enough for --frozen to get past the lock.
EMPTY_LOCK = """\
lock-version = "1.0"
created-by = "tests"
requires-python = ">=3.11"
packages = []
"""


@dataclass(frozen=True)
class Case:
    """One bad input: the project, the command line and what the error line must say."""

    name: str
    args: tuple[str, ...]
    expected: tuple[str, ...]
    tool: str = ""
    requires: str = ">=3.11"
    env: dict[str, str] = field(default_factory=dict)
    cache: Callable[[Path], Path] | None = None
    """Makes the --cache-dir from the test's tmp dir (default: a fresh directory)."""
    infra: bool = False
    """Needs the test registry (the base is pulled before the check)."""


def _a_file(tmp: Path) -> Path:
    path = tmp / "cache-file"
    path.write_text("not a directory\n")
    return path


CASES = [
    Case(
        "platform-comma",
        ("--platform", ","),
        ("error: --platform ',': names no platform", "use linux/amd64"),
    ),
    Case(
        "platform-empty",
        ("--platform", ""),
        ("error: --platform '': names no platform", "use linux/amd64"),
    ),
    Case(
        "cache-dir-is-a-file",
        (),
        ("(--cache-dir) is a file, not a directory", "pass --cache-dir DIR"),
        cache=_a_file,
    ),
    Case(
        "cache-dir-under-a-file",
        (),
        ("(--cache-dir) is under a file", "pass --cache-dir DIR"),
        cache=lambda tmp: _a_file(tmp) / "cache",
    ),
    Case(
        # sysfs refuses new entries even to root, where chmod would not.
        "cache-dir-not-writable",
        (),
        ("cache directory /sys/imgbuild-cache (--cache-dir) is not writable", "--cache-dir DIR"),
        cache=lambda tmp: Path("/sys/imgbuild-cache"),
    ),
    Case(
        "cache-env-not-writable",
        (),
        ("cache directory /sys (IMGBUILD_CACHE_DIR) is not writable", "IMGBUILD_CACHE_DIR"),
        env={"IMGBUILD_CACHE_DIR": "/sys"},
        cache=lambda tmp: Path(),
    ),
    Case(
        "user-true",
        (),
        ("tool.imgbuild.user: expected a user name or uid", "got True", '"65532"'),
        tool="\n[tool.imgbuild]\nuser = true\n",
    ),
    Case(
        "user-minus-one",
        (),
        ("tool.imgbuild.user: expected a user name or uid", "got '-1'"),
        tool='\n[tool.imgbuild]\nuser = "-1"\n',
    ),
    Case(
        "user-negative-int",
        (),
        ("tool.imgbuild.user", "got -1"),
        tool="\n[tool.imgbuild]\nuser = -1\n",
    ),
    Case(
        "requires-python-vs---python",
        ("--python", "3.11"),
        ("requires-python >=3.12 excludes Python 3.11 of base debian", "--python 3.13"),
        requires=">=3.12",
    ),
    Case(
        "requires-python-vs-settings-python",
        (),
        ("requires-python <3.11,>=3.9 excludes Python 3.13 of base debian-slim",),
        requires=">=3.9,<3.11",
        tool='\n[tool.imgbuild]\nbase = "debian-slim"\npython = "3.13"\n',
    ),
    Case(
        "docker-output-no-engine",
        ("--frozen", "--output", "docker"),
        ("error: cannot reach the Docker engine", "use --output oci:DIR"),
        env={"DOCKER_HOST": "unix:///nonexistent/imgbuild-test.sock"},
    ),
    Case(
        "entrypoint-no-such-script",
        ("--frozen", "--output", "oci:{tmp}/image", "--no-compile"),
        ("tool.imgbuild.entrypoint 'no-such-script' is neither a script", "demo"),
        tool='\n[tool.imgbuild]\nentrypoint = ["no-such-script"]\n',
        infra=True,
    ),
    Case(
        "requires-python-vs-base-by-reference",
        (
            "--frozen",
            "--base",
            "{registry}/distroless/python3-debian12:latest",
            "-o",
            "oci:{tmp}/i",
        ),
        ("requires-python >=3.12 excludes Python 3.11 of base", "python3-debian12", "base = "),
        requires=">=3.12",
        infra=True,
    ),
]


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    line = f"bad inputs tried through the CLI: {len(TRIED)} ({', '.join(TRIED)})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


def _project(root: Path, case: Case) -> Path:
    (root / "src" / "demo").mkdir(parents=True)
    (root / "src" / "demo" / "__init__.py").write_text("def main():\n    print('demo')\n")
    (root / "pyproject.toml").write_text(PYPROJECT.format(requires=case.requires, tool=case.tool))
    (root / "pylock.toml").write_text(EMPTY_LOCK)
    return root


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.docker] if c.infra else []) for c in CASES],
)
def test_bad_input_is_one_line_and_exit_1(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    registry = ""
    if case.infra:
        infra: TestInfra = request.getfixturevalue("docker_env")
        registry = infra.registry
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    project = _project(tmp_path / "project", case)
    cache = case.cache(tmp_path) if case.cache else tmp_path / "cache"
    cache_args = ("--cache-dir", str(cache)) if str(cache) != "." else ()
    args = [a.format(tmp=tmp_path, registry=registry) for a in case.args]
    started = time.monotonic()
    result = CliRunner().invoke(app, ["build", str(project), *args, *cache_args])
    TRIED.append(case.name)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("·")]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for words in case.expected:
        assert words in errors[0], errors[0]
    assert "; " in errors[0], f"no fix named: {errors[0]}"
    # Refused before the build: nothing under the cache's tmp/, and quickly.
    if cache_args:
        assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    if not case.infra:
        assert time.monotonic() - started < 20


# -- what used to be refused or late, and now goes through ---------------------------------


@pytest.mark.docker
def test_a_lock_made_with_index_url_passes_build_locked_with_the_same_indexes(
    docker_env: TestInfra, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    index = request.getfixturevalue("demo_index")
    project = request.getfixturevalue("make_project")()
    (project / "uv.lock").unlink()
    indexes = ("--index-url", index.url, "--extra-index-url", "https://pypi.org/simple/")
    cache = ("--cache-dir", str(tmp_path / "cache"))
    runner = CliRunner()
    locked = runner.invoke(app, ["lock", str(project), *indexes, *cache])
    assert locked.exit_code == 0, locked.stderr
    build = ["build", str(project), "--locked", "--no-compile", *cache]
    same = runner.invoke(app, [*build, *indexes, "-o", f"oci:{tmp_path}/image"])
    assert same.exit_code == 0, same.stderr
    # Without them the build's indexes are the project's (PyPI): --locked says so.
    other = runner.invoke(app, [*build, "-o", f"oci:{tmp_path}/other"])
    assert other.exit_code == 1
    assert "the indexes changed" in other.stderr, other.stderr


@pytest.mark.docker
def test_an_oci_output_needs_no_engine(
    docker_env: TestInfra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/imgbuild-test.sock")
    project = _project(tmp_path / "project", Case("oci", (), ()))
    result = CliRunner().invoke(
        app,
        ["build", str(project), "--frozen", "--no-compile", "-o", f"oci:{tmp_path}/image"]
        + ["--cache-dir", str(tmp_path / "cache")],
    )
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "image" / "index.json").is_file()

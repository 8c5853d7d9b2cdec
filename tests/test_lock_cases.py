"""`imgbuild lock` on whole projects: data cases in tests/cases/lock-project/*.toml.

Each case is a project tree (workspace members, path sources) and the packages of a real
local index (generated wheels, and sdists with a tiny in-tree PEP 517 backend, so their
metadata really comes from ``prepare_metadata_for_build_wheel`` or a wheel build). The CLI
locks it in-process (``imgbuild lock DIR --python 3.11 ARGS``); the written lock must match
``[expected]``, or the run must fail with the one stderr line ``error``.

Case file format (one case per file; the file name is the test id):

    # what the case shows
    args = ["--package", "greeter"]     # optional: more `imgbuild lock` arguments
    lock = "pylock.greeter.toml"        # optional: the file to read (default pylock.toml)

    [files]                             # the project tree; "{index}" is the index URL
    "pyproject.toml" = '''...'''
    "packages/greeter/pyproject.toml" = '''...'''

    [index.colours."0.3"]               # served files of one release (all keys optional)
    requires = ["greeting>=1"]          # Requires-Dist
    requires_python = ">=3.8"
    tags = ["py3-none-any"]             # one wheel per tag
    sdist = true                        # an sdist besides the wheels
    sdist_only = true                   # no wheels at all
    fail = "needs a C compiler"         # the sdist's backend fails every hook
    prepare_metadata = false            # the sdist's backend lacks that hook
    yanked = true

    [expected]                          # either: every package in the lock
    colours = "0.3"                     # version; no marker, wheels only
    greeter = { directory = "packages/greeter" }
    only-src = { version = "1.0", sdist = "only_src-1.0.tar.gz" }
    dev-tool = { version = "2.0", marker = "'dev' in dependency_groups" }

    error = "error: ..."                # or: exit 1, and this is the one error line on stderr
                                        # ("{project}" is the project directory)
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imagebuild.cli import app
from tests.fixtures.index_server import LocalIndex
from tests.fixtures.registry_server import LocalRegistry

CASES = sorted((Path(__file__).parent / "cases" / "lock-project").glob("*.toml"))


def _serve(index: LocalIndex, projects: dict[str, dict[str, dict[str, Any]]]) -> None:
    for name, versions in projects.items():
        for version, entry in versions.items():
            common = {
                "requires": entry.get("requires", ()),
                "requires_python": entry.get("requires_python"),
            }
            yanked = entry.get("yanked", False)
            if not entry.get("sdist_only"):
                for tag in entry.get("tags", ["py3-none-any"]):
                    index.add_wheel(name, version, tags=tag, yanked=yanked, **common)
            if entry.get("sdist") or entry.get("sdist_only"):
                index.add_sdist(
                    name,
                    version,
                    yanked=yanked,
                    fail=entry.get("fail"),
                    prepare_metadata=entry.get("prepare_metadata", True),
                    **common,
                )


def _entry(package: dict[str, Any]) -> dict[str, Any] | str:
    """A lock entry in the case's terms: a bare version for a plain index package."""
    entry: dict[str, Any] = {}
    if "version" in package:
        entry["version"] = package["version"]
    if "marker" in package:
        entry["marker"] = package["marker"]
    if "directory" in package:
        entry["directory"] = package["directory"]["path"]
        entry.pop("version", None)  # a local project's version is its pyproject's business
    if "sdist" in package:
        entry["sdist"] = package["sdist"]["url"].rsplit("/", 1)[-1]
    if set(entry) == {"version"} and package.get("wheels"):
        return entry["version"]
    return entry


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case(
    path: Path,
    tmp_path: Path,
    fresh_index: LocalIndex,
    local_registry: LocalRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case: dict[str, Any] = tomllib.loads(path.read_text())
    _serve(fresh_index, case.get("index", {}))
    project = tmp_path / "project"
    for name, text in case["files"].items():
        file = project / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text.replace("{index}", fresh_index.url))
    # The catalog base's digest is looked up beside the resolution: ask the test registry,
    # which does not have it, so nothing leaves the machine and nothing is recorded.
    hosts = ("docker.io", "gcr.io")
    monkeypatch.setenv(
        "IMGBUILD_REGISTRY_MIRRORS", ",".join(f"{h}={local_registry.host}" for h in hosts)
    )
    args = ["lock", str(project), "--python", "3.11", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, [*args, *case.get("args", [])])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception

    if "error" in case:
        assert result.exit_code == 1, result.stdout
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [case["error"].replace("{project}", str(project))]
        assert not list(project.rglob("pylock*.toml"))  # nothing half-written
        return
    assert result.exit_code == 0, result.stderr
    lock = tomllib.loads((project / case.get("lock", "pylock.toml")).read_text())
    got = {p["name"]: _entry(p) for p in lock["packages"]}
    assert got == case["expected"]


def test_a_current_lock_is_kept_without_a_base_digest(
    tmp_path: Path,
    fresh_index: LocalIndex,
    local_registry: LocalRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry has no copy of the base, so no digest is recorded: re-locking still
    keeps the current lock, with no request to the index (as `uv lock` does)."""
    fresh_index.add_wheel("colours", "0.3")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "1.0"\nrequires-python = ">=3.11"\n'
        f'dependencies = ["colours"]\n[tool.imgbuild]\nindex-url = "{fresh_index.url}"\n'
    )
    monkeypatch.setenv("IMGBUILD_REGISTRY_MIRRORS", f"gcr.io={local_registry.host}")
    args = ["lock", str(project), "--python", "3.11", "--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.stderr
    assert "bases" not in tomllib.loads((project / "pylock.toml").read_text())["tool"]["imgbuild"]
    served = len(fresh_index.requests)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.stderr
    assert "lock: pylock.toml is up to date" in again.stderr
    assert len(fresh_index.requests) == served

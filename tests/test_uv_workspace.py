"""uv workspaces from uv's own lock: data cases in tests/cases/uv-workspace/*.toml.

Each case is a workspace tree and the packages of a real local index; real uv locks it.
``[[select]]``: what ``build --package NAME`` installs (``select_packages`` from NAME)
must be what ``uv export --package NAME`` lists for the target, with the same extras and
groups. ``[[staleness]]``: after an edit, ``uv lock --locked`` must agree with ``expect``
and so must imgbuild's ``check_locked`` over the workspace (with ``message`` in its line).
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from imagebuild.errors import LockError
from imagebuild.lock.load import load_lock
from imagebuild.lock.select import select_packages
from imagebuild.lock.staleness import check_locked
from imagebuild.pipeline.locate import locate_lock, workspace_lock
from imagebuild.project.workspace import load_workspace
from imagebuild.target.platform import TargetPlatform
from tests.fixtures.index_server import LocalIndex
from tests.test_lock import UV, run_uv

CASES = sorted((Path(__file__).parent / "cases" / "uv-workspace").glob("*.toml"))
TARGET = TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch="x86_64")


def _case(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _locked_workspace(case: dict[str, Any], index: LocalIndex, root: Path) -> Path:
    for name, versions in case.get("index", {}).items():
        if index.files_for(name):  # the session's index: served by an earlier test
            continue
        for version, entry in versions.items():
            index.add_wheel(name, version, requires=entry.get("requires", ()))
    for name, text in case["files"].items():
        file = root / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    assert UV is not None, "uv is not installed: run the tests through 'bash dev/test'"
    result = run_uv(root, index.url, "lock")
    assert result.returncode == 0, result.stderr
    return root


def _uv_export(root: Path, index: LocalIndex, select: dict[str, Any]) -> list[str]:
    """``uv export --package``'s packages that apply to TARGET, as ``name version``."""
    args = ["export", "--frozen", "--package", select["package"], "--no-default-groups"]
    args += ["--format", "requirements-txt", "--no-hashes", "--no-header", "--no-annotate"]
    for extra in select.get("extras", ()):
        args += ["--extra", extra]
    for group in select.get("groups", ()):
        args += ["--group", group]
    result = run_uv(root, index.url, *args)
    assert result.returncode == 0, result.stderr
    env = TARGET.marker_environment()
    out = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("-e "):  # local packages: checked by name below
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            (spec,) = req.specifier
            out.append(f"{canonicalize_name(req.name)} {spec.version}")
    return sorted(out)


def _uv_local(root: Path, index: LocalIndex, select: dict[str, Any]) -> list[str]:
    """The workspace members ``uv export`` installs besides the package itself."""
    args = ["export", "--frozen", "--package", select["package"], "--no-default-groups"]
    args += ["--format", "requirements-txt", "--no-hashes", "--no-header", "--no-annotate"]
    for extra in select.get("extras", ()):
        args += ["--extra", extra]
    result = run_uv(root, index.url, *args)
    members = load_workspace(root).members
    paths = {str(spec.root.relative_to(root)): name for name, spec in members.items()}
    lines = [line.removeprefix("-e ./") for line in result.stdout.splitlines()]
    return sorted(paths[p] for p in lines if p in paths and paths[p] != select["package"])


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_select_matches_uv_export(path: Path, package_index: LocalIndex, tmp_path: Path) -> None:
    case = _case(path)
    root = _locked_workspace(case, package_index, tmp_path / "ws")
    lock = load_lock(root / "uv.lock")
    assert lock.root is None or lock.root in load_workspace(root).members
    for select in case["select"]:
        chosen = select_packages(
            lock,
            root=select["package"],
            target=TARGET,
            extras=set(select.get("extras", ())),
            groups=set(select.get("groups", ())),
        )
        index_pins = sorted(p.describe() for p in chosen if p.source.kind == "registry")
        local = sorted(p.name for p in chosen if p.source.kind != "registry")
        assert index_pins == _uv_export(root, package_index, select), select
        assert local == _uv_local(root, package_index, select), select


def _staleness(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.stem}: {c['name']}", c) for c in _case(path).get("staleness", ())]


STALENESS = [item for path in CASES for item in _staleness(path)]


@pytest.mark.parametrize(("name", "edit"), STALENESS, ids=[n for n, _ in STALENESS])
def test_workspace_staleness_matches_uv(
    name: str, edit: dict[str, Any], package_index: LocalIndex, tmp_path: Path
) -> None:
    case = _case(next(p for p in CASES if name.startswith(f"{p.stem}: ")))
    root = _locked_workspace(case, package_index, tmp_path / "ws")
    if "file" in edit:
        file = root / edit["file"]
        file.parent.mkdir(parents=True, exist_ok=True)
        text = file.read_text() if file.exists() else ""
        for old, new in edit.get("replace", []):
            assert old in text, f"{old!r} not in {edit['file']}"
            text = text.replace(old, new)
        file.write_text(text + edit.get("append", ""))

    uv = run_uv(root, package_index.url, "lock", "--locked")
    assert ("fresh" if uv.returncode == 0 else "stale") == edit["expect"], uv.stderr

    lock = load_lock(root / "uv.lock")
    workspace = load_workspace(root)
    for member in workspace.members.values():  # every member judges the whole lock
        if edit["expect"] == "fresh":
            check_locked(lock, member, workspace=workspace)
            continue
        with pytest.raises(LockError) as info:
            check_locked(lock, member, workspace=workspace)
        message = str(info.value)
        assert message.startswith("uv.lock is out of date with pyproject.toml: "), message
        assert edit["message"] in message
        assert "\n" not in message


def test_member_finds_the_workspace_lock(package_index: LocalIndex, tmp_path: Path) -> None:
    """From a member's directory, with or without --package, the root's uv.lock is used."""
    root = _locked_workspace(_case(CASES[0]), package_index, tmp_path / "ws")
    member_dir = root / "packages" / "app"
    project, workspace, _ = locate_lock(member_dir, None)
    assert (project.name, workspace.root) == ("app", root.resolve())
    assert workspace_lock(project, workspace) == root.resolve() / "uv.lock"
    project, workspace, member_lock = locate_lock(member_dir, "lib")
    assert project.name == "lib" and member_lock == root.resolve() / "pylock.lib.toml"
    # An excluded directory is no member: it is a project of its own, with no lock.
    scratch, scratch_ws, _ = locate_lock(root / "packages" / "scratch", None)
    assert scratch_ws.root == (root / "packages" / "scratch").resolve()
    assert workspace_lock(scratch, scratch_ws) is None
    shutil.rmtree(root)

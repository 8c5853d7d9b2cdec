"""pylock.toml writing: data cases in tests/cases/pylock/*.toml.

Each case is a project (dependencies, optional-dependencies, dependency-groups) and an
index (the resolver cases' format, see tests/test_resolve.py). The project is resolved for
Python 3.11 on x86_64 and aarch64 over the fake index, rendered, and read back: the file
must parse with packaging.pylock, and its entries must match ``[expected]``: name (or
``name@version`` when a name has several entries) -> version, marker (absent = none) and,
when given, the wheel file names.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.pylock import Pylock
from packaging.requirements import Requirement

from imagebuild.lock.inputs import project_inputs, project_roots
from imagebuild.lock.writer import render_pylock
from imagebuild.project.spec import parse_project
from imagebuild.lock.resolve import resolve
from imagebuild.target.platform import TargetPlatform
from tests.test_resolve import FakeIndex

CASES = sorted((Path(__file__).parent / "cases" / "pylock").glob("*.toml"))
TARGETS = [
    TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch="x86_64"),
    TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch="aarch64"),
]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case(path: Path, tmp_path: Path) -> None:
    case: dict[str, Any] = tomllib.loads(path.read_text())
    project = parse_project(
        {
            "project": {
                "name": "app",
                "version": "1.0",
                "requires-python": ">=3.11",
                "dependencies": case.get("dependencies", []),
                "optional-dependencies": case.get("optional-dependencies", {}),
            },
            "dependency-groups": case.get("dependency-groups", {}),
        },
        root=tmp_path,
    )
    index = FakeIndex(projects=case["index"])
    roots = project_roots(project)
    flat: list[Requirement] = [req for reqs in roots.values() for req in reqs]
    resolutions = [resolve(flat, index=index, target=target) for target in TARGETS]
    inputs = project_inputs(
        project, indexes=("https://example.invalid/simple/",), prereleases=False, targets=TARGETS
    )
    text = render_pylock(project, inputs, resolutions, roots=roots, lock_dir=tmp_path)
    data = tomllib.loads(text)
    Pylock.from_dict(data)  # valid PEP 751, as packaging reads it
    packages = [p for p in data["packages"] if p["name"] != "app"]
    names = [p["name"] for p in packages]
    got: dict[str, dict[str, Any]] = {}
    for package in packages:
        key = (
            package["name"]
            if names.count(package["name"]) == 1
            else (f"{package['name']}@{package['version']}")
        )
        entry: dict[str, Any] = {"version": package["version"]}
        if "marker" in package:
            entry["marker"] = package["marker"]
        got[key] = entry
        expected = case["expected"].get(key, {})
        if "wheels" in expected:
            entry["wheels"] = [w["url"].rsplit("/", 1)[-1] for w in package.get("wheels", [])]
    assert got == case["expected"]
    # Rendering is deterministic: the same resolutions give the same bytes.
    assert text == render_pylock(project, inputs, resolutions, roots=roots, lock_dir=tmp_path)

"""Pure pieces of the pipeline: index choice for locking, output parsing and order."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuild.errors import ProjectError
from imagebuild.pipeline.outputs import make_sinks, parse_outputs, write_order
from imagebuild.project.indexes import lock_indexes
from imagebuild.project.settings import parse_settings
from imagebuild.project.spec import load_project


def _project(tmp_path: Path, tool: str) -> Path:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "1"\n' + tool)
    return tmp_path


def test_imgbuild_index_settings_win(tmp_path: Path) -> None:
    project = load_project(_project(tmp_path, '[[tool.uv.index]]\nurl = "https://x/simple/"\n'))
    settings = parse_settings(
        {"index-url": "https://a/simple/", "extra-index-urls": ["https://b/simple/"]}
    )
    assert lock_indexes(settings, project) == ("https://a/simple/", "https://b/simple/")


def test_outputs(tmp_path: Path) -> None:
    outputs = parse_outputs(["docker", f"oci:{tmp_path}/x", "registry"])
    assert [o.kind for o in outputs] == ["docker", "oci", "registry"]
    assert outputs[1].path == tmp_path / "x"
    with pytest.raises(ProjectError, match="registry takes no path"):
        parse_outputs(["registry:foo"])


def test_sinks_are_written_contexts_then_layouts_then_engine_and_registry(tmp_path: Path) -> None:
    outputs = parse_outputs(
        [
            "registry",
            f"oci-archive:{tmp_path}/a.tar",
            "docker",
            f"context:{tmp_path}/c",
            f"oci:{tmp_path}/l",
            f"context:{tmp_path}/d",
        ]
    )
    sinks = make_sinks(outputs, registry=object(), engine=object)  # type: ignore[arg-type]
    assert [s.kind for s in sinks] == [
        "registry",
        "oci-archive",
        "docker",
        "context",
        "oci",
        "context",
    ]
    ordered = write_order(sinks)
    assert [s.kind for s in ordered] == [
        "context",
        "context",
        "oci-archive",
        "oci",
        "registry",
        "docker",
    ]
    assert [getattr(s, "path", None) for s in ordered[:2]] == [tmp_path / "c", tmp_path / "d"]
    assert [s.takes_index for s in ordered] == [False, False, True, True, True, False]

"""Where a build or a lock starts: the project, its workspace, its lock file and settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from packaging.utils import canonicalize_name

from imagebuild.errors import ProjectError
from imagebuild.lock.model import UV_LOCK
from imagebuild.project.settings import ImageSettings, parse_settings
from imagebuild.project.spec import ProjectSpec, load_project
from imagebuild.project.workspace import Workspace, find_workspace_root, load_workspace


def locate_lock(project_dir: Path, package: str | None) -> tuple[ProjectSpec, Workspace, Path]:
    """The project to lock, its workspace, and the lock file's path.

    Without ``package``: the project at ``project_dir`` and its ``pylock.toml``. With it:
    that member of the workspace ``project_dir`` is in (its root, or any directory of it,
    as for ``uv sync --package``), locked into ``pylock.<name>.toml`` at the workspace
    root (PEP 751's name for one service's lock).
    """
    if package is None:
        project = load_project(project_dir)
        return (
            project,
            load_workspace(find_workspace_root(project_dir)),
            project_dir / "pylock.toml",
        )
    workspace = load_workspace(find_workspace_root(project_dir))
    name = canonicalize_name(package)
    if name not in workspace.members:
        known = ", ".join(sorted(workspace.members)) or "none"
        raise ProjectError(
            f"{workspace.root / 'pyproject.toml'}: no workspace member named {package!r}",
            hint=f"members: {known}",
        )
    return workspace.members[name], workspace, workspace.root / f"pylock.{name}.toml"


def workspace_lock(project: ProjectSpec, workspace: Workspace) -> Path | None:
    """A member's lock at its workspace root, as uv finds it from a member's directory.

    ``pylock.<name>.toml`` (``imgbuild lock --package``), else the root's ``uv.lock``,
    which covers every member.
    """
    for candidate in (workspace.root / f"pylock.{project.name}.toml", workspace.root / UV_LOCK):
        if candidate.is_file():
            return candidate
    return None


def project_settings(
    project: ProjectSpec,
    *,
    base: str | None,
    python: tuple[int, int] | None,
    groups: Sequence[str] = (),
    extras: Sequence[str] = (),
) -> ImageSettings:
    """``[tool.imgbuild]`` with the command line's values: those win; groups and extras add."""
    settings = parse_settings(project.tool_imgbuild)
    return replace(
        settings,
        base=base or settings.base,
        python=python or settings.python,
        groups=tuple(sorted(set(settings.groups) | set(groups))),
        extras=tuple(sorted(set(settings.extras) | set(extras))),
    )

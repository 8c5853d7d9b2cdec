"""Local packages: uv workspace members and path dependencies of a project.

A uv workspace is declared in the root pyproject.toml::

    [tool.uv.workspace]
    members = ["packages/*"]
    exclude = ["packages/scratch"]

and a project depends on a member by name, with ``[tool.uv.sources] name = { workspace =
true }``; ``{ path = "../lib" }`` points at any local project. Such requirements are not
looked up on an index: the local project's own dependencies take their place when
resolving, and the lock records the project as a ``directory`` entry, which the image
build turns into a wheel through its PEP 517 backend.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from imagebuild.errors import ProjectError
from imagebuild.project.sources import ARCHIVE_SUFFIXES
from imagebuild.project.spec import ProjectSpec, UvIndex, load_project, parse_uv_indexes


@dataclass(frozen=True, kw_only=True, slots=True)
class Workspace:
    """The workspace root and its members."""

    root: Path
    """Directory of the root pyproject.toml."""
    members: Mapping[NormalizedName, ProjectSpec]
    """Member name -> its project (the root project too, when it has a [project] table)."""
    tool_imgbuild: Mapping[str, object]
    """The root's ``[tool.imgbuild]``: workspace-wide settings (indexes) members inherit."""
    tool_uv: Mapping[str, object]
    """The root's ``[tool.uv]`` (``[[tool.uv.index]]`` is workspace-wide in uv)."""
    uv_indexes: tuple[UvIndex, ...] = ()
    """The root's ``[[tool.uv.index]]``, parsed, in declaration order."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalPackage:
    """A local project that a lock covers, and where it is needed."""

    project: ProjectSpec
    """The local project."""
    markers: Mapping[str, tuple[Marker | None, ...]]
    """Origin (``""``, ``extra:x``, ``group:g``) -> the markers of the requirements on it."""


def find_workspace_root(start: Path) -> Path:
    """Find the workspace root of ``start``; ``start`` itself when there is none.

    That is the nearest directory at or above ``start`` whose pyproject.toml declares a
    workspace that includes ``start``.
    """
    start = start.resolve()
    for directory in [start, *start.parents]:
        pyproject = directory / "pyproject.toml"
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(data.get("tool", {}).get("uv", {}).get("workspace"), Mapping):
            members = load_workspace(directory).members.values()
            if directory == start or any(m.root == start for m in members):
                return directory
    return start


def load_workspace(root: Path) -> Workspace:
    """Read ``[tool.uv.workspace]`` at ``root`` (no table: a workspace of one).

    The root may be virtual (no ``[project]`` table), as uv allows.
    """
    pyproject = root / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProjectError(f"{pyproject}: cannot read ({exc})") from exc
    members: dict[NormalizedName, ProjectSpec] = {}
    if "project" in data:
        project = load_project(root)
        members[project.name] = project
    tool = data.get("tool", {})
    tool_imgbuild = tool.get("imgbuild", {}) if isinstance(tool, Mapping) else {}
    tool_uv = tool.get("uv", {}) if isinstance(tool, Mapping) else {}
    if not isinstance(tool_uv, Mapping):
        tool_uv = {}
    table = tool_uv.get("workspace")
    if isinstance(table, Mapping):
        _add_members(root, table, members)
    return Workspace(
        root=root,
        members=members,
        tool_imgbuild=tool_imgbuild,
        tool_uv=tool_uv,
        uv_indexes=parse_uv_indexes(tool_uv),
    )


def _add_members(
    root: Path, table: Mapping[str, object], members: dict[NormalizedName, ProjectSpec]
) -> None:
    """Load the projects ``[tool.uv.workspace]`` names into ``members`` (first name wins)."""
    patterns = table.get("members", [])
    excluded = table.get("exclude", [])
    if not isinstance(patterns, list) or not isinstance(excluded, list):
        raise ProjectError(
            f"{root / 'pyproject.toml'}: tool.uv.workspace.members/exclude must be lists of globs"
        )
    skip = {p.resolve() for pattern in excluded for p in root.glob(str(pattern))}
    for pattern in patterns:
        for directory in sorted(root.glob(str(pattern))):
            if directory.resolve() in skip or not (directory / "pyproject.toml").is_file():
                continue
            member = load_project(directory)
            members.setdefault(member.name, member)


def local_sources(project: ProjectSpec, workspace: Workspace) -> dict[NormalizedName, Path]:
    """Names ``project`` takes from local directories: workspace members and path sources."""
    sources = project.tool_uv.get("sources", {})
    found: dict[NormalizedName, Path] = {}
    if not isinstance(sources, Mapping):
        return found
    for raw_name, entry in sources.items():
        name = canonicalize_name(str(raw_name))
        if not isinstance(entry, Mapping):
            continue
        where = f"{project.pyproject}: tool.uv.sources.{raw_name}"
        if entry.get("workspace") is True:
            if name not in workspace.members:
                raise ProjectError(
                    f"{where}: no workspace member named {name}",
                    hint="add it to [tool.uv.workspace] members in the workspace root",
                )
            found[name] = workspace.members[name].root
        elif isinstance(entry.get("path"), str) and not entry["path"].endswith(ARCHIVE_SUFFIXES):
            path = (project.root / entry["path"]).resolve()
            if not (path / "pyproject.toml").is_file():
                raise ProjectError(
                    f"{where}: {entry['path']!r} is not a project directory "
                    "(it has no pyproject.toml)",
                    hint="point the path at a project directory, a wheel or an sdist",
                )
            found[name] = path
        # git, URL and archive sources: project.sources (fetched when locking).
    return found


def expand_local(
    roots: Mapping[str, Sequence[Requirement]],
    project: ProjectSpec,
    workspace: Workspace,
) -> tuple[dict[str, tuple[Requirement, ...]], dict[NormalizedName, LocalPackage], dict[str, Path]]:
    """Replace requirements on local projects by those projects' own requirements.

    Returns the roots to resolve from the index; the local projects reached, with the
    markers under which each origin needs them; and, for each root requirement that a
    local project declares (``str(requirement)``), that project's pyproject.toml. A marker
    on a requirement of a local project is carried onto what that project requires.
    """
    resolved_roots: dict[str, tuple[Requirement, ...]] = {}
    declared_in: dict[str, Path] = {}
    reached: dict[NormalizedName, dict[str, list[Marker | None]]] = {}
    specs: dict[NormalizedName, ProjectSpec] = {}
    for origin, reqs in roots.items():
        out: list[Requirement] = []
        queue = [(req, project) for req in reqs]
        seen: set[tuple[NormalizedName, str]] = set()
        while queue:
            req, owner = queue.pop(0)
            name = canonicalize_name(req.name)
            local = local_sources(owner, workspace)
            if name not in local:
                out.append(req)
                if owner is not project:
                    declared_in.setdefault(str(req), owner.pyproject)
                continue
            key = (name, str(req.marker or ""))
            if key in seen:
                continue
            seen.add(key)
            spec = load_project(local[name])
            specs[name] = spec
            reached.setdefault(name, {}).setdefault(origin, []).append(req.marker)
            wanted = list(spec.dependencies)
            for extra in sorted(canonicalize_name(e) for e in req.extras):
                wanted += spec.optional_dependencies.get(extra, ())
            queue.extend((_with_marker(dep, req.marker), spec) for dep in wanted)
        resolved_roots[origin] = tuple(out)
    packages = {
        name: LocalPackage(
            project=specs[name],
            markers={origin: tuple(markers) for origin, markers in by_origin.items()},
        )
        for name, by_origin in reached.items()
    }
    return resolved_roots, packages, declared_in


def _with_marker(req: Requirement, marker: Marker | None) -> Requirement:
    if marker is None:
        return req
    combined = Requirement(str(req).split(";")[0])
    combined.marker = Marker(f"({marker}) and ({req.marker})") if req.marker else marker
    return combined

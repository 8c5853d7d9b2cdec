"""Index order for locking and the indexes whose credentials a run may need."""

from __future__ import annotations

from collections.abc import Sequence

from imagebuild.net.credentials import IndexEntry
from imagebuild.project.settings import ImageSettings, parse_settings
from imagebuild.project.spec import ProjectSpec, UvIndex
from imagebuild.project.workspace import Workspace

PYPI = "https://pypi.org/simple/"


def lock_indexes(
    settings: ImageSettings, project: ProjectSpec, workspace: Workspace | None = None
) -> tuple[str, ...]:
    """Indexes in priority order: [tool.imgbuild], else [[tool.uv.index]] (as uv orders them).

    A workspace member without index settings of its own takes the workspace root's.
    """
    if settings.index_url:
        return (settings.index_url, *settings.extra_index_urls)
    declared = project.uv_indexes
    if workspace is not None and project.root != workspace.root and not declared:
        root_settings = parse_settings(workspace.tool_imgbuild, source=str(workspace.root))
        if root_settings.index_url:
            return (root_settings.index_url, *root_settings.extra_index_urls)
        declared = workspace.uv_indexes
    return (*settings.extra_index_urls, *_uv_order(declared))


def _uv_order(declared: Sequence[UvIndex]) -> tuple[str, ...]:
    """Order declared indexes as uv does: in order, the ``default`` one (else PyPI) last.

    Explicit indexes serve only the packages pinned to them, so they are left out.
    """
    preferred: list[str] = []
    default = PYPI
    for index in declared:
        if index.explicit or index.url is None:
            continue
        if index.default:
            default = index.url
        else:
            preferred.append(index.url)
    return (*preferred, default)


def index_entries(
    indexes: Sequence[str], project: ProjectSpec, workspace: Workspace | None
) -> list[IndexEntry]:
    """Index entries whose credentials a run may need.

    ``indexes`` (the ones in use) come first, then every ``[[tool.uv.index]]`` of the
    project and of the workspace root, named where uv names them (for
    ``UV_INDEX_<NAME>_*`` credentials).
    """
    entries = [IndexEntry(url=url) for url in indexes]
    declared = (*project.uv_indexes, *(workspace.uv_indexes if workspace is not None else ()))
    entries += [IndexEntry(url=i.url, name=i.name) for i in declared if i.url is not None]
    return entries

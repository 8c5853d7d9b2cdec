"""Which base image and Python a project gets: catalog flavor or reference, and the version."""

from __future__ import annotations

from collections.abc import Sequence

from imagebuild.errors import ProjectError
from imagebuild.project.settings import ImageSettings, parse_python_version
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.base import CatalogEntry, find_entry, load_catalog


def base_reference(
    settings: ImageSettings, project: ProjectSpec
) -> tuple[CatalogEntry | None, str]:
    """The catalog entry (for a flavor name) and the reference to pull."""
    catalog = load_catalog()
    flavors = {entry.flavor for entry in catalog}
    if settings.base not in flavors:
        return None, settings.base
    python = settings.python or default_python(catalog, settings.base, project)
    entry = find_entry(catalog, settings.base, python)
    return entry, entry.reference


def default_python(
    catalog: Sequence[CatalogEntry], flavor: str, project: ProjectSpec
) -> tuple[int, int] | None:
    """``.python-version`` if the project pins one (as uv does), else the newest allowed."""
    pin = project.root / ".python-version"
    if pin.is_file():
        text = pin.read_text(encoding="utf-8").strip().splitlines()[0]
        return parse_python_version(".".join(text.split(".")[:2]), str(pin))
    allowed = [
        e.python_version
        for e in catalog
        if e.flavor == flavor
        and (
            project.requires_python is None
            or project.requires_python.contains(".".join(map(str, e.python_version)) + ".0")
        )
    ]
    if not allowed:
        raise ProjectError(
            f"{project.root / 'pyproject.toml'}: requires-python {project.requires_python} "
            f"allows no Python of base {flavor!r}",
            hint="set [tool.imgbuild] base to another image",
        )
    return max(allowed)

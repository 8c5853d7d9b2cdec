"""Which base image and Python a project gets: catalog flavor or reference, and the version."""

from __future__ import annotations

from collections.abc import Sequence

from imagebuild.errors import ProjectError
from imagebuild.project.settings import ImageSettings, parse_python_version
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.base import CatalogEntry, find_entry, load_catalog, read_entries


def base_reference(
    settings: ImageSettings, project: ProjectSpec
) -> tuple[CatalogEntry | None, str]:
    """The catalog entry (for a flavor name) and the reference to pull.

    A base ending in ``.toml`` is a base definition of the project's own (a path from the
    project directory), read as one more catalog file.
    """
    if settings.base.endswith(".toml"):
        own = read_entries(project.root / settings.base)
        python = settings.python or default_python(own, own[0].flavor, project)
        entry = find_entry(own, own[0].flavor, python)
        return entry, entry.reference
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
    allowed = [e.python_version for e in catalog if e.flavor == flavor and _fits(project, e)]
    if not allowed:
        raise ProjectError(
            f"{project.root / 'pyproject.toml'}: requires-python {project.requires_python} "
            f"allows no Python of base {flavor!r}",
            hint=_another_base(project, catalog),
        )
    return max(allowed)


def check_python_fits(settings: ImageSettings, project: ProjectSpec) -> None:
    """Refuse, before any work, a catalog base whose Python requires-python excludes.

    The Python comes from ``--python``, ``[tool.imgbuild] python`` or ``.python-version``;
    a base given by reference is checked once its Python is read off it
    (``check_base_python``).
    """
    entry, _ = base_reference(settings, project)
    if entry is not None:
        check_base_python(project, entry.python_version, base=entry.flavor)


def check_base_python(project: ProjectSpec, version: tuple[int, int], *, base: str) -> None:
    """Refuse a base whose Python ``version`` the project's requires-python excludes.

    The message names the base, its Python and Pythons that fit: of the same catalog
    flavor when ``base`` is one, else the catalog's flavors that offer one.
    """
    if _fits(project, version):
        return
    catalog = load_catalog()
    same = sorted({e.python_version for e in catalog if e.flavor == base and _fits(project, e)})
    if same:
        fix = f"use --python {_dotted(same[-1])} (base {base} offers it)"
    else:
        fix = _another_base(project, catalog)
    raise ProjectError(
        f"{project.root / 'pyproject.toml'}: requires-python {project.requires_python} "
        f"excludes Python {_dotted(version)} of base {base}",
        hint=fix,
    )


def _another_base(project: ProjectSpec, catalog: Sequence[CatalogEntry]) -> str:
    """The hint naming a catalog base and Python that requires-python admits (the newest)."""
    others = sorted(
        {(e.flavor, e.python_version) for e in catalog if _fits(project, e)},
        key=lambda item: (item[1], item[0]),
        reverse=True,
    )
    if not others:
        return "loosen requires-python; no base in the catalog fits it"
    flavor, version = others[0]
    return f'set [tool.imgbuild] base = "{flavor}" with python = "{_dotted(version)}"'


def _fits(project: ProjectSpec, target: tuple[int, int] | CatalogEntry) -> bool:
    """Whether some release of a minor version meets requires-python (``>=3.11.4`` fits 3.11)."""
    version = target.python_version if isinstance(target, CatalogEntry) else target
    spec = project.requires_python
    return spec is None or any(
        spec.contains(f"{_dotted(version)}.{patch}", prereleases=True) for patch in (0, 99)
    )


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))

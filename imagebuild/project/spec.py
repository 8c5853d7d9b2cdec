"""pyproject.toml -> ProjectSpec: the project's own metadata, read and validated once."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.licenses import InvalidLicenseExpression, canonicalize_license_expression
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidName, NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.errors import ProjectError
from imagebuild.project.fields import Fields

PYPROJECT = "pyproject.toml"

# Fields PEP 621 allows in project.dynamic.
_DYNAMIC_ALLOWED = frozenset(
    {
        "version",
        "description",
        "readme",
        "requires-python",
        "license",
        "license-files",
        "authors",
        "maintainers",
        "keywords",
        "classifiers",
        "urls",
        "scripts",
        "gui-scripts",
        "entry-points",
        "dependencies",
        "optional-dependencies",
        "import-names",
        "import-namespaces",
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class UvIndex:
    """One ``[[tool.uv.index]]`` entry, as uv reads it."""

    url: str | None
    """``url``; ``None`` when it is missing or not a string (such an entry is never used)."""
    name: str | None = None
    """``name``, which ``[tool.uv.sources]`` entries refer to (``index = "name"``)."""
    default: bool = False
    """``default = true``: this index replaces PyPI as the one consulted last."""
    explicit: bool = False
    """``explicit = true``: used only by packages whose source names it."""


def parse_uv_indexes(tool_uv: Mapping[str, object]) -> tuple[UvIndex, ...]:
    """Parse the ``index`` array of a ``[tool.uv]`` table, in order.

    Entries that are not tables are skipped (uv would refuse them; imgbuild reads only
    what it can use).
    """
    raw = tool_uv.get("index", [])
    out: list[UvIndex] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        url, name = item.get("url"), item.get("name")
        out.append(
            UvIndex(
                url=url if isinstance(url, str) else None,
                name=name if isinstance(name, str) and name else None,
                default=bool(item.get("default")),
                explicit=bool(item.get("explicit")),
            )
        )
    return tuple(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProjectSpec:
    """What imgbuild needs from a project's pyproject.toml, validated and normalised."""

    root: Path
    """The project directory (the one holding pyproject.toml), absolute."""
    name: NormalizedName
    """``project.name``, canonicalised."""
    version: Version | None
    """``project.version``; ``None`` when the version is dynamic."""
    description: str | None = None
    """``project.description`` (one line), if given."""
    requires_python: SpecifierSet | None = None
    """``project.requires-python``, if given."""
    dependencies: tuple[Requirement, ...] = ()
    """``project.dependencies``, sorted by canonical name then text."""
    optional_dependencies: Mapping[NormalizedName, tuple[Requirement, ...]] = field(
        default_factory=dict, hash=False
    )
    """Extra name (canonical) -> its requirements, sorted like ``dependencies``."""
    dependency_groups: Mapping[NormalizedName, tuple[Requirement, ...]] = field(
        default_factory=dict, hash=False
    )
    """PEP 735 group (canonical) -> requirements with ``include-group`` expanded.

    uv's legacy ``[tool.uv] dev-dependencies`` are merged into the group ``dev``."""
    scripts: Mapping[str, str] = field(default_factory=dict, hash=False)
    """``project.scripts``: command name -> ``module:attr`` object reference."""
    license: str | None = None
    """A canonical SPDX expression, or license text (``{text}`` / ``{file}`` forms)."""
    authors: tuple[str, ...] = ()
    """``project.authors`` rendered as ``Name <email>`` (or whichever part is given)."""
    urls: Mapping[str, str] = field(default_factory=dict, hash=False)
    """``project.urls``: label -> URL, as written."""
    dynamic: tuple[str, ...] = ()
    """``project.dynamic``, sorted."""
    has_build_system: bool = False
    """Whether pyproject.toml has a ``[build-system]`` table."""
    tool_imgbuild: Mapping[str, object] = field(default_factory=dict, hash=False)
    """The raw ``[tool.imgbuild]`` table as plain dicts and lists (empty if absent)."""
    tool_uv: Mapping[str, object] = field(default_factory=dict, hash=False)
    """The raw ``[tool.uv]`` table (sources, indexes, constraints; read by ``--locked``)."""
    uv_indexes: tuple[UvIndex, ...] = ()
    """``[[tool.uv.index]]``, parsed, in declaration order."""

    @property
    def pyproject(self) -> Path:
        """Path of the pyproject.toml this spec was read from."""
        return self.root / PYPROJECT


def load_project(path: Path) -> ProjectSpec:
    """Read and validate ``path``/pyproject.toml (``path`` may also be the file itself)."""
    file = path if path.name == PYPROJECT and path.is_file() else path / PYPROJECT
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProjectError(
            f"no {PYPROJECT} in {file.parent}",
            hint=f"run imgbuild in a directory with a {PYPROJECT}",
        ) from None
    except OSError as exc:
        raise ProjectError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ProjectError(f"{file}: not UTF-8 text ({exc.reason})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(f"{file}: invalid TOML: {exc}") from exc
    return parse_project(data, root=file.parent.absolute(), source=str(file))


def parse_project(
    data: Mapping[str, object], *, root: Path, source: str = PYPROJECT
) -> ProjectSpec:
    """Validate a decoded pyproject.toml; ``source`` names the file in error messages."""
    f = Fields(source, ProjectError)
    project = _table(f, data, "project", required=True)
    dynamic = _dynamic(f, project)
    name = _name(f, project)
    version = _version(f, project, dynamic)
    description = f.optional_string(project.get("description"), "project.description")
    rp = f.optional_specifier(project.get("requires-python"), "project.requires-python")
    dependencies = _requirements(f, project, "dependencies", "project.dependencies")
    optional = _optional_dependencies(f, project)
    tool = _table(f, data, "tool")
    tool_uv = _table(f, tool, "uv", key="tool.uv")
    return ProjectSpec(
        root=root,
        name=name,
        version=version,
        description=description,
        requires_python=rp,
        dependencies=dependencies,
        optional_dependencies=optional,
        dependency_groups=_dependency_groups(f, data, tool_uv),
        scripts=_scripts(f, project),
        urls=_urls(f, project),
        license=_license(f, project, root),
        authors=_authors(f, project),
        dynamic=dynamic,
        has_build_system=isinstance(data.get("build-system"), dict),
        tool_imgbuild=_plain(_table(f, tool, "imgbuild", key="tool.imgbuild")),
        tool_uv=_plain(tool_uv),
        uv_indexes=parse_uv_indexes(tool_uv),
    )


def _table(
    f: Fields,
    data: Mapping[str, object],
    name: str,
    *,
    key: str | None = None,
    required: bool = False,
) -> Mapping[str, object]:
    """The table ``data[name]`` (empty when absent and not ``required``)."""
    value = data.get(name)
    if value is None:
        if required:
            f.fail(key or name, f"the [{key or name}] table is missing")
        return {}
    return f.table(value, key or name)


def _dynamic(f: Fields, project: Mapping[str, object]) -> tuple[str, ...]:
    dynamic = tuple(sorted(f.strings(project.get("dynamic", []), "project.dynamic")))
    for i, item in enumerate(dynamic):
        if item not in _DYNAMIC_ALLOWED:
            f.fail(f"project.dynamic[{i}]", f"unknown field {item!r}")
    if "name" in dynamic:
        f.fail("project.dynamic", "'name' cannot be dynamic")
    return dynamic


def _name(f: Fields, project: Mapping[str, object]) -> NormalizedName:
    raw_name = project.get("name")
    if not isinstance(raw_name, str):
        f.fail("project.name", "missing" if raw_name is None else "must be a string")
    try:
        return canonicalize_name(raw_name, validate=True)
    except InvalidName:
        f.fail("project.name", f"invalid project name {raw_name!r}")


def _version(f: Fields, project: Mapping[str, object], dynamic: tuple[str, ...]) -> Version | None:
    raw_version = project.get("version")
    if raw_version is None:
        if "version" not in dynamic:
            f.fail("project.version", "missing (give a version or list it in project.dynamic)")
        return None
    if "version" in dynamic:
        f.fail("project.version", "is set but also listed in project.dynamic")
    text = f.string(raw_version, "project.version")
    try:
        return Version(text)
    except InvalidVersion:
        f.fail("project.version", f"invalid version {text!r}")


def _requirements(
    f: Fields, data: Mapping[str, object], name: str, key: str
) -> tuple[Requirement, ...]:
    if name not in data:
        return ()
    return _sorted_requirements(f.requirements(data[name], key))


def _optional_dependencies(
    f: Fields, project: Mapping[str, object]
) -> dict[NormalizedName, tuple[Requirement, ...]]:
    optional: dict[NormalizedName, tuple[Requirement, ...]] = {}
    for extra, reqs in _table(f, project, "optional-dependencies").items():
        key = f"project.optional-dependencies.{extra}"
        canonical = _new_name(f, extra, key, "extra", optional, twice="")
        optional[canonical] = _sorted_requirements(f.requirements(reqs, key))
    return dict(sorted(optional.items()))


def _new_name(
    f: Fields, name: str, key: str, what: str, seen: Mapping[NormalizedName, object], *, twice: str
) -> NormalizedName:
    """``name`` (an extra or a group) normalised; refused if invalid or already defined."""
    try:
        canonical = canonicalize_name(name, validate=True)
    except InvalidName:
        f.fail(key, f"invalid {what} name {name!r}")
    if canonical in seen:
        f.fail(key, f"{what} {canonical!r} is defined twice{twice}")
    return canonical


def _scripts(f: Fields, project: Mapping[str, object]) -> dict[str, str]:
    scripts: dict[str, str] = {}
    for script, target in _table(f, project, "scripts", key="project.scripts").items():
        if not isinstance(target, str) or not target.strip():
            f.fail(f"project.scripts.{script}", "must be an object reference 'module:attr'")
        scripts[script] = target.strip()
    return dict(sorted(scripts.items()))


def _urls(f: Fields, project: Mapping[str, object]) -> dict[str, str]:
    return {
        label: f.string(url, f"project.urls.{label}")
        for label, url in _table(f, project, "urls", key="project.urls").items()
    }


def _sorted_requirements(reqs: Iterable[Requirement]) -> tuple[Requirement, ...]:
    return tuple(sorted(reqs, key=lambda r: (canonicalize_name(r.name), str(r))))


_GroupItems = dict[NormalizedName, tuple[str, list[object]]]


def _dependency_groups(
    f: Fields, data: Mapping[str, object], tool_uv: Mapping[str, object]
) -> dict[NormalizedName, tuple[Requirement, ...]]:
    """PEP 735 groups with includes expanded, plus uv's legacy ``dev-dependencies``."""
    by_name = _group_tables(f, _table(f, data, "dependency-groups"))
    resolved: dict[NormalizedName, tuple[Requirement, ...]] = {}
    for group in by_name:
        _expand_group(f, by_name, group, (), resolved)
    legacy = tool_uv.get("dev-dependencies")
    if legacy is not None:
        dev = NormalizedName("dev")
        extra = f.requirements(legacy, "tool.uv.dev-dependencies")
        resolved[dev] = _sorted_requirements([*resolved.get(dev, ()), *extra])
    return dict(sorted(resolved.items()))


def _group_tables(f: Fields, raw: Mapping[str, object]) -> _GroupItems:
    """Canonical group name -> (the name as written, its items)."""
    by_name: _GroupItems = {}
    for group, items in raw.items():
        key = f"dependency-groups.{group}"
        canonical = _new_name(
            f, group, key, "group", by_name, twice=" (names are compared normalised)"
        )
        by_name[canonical] = (group, f.array(items, key))
    return by_name


def _expand_group(
    f: Fields,
    by_name: _GroupItems,
    group: NormalizedName,
    chain: tuple[NormalizedName, ...],
    resolved: dict[NormalizedName, tuple[Requirement, ...]],
) -> list[Requirement]:
    """The requirements of ``group`` with ``include-group`` items expanded (memoised)."""
    if group in resolved:
        return list(resolved[group])
    original, items = by_name[group]
    out: list[Requirement] = []
    for i, item in enumerate(items):
        key = f"dependency-groups.{original}[{i}]"
        if isinstance(item, str):
            out.append(f.requirement(item, key))
            continue
        if not isinstance(item, dict) or set(item) != {"include-group"}:
            f.fail(key, 'must be a requirement string or {include-group = "..."}')
        include = item["include-group"]
        if not isinstance(include, str):
            f.fail(key, "include-group must be a string")
        target = canonicalize_name(include)
        if target not in by_name:
            f.fail(key, f"includes unknown group {include!r}")
        if target in chain or target == group:
            f.fail(key, f"include-group cycle {' -> '.join((*chain, group, target))}")
        out.extend(_expand_group(f, by_name, target, (*chain, group), resolved))
    resolved[group] = _sorted_requirements(out)
    return out


def _license(f: Fields, project: Mapping[str, object], root: Path) -> str | None:
    raw = project.get("license")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            return str(canonicalize_license_expression(raw))
        except InvalidLicenseExpression:
            f.fail("project.license", f"invalid SPDX license expression {raw!r}")
    if isinstance(raw, dict):
        if isinstance(raw.get("text"), str) and set(raw) == {"text"}:
            return str(raw["text"])
        file = raw.get("file")
        if isinstance(file, str) and set(raw) == {"file"}:
            try:
                return (root / file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                f.fail("project.license.file", f"cannot read {file!r}: {exc}")
    f.fail("project.license", "must be an SPDX expression, {text = ...} or {file = ...}")


def _authors(f: Fields, project: Mapping[str, object]) -> tuple[str, ...]:
    raw = project.get("authors", [])
    if not isinstance(raw, list):
        f.fail("project.authors", "must be an array of tables")
    out: list[str] = []
    for i, item in enumerate(raw):
        key = f"project.authors[{i}]"
        if not isinstance(item, dict) or not set(item) <= {"name", "email"} or not item:
            f.fail(key, "must be a table with 'name' and/or 'email'")
        name, email = item.get("name"), item.get("email")
        if not isinstance(name, str | None) or not isinstance(email, str | None):
            f.fail(key, "'name' and 'email' must be strings")
        out.append(f"{name} <{email}>" if name and email else str(name or email))
    return tuple(out)


def _plain(value: Mapping[str, object]) -> dict[str, object]:
    """Deep-copy TOML data into plain dicts and lists (tomllib's are already plain)."""

    def copy(v: object) -> object:
        if isinstance(v, Mapping):
            return {str(k): copy(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [copy(x) for x in v]
        return v

    return {str(k): copy(v) for k, v in value.items()}

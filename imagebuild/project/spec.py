"""pyproject.toml -> ProjectSpec: the project's own metadata, read and validated once."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from packaging.licenses import InvalidLicenseExpression, canonicalize_license_expression
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import InvalidName, NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.errors import ProjectError

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
    p = _Parser(source, root)
    project = p.table(data, "project", required=True)
    dynamic = tuple(sorted(p.str_list(project, "dynamic", "project.dynamic")))
    for i, item in enumerate(dynamic):
        if item not in _DYNAMIC_ALLOWED:
            p.fail(f"project.dynamic[{i}]", f"unknown field {item!r}")
    if "name" in dynamic:
        p.fail("project.dynamic", "'name' cannot be dynamic")

    raw_name = project.get("name")
    if not isinstance(raw_name, str):
        p.fail("project.name", "missing" if raw_name is None else "must be a string")
    try:
        name = canonicalize_name(raw_name, validate=True)
    except InvalidName:
        p.fail("project.name", f"invalid project name {raw_name!r}")

    version: Version | None = None
    raw_version = project.get("version")
    if raw_version is None:
        if "version" not in dynamic:
            p.fail("project.version", "missing (give a version or list it in project.dynamic)")
    elif "version" in dynamic:
        p.fail("project.version", "is set but also listed in project.dynamic")
    elif not isinstance(raw_version, str):
        p.fail("project.version", "must be a string")
    else:
        try:
            version = Version(raw_version)
        except InvalidVersion:
            p.fail("project.version", f"invalid version {raw_version!r}")

    description = p.optional_str(project, "description", "project.description")
    requires_python: SpecifierSet | None = None
    raw_rp = p.optional_str(project, "requires-python", "project.requires-python")
    if raw_rp is not None:
        try:
            requires_python = SpecifierSet(raw_rp)
        except InvalidSpecifier:
            p.fail("project.requires-python", f"invalid specifier {raw_rp!r}")

    dependencies = p.requirements(project, "dependencies", "project.dependencies")
    optional: dict[NormalizedName, tuple[Requirement, ...]] = {}
    for extra, reqs in p.table(project, "optional-dependencies").items():
        key = f"project.optional-dependencies.{extra}"
        try:
            canonical = canonicalize_name(extra, validate=True)
        except InvalidName:
            p.fail(key, f"invalid extra name {extra!r}")
        if canonical in optional:
            p.fail(key, f"extra {canonical!r} is defined twice")
        optional[canonical] = p.requirement_list(reqs, key)

    tool = p.table(data, "tool")
    tool_uv = p.table(tool, "uv", key="tool.uv")
    groups = _dependency_groups(p, data, tool_uv)

    scripts: dict[str, str] = {}
    for script, target in p.table(project, "scripts", key="project.scripts").items():
        if not isinstance(target, str) or not target.strip():
            p.fail(f"project.scripts.{script}", "must be an object reference 'module:attr'")
        scripts[script] = target.strip()

    urls: dict[str, str] = {}
    for label, url in p.table(project, "urls", key="project.urls").items():
        if not isinstance(url, str):
            p.fail(f"project.urls.{label}", "must be a string")
        urls[label] = url

    return ProjectSpec(
        root=root,
        name=name,
        version=version,
        description=description,
        requires_python=requires_python,
        dependencies=dependencies,
        optional_dependencies=dict(sorted(optional.items())),
        dependency_groups=groups,
        scripts=dict(sorted(scripts.items())),
        license=_license(p, project, root),
        authors=_authors(p, project),
        urls=urls,
        dynamic=dynamic,
        has_build_system=isinstance(data.get("build-system"), dict),
        tool_imgbuild=_plain(p.table(tool, "imgbuild", key="tool.imgbuild")),
        tool_uv=_plain(tool_uv),
        uv_indexes=parse_uv_indexes(tool_uv),
    )


def _sorted_requirements(reqs: list[Requirement]) -> tuple[Requirement, ...]:
    return tuple(sorted(reqs, key=lambda r: (canonicalize_name(r.name), str(r))))


def _dependency_groups(
    p: _Parser, data: Mapping[str, object], tool_uv: Mapping[str, object]
) -> dict[NormalizedName, tuple[Requirement, ...]]:
    raw = p.table(data, "dependency-groups")
    by_name: dict[NormalizedName, tuple[str, list[object]]] = {}
    for group, items in raw.items():
        key = f"dependency-groups.{group}"
        try:
            canonical = canonicalize_name(group, validate=True)
        except InvalidName:
            p.fail(key, f"invalid group name {group!r}")
        if canonical in by_name:
            p.fail(key, f"group {canonical!r} is defined twice (names are compared normalised)")
        if not isinstance(items, list):
            p.fail(key, "must be an array")
        by_name[canonical] = (group, items)

    resolved: dict[NormalizedName, tuple[Requirement, ...]] = {}

    def resolve(group: NormalizedName, chain: tuple[NormalizedName, ...]) -> list[Requirement]:
        if group in resolved:
            return list(resolved[group])
        original, items = by_name[group]
        out: list[Requirement] = []
        for i, item in enumerate(items):
            key = f"dependency-groups.{original}[{i}]"
            if isinstance(item, str):
                out.append(p.requirement(item, key))
            elif isinstance(item, dict) and set(item) == {"include-group"}:
                include = item["include-group"]
                if not isinstance(include, str):
                    p.fail(key, "include-group must be a string")
                target = canonicalize_name(include)
                if target not in by_name:
                    p.fail(key, f"includes unknown group {include!r}")
                if target in chain or target == group:
                    cycle = " -> ".join((*chain, group, target))
                    p.fail(key, f"include-group cycle {cycle}")
                out.extend(resolve(target, (*chain, group)))
            else:
                p.fail(key, 'must be a requirement string or {include-group = "..."}')
        resolved[group] = _sorted_requirements(out)
        return out

    for group in by_name:
        resolve(group, ())

    legacy = tool_uv.get("dev-dependencies")
    if legacy is not None:
        if not isinstance(legacy, list):
            p.fail("tool.uv.dev-dependencies", "must be an array of requirement strings")
        dev = NormalizedName("dev")
        extra = list(p.requirement_list(legacy, "tool.uv.dev-dependencies"))
        resolved[dev] = _sorted_requirements([*resolved.get(dev, ()), *extra])
    return dict(sorted(resolved.items()))


def _license(p: _Parser, project: Mapping[str, object], root: Path) -> str | None:
    raw = project.get("license")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            return str(canonicalize_license_expression(raw))
        except InvalidLicenseExpression:
            p.fail("project.license", f"invalid SPDX license expression {raw!r}")
    if isinstance(raw, dict):
        if isinstance(raw.get("text"), str) and set(raw) == {"text"}:
            return str(raw["text"])
        file = raw.get("file")
        if isinstance(file, str) and set(raw) == {"file"}:
            try:
                return (root / file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                p.fail("project.license.file", f"cannot read {file!r}: {exc}")
    p.fail("project.license", "must be an SPDX expression, {text = ...} or {file = ...}")


def _authors(p: _Parser, project: Mapping[str, object]) -> tuple[str, ...]:
    raw = project.get("authors", [])
    if not isinstance(raw, list):
        p.fail("project.authors", "must be an array of tables")
    out: list[str] = []
    for i, item in enumerate(raw):
        key = f"project.authors[{i}]"
        if not isinstance(item, dict) or not set(item) <= {"name", "email"} or not item:
            p.fail(key, "must be a table with 'name' and/or 'email'")
        name, email = item.get("name"), item.get("email")
        if not isinstance(name, str | None) or not isinstance(email, str | None):
            p.fail(key, "'name' and 'email' must be strings")
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


class _Parser:
    """Typed accessors that raise ``ProjectError`` naming the file and dotted key."""

    def __init__(self, source: str, root: Path) -> None:
        self.source = source
        self.root = root

    def fail(self, key: str, message: str) -> NoReturn:
        raise ProjectError(f"{self.source}: {key}: {message}")

    def table(
        self,
        data: Mapping[str, object],
        name: str,
        *,
        key: str | None = None,
        required: bool = False,
    ) -> Mapping[str, object]:
        value = data.get(name)
        if value is None:
            if required:
                self.fail(key or name, f"the [{key or name}] table is missing")
            return {}
        if not isinstance(value, dict):
            self.fail(key or name, "must be a table")
        return value

    def optional_str(self, data: Mapping[str, object], name: str, key: str) -> str | None:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            self.fail(key, "must be a string")
        return value

    def str_list(self, data: Mapping[str, object], name: str, key: str) -> list[str]:
        value = data.get(name, [])
        if not isinstance(value, list):
            self.fail(key, "must be an array of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{key}[{i}]", "must be a string")
        return list(value)

    def requirement(self, text: str, key: str) -> Requirement:
        try:
            return Requirement(text)
        except InvalidRequirement:
            self.fail(key, f"invalid requirement {text!r}")

    def requirement_list(self, value: object, key: str) -> tuple[Requirement, ...]:
        if not isinstance(value, list):
            self.fail(key, "must be an array of requirement strings")
        reqs: list[Requirement] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{key}[{i}]", "must be a requirement string")
            reqs.append(self.requirement(item, f"{key}[{i}]"))
        return _sorted_requirements(reqs)

    def requirements(
        self, data: Mapping[str, object], name: str, key: str
    ) -> tuple[Requirement, ...]:
        if name not in data:
            return ()
        return self.requirement_list(data[name], key)

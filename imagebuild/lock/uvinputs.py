"""uv's ``--locked`` rules: whether uv.lock still records the project's inputs.

uv records, for the root package, ``requires-dist``, ``provides-extras`` and ``requires-dev``
(``[package.metadata]``), and ``[manifest]`` constraints and overrides. We lower
pyproject.toml the way uv does (canonical names and extras, sources resolved to index URLs
or paths, specifiers ordered by version) and compare by meaning: specifiers by version,
markers within ``requires-python``, duplicates merged.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import InvalidMarker, Marker
from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, Specifier, SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.lock.markers import markers_equivalent, valid_version
from imagebuild.lock.model import Lock, LockRequirement, UvProjectMetadata
from imagebuild.project.spec import ProjectSpec


def uv_difference(lock: Lock, project: ProjectSpec) -> str | None:
    """The first input of ``project`` that uv.lock ``lock`` no longer records, or None."""
    if lock.root != project.name or lock.root_metadata is None:
        return f"project {_q(project.name)} is not the locked project"
    return (
        local_difference(lock, project)
        or requires_python_difference(lock, project.requires_python)
        or package_difference(lock, project, _domain(lock, project))
        or manifest_difference(lock, project.tool_uv, _domain(lock, project))
    )


def package_difference(lock: Lock, project: ProjectSpec, domain: SpecifierSet | None) -> str | None:
    """The first of a local package's dependencies, extras and groups that ``lock`` lacks.

    ``lock.local_metadata`` holds what uv recorded for the package (the root, or a member
    of the workspace the lock is at the root of); markers are compared within ``domain``.
    """
    meta = lock.local_metadata.get(project.name)
    if meta is None:
        return f"project {_q(project.name)} is not in the lock"
    lowering = _Lowering(project, lock.path.parent)
    return _dependencies_difference(project, meta, domain, lowering) or _groups_difference(
        project, meta, domain, lowering
    )


def local_difference(lock: Lock, project: ProjectSpec) -> str | None:
    """A local package's entry (the root, a member): present, same version and kind."""
    roots = [
        p
        for p in lock.packages
        if p.name == project.name and p.source.kind in ("editable", "virtual", "directory")
    ]
    if not roots:
        return f"project {_q(project.name)} is not in the lock"
    root = roots[0]
    if project.version is not None and root.version != project.version:
        was = str(root.version) if root.version is not None else "dynamic"
        return f"project version changed from {_q(was)} to {_q(str(project.version))}"
    if project.version is None and "version" in project.dynamic and root.version is not None:
        return "project version is now dynamic"
    package_flag = project.tool_uv.get("package")
    packaged = package_flag if isinstance(package_flag, bool) else project.has_build_system
    if root.source.kind == "virtual" and packaged:
        return "project is now packaged (it was locked as virtual)"
    if root.source.kind == "editable" and not packaged:
        return "project is now virtual (it was locked as a package)"
    return None


def requires_python_difference(lock: Lock, requires_python: SpecifierSet | None) -> str | None:
    """``requires-python`` (the project's, or a workspace's intersection) against the lock's."""
    if requires_python is not None and (
        lock.requires_python is None
        or not _specifiers_equivalent(requires_python, lock.requires_python)
    ):
        was = str(lock.requires_python) if lock.requires_python is not None else "unset"
        return f"requires-python changed from {_q(was)} to {_q(str(requires_python))}"
    return None


def _dependencies_difference(
    project: ProjectSpec, meta: UvProjectMetadata, domain: SpecifierSet | None, lowering: _Lowering
) -> str | None:
    """Dependencies and extras (skipped where the project declares them dynamic)."""
    dynamic = set(project.dynamic)
    if not dynamic & {"dependencies", "optional-dependencies"}:
        ours = [lowering.lower(r) for r in project.dependencies]
        for extra, reqs in project.optional_dependencies.items():
            ours += [lowering.lower(r, extra=extra) for r in reqs]
        diff = _compare_requirements("dependency", ours, list(meta.requires_dist), domain)
        if diff:
            return diff
    if "optional-dependencies" not in dynamic:
        return set_difference(
            "extra", set(project.optional_dependencies), set(meta.provides_extras)
        )
    return None


def _groups_difference(
    project: ProjectSpec, meta: UvProjectMetadata, domain: SpecifierSet | None, lowering: _Lowering
) -> str | None:
    diff = set_difference(
        "dependency group", set(project.dependency_groups), set(meta.requires_dev)
    )
    if diff:
        return diff
    for group, reqs in project.dependency_groups.items():
        ours = [lowering.lower(r) for r in reqs]
        diff = _compare_requirements(
            f"dependency group {group!r}: dependency", ours, list(meta.requires_dev[group]), domain
        )
        if diff:
            return diff
    return None


def manifest_difference(
    lock: Lock, tool_uv: Mapping[str, object], domain: SpecifierSet | None
) -> str | None:
    """``[tool.uv]`` constraints, overrides and build constraints against ``[manifest]``.

    ``tool_uv`` is the workspace root's ``[tool.uv]`` (uv reads them there only).
    """
    for manifest_key, tool_key, what in (
        ("constraints", "constraint-dependencies", "constraint"),
        ("overrides", "override-dependencies", "override"),
        ("build-constraints", "build-constraint-dependencies", "build constraint"),
    ):
        raw = tool_uv.get(tool_key, [])
        texts = [str(r) for r in raw] if isinstance(raw, list) else []
        ours = [_lower_plain(Requirement(t)) for t in texts]
        diff = _compare_requirements(what, ours, list(lock.manifest.get(manifest_key, ())), domain)
        if diff:
            return diff
    return None


def _domain(lock: Lock, project: ProjectSpec) -> SpecifierSet | None:
    """The Pythons markers are compared on."""
    return project.requires_python or lock.requires_python


def set_difference(what: str, project: Collection[str], lock: Collection[str]) -> str | None:
    """``<what> 'x' was added`` / ``was removed`` for the first difference, else None."""
    added = sorted(set(project) - set(lock))
    if added:
        return f"{what} {_q(added[0])} was added"
    removed = sorted(set(lock) - set(project))
    if removed:
        return f"{what} {_q(removed[0])} was removed"
    return None


# -- requirement normalisation --------------------------------------------------------------

_WILDCARD_SOURCE = (("*", "*"),)


def _lower_plain(req: Requirement) -> LockRequirement:
    """A ``[tool.uv]`` constraint or override as uv records it (sources not lowered)."""
    return LockRequirement(
        name=canonicalize_name(req.name),
        extras=tuple(sorted(canonicalize_name(e) for e in req.extras)),
        specifier=_uv_specifier_text(req.specifier),
        marker=str(req.marker) if req.marker is not None else None,
        source=_WILDCARD_SOURCE if req.url else (),
    )


class _Lowering:
    """Turns pyproject requirements into uv's recorded form (``LockRequirement``)."""

    def __init__(self, project: ProjectSpec, lock_dir: Path) -> None:
        raw_sources = project.tool_uv.get("sources", {})
        self.sources: Mapping[str, object] = raw_sources if isinstance(raw_sources, dict) else {}
        self.indexes = {i.name: i.url or "" for i in project.uv_indexes if i.name is not None}
        self.root = project.root
        self.lock_dir = lock_dir

    def lower(self, req: Requirement, *, extra: str | None = None) -> LockRequirement:
        marker = str(req.marker) if req.marker is not None else None
        if extra is not None:
            extra_marker = f"extra == '{extra}'"
            marker = f"({marker}) and {extra_marker}" if marker else extra_marker
        name = canonicalize_name(req.name)
        source: tuple[tuple[str, str], ...] = ()
        if req.url:
            source = _WILDCARD_SOURCE
        else:
            source = self._source(name)
        return LockRequirement(
            name=name,
            extras=tuple(sorted(canonicalize_name(e) for e in req.extras)),
            specifier=_uv_specifier_text(req.specifier),
            marker=marker,
            source=source,
        )

    def _source(self, name: NormalizedName) -> tuple[tuple[str, str], ...]:
        entry: object = None
        for key, value in self.sources.items():
            if canonicalize_name(key) == name:
                entry = value
        if entry is None:
            return ()
        if not isinstance(entry, dict):
            return _WILDCARD_SOURCE  # a list of marker-split sources: not compared
        index = entry.get("index")
        if isinstance(index, str):
            return (("index", self.indexes.get(index, index)),)
        if isinstance(entry.get("path"), str):
            path = posixpath.normpath(entry["path"])
            kind = "directory" if (self.root / path).is_dir() else "path"
            if self.root.resolve() != self.lock_dir.resolve():
                # A member's path source: uv records it from the workspace root.
                path = posixpath.normpath(os.path.relpath(self.root / path, self.lock_dir))
            if entry.get("editable") is True:
                return (("editable", path),)
            return ((kind, path),)
        if isinstance(entry.get("url"), str):
            items = [("url", entry["url"])]
            if isinstance(entry.get("subdirectory"), str):
                items.append(("subdirectory", entry["subdirectory"]))
            return tuple(sorted(items))
        if isinstance(entry.get("git"), str):
            return (("git", entry["git"]),)
        return _WILDCARD_SOURCE


def _uv_specifier_text(specifiers: SpecifierSet) -> str:
    """Specifiers ordered by version, as uv writes them (``>=1.0,<3``)."""

    def key(spec: Specifier) -> tuple[int, Version, str]:
        text = spec.version.removesuffix(".*")
        return (0, Version(text), spec.operator) if valid_version(text) else (1, Version("0"), text)

    return ",".join(str(s) for s in sorted(specifiers, key=key))


def _q(text: str) -> str:
    return f"'{text}'"


def _specifiers_equivalent(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether two specifier sets admit the same versions.

    uv stores requires-python as a range, so ``~=3.9`` and ``>=3.9, <4`` are the same to it.
    """
    candidates: set[str] = {"0", "3.0", "3.99", "99"}
    for spec in (*a, *b):
        text = spec.version.removesuffix(".*")
        if not valid_version(text):
            return _spec_key(str(a)) == _spec_key(str(b))
        release = list(Version(text).release)
        for i in range(len(release) + 1):
            for delta in (-1, 0, 1):
                bumped = release[:i] + [max(release[i] + delta, 0)] if i < len(release) else release
                candidates |= {".".join(map(str, bumped)), ".".join(map(str, [*bumped, 99]))}
    return all(
        a.contains(v, prereleases=True) == b.contains(v, prereleases=True) for v in candidates
    )


def _version_key(text: str) -> str:
    """A version spelled so that uv-equal versions compare equal (1.0 == 1)."""
    try:
        v = Version(text)
    except InvalidVersion:
        return text
    release = list(v.release)
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    out = (f"{v.epoch}!" if v.epoch else "") + ".".join(map(str, release))
    if v.pre is not None:
        out += f"{v.pre[0]}{v.pre[1]}"
    if v.post is not None:
        out += f".post{v.post}"
    if v.dev is not None:
        out += f".dev{v.dev}"
    if v.local is not None:
        out += f"+{v.local}"
    return out


def _spec_key(text: str) -> frozenset[tuple[str, str]]:
    try:
        specs = SpecifierSet(text)
    except InvalidSpecifier:
        return frozenset({("raw", text)})
    out: set[tuple[str, str]] = set()
    for spec in specs:
        assert isinstance(spec, Specifier)
        if spec.operator == "===" or spec.version.endswith(".*"):
            out.add((spec.operator, spec.version))
        else:
            out.add((spec.operator, _version_key(spec.version)))
    return frozenset(out)


def _source_key(source: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in source:
        if k == "index":
            v = v.rstrip("/")
        elif k == "git":
            v = v.split("#", 1)[0].split("?", 1)[0]
        elif k in ("editable", "directory", "path"):
            v = posixpath.normpath(v)
        out.append((k, v))
    return tuple(sorted(out))


def _render(req: LockRequirement) -> str:
    text = req.name + (f"[{','.join(req.extras)}]" if req.extras else "")
    text += req.specifier
    if req.marker:
        text += f"; {_marker_text(req.marker)}"
    if req.source and req.source != _WILDCARD_SOURCE:
        text += " (" + ", ".join(f"{k} {v}" for k, v in req.source) + ")"
    return text


def _marker_text(marker: str) -> str:
    """A marker in packaging's spelling, so both sides of a message read alike."""
    try:
        return str(Marker(marker))
    except InvalidMarker:
        return marker


@dataclass(frozen=True, slots=True)
class _Group:
    name: NormalizedName
    extras: tuple[NormalizedName, ...]
    spec: frozenset[tuple[str, str]]
    source: tuple[tuple[str, str], ...]


def _group(reqs: Sequence[LockRequirement]) -> dict[_Group, list[LockRequirement]]:
    out: dict[_Group, list[LockRequirement]] = {}
    for req in reqs:
        source = _WILDCARD_SOURCE if req.source == _WILDCARD_SOURCE else _source_key(req.source)
        key = _Group(req.name, req.extras, _spec_key(req.specifier), source)
        out.setdefault(key, []).append(req)
    return out


def _compare_requirements(
    what: str,
    ours: Sequence[LockRequirement],
    theirs: Sequence[LockRequirement],
    requires_python: SpecifierSet | None,
) -> str | None:
    """Describe the first difference between two requirement lists, uv-style, or None."""
    mine, locked = _group(ours), _group(theirs)
    # Sources we cannot lower (workspace members, marker-split sources, direct URLs) match
    # whatever source uv recorded for the same name, extras and specifier.
    for key in [k for k in mine if k.source == _WILDCARD_SOURCE]:
        match = next(
            (
                other
                for other in locked
                if (other.name, other.extras, other.spec) == (key.name, key.extras, key.spec)
                and other not in mine
            ),
            None,
        )
        if match is not None:
            mine[match] = mine.pop(key)
    added = [k for k in mine if k not in locked]
    removed = [k for k in locked if k not in mine]
    changed = [
        k
        for k in mine
        if k in locked
        and not markers_equivalent(
            [r.marker for r in mine[k]], [r.marker for r in locked[k]], requires_python
        )
    ]
    # A changed specifier (same name on both sides) reads best as one change.
    for key in added:
        for old in removed:
            if old.name == key.name:
                was, now = _render(locked[old][0]), _render(mine[key][0])
                return f"{what} {_q(was)} changed to {_q(now)}"
    if added:
        return f"{what} {_q(_render(mine[added[0]][0]))} was added"
    if removed:
        return f"{what} {_q(_render(locked[removed[0]][0]))} was removed"
    if changed:
        key = changed[0]
        mine_always = any(r.marker is None for r in mine[key])
        locked_always = any(r.marker is None for r in locked[key])
        plain = _render(
            LockRequirement(
                name=key.name, extras=mine[key][0].extras, specifier=mine[key][0].specifier
            )
        )
        if mine_always and not locked_always:
            return f"{what} {_q(plain)} was added"
        if locked_always and not mine_always:
            return f"{what} {_q(plain)} is no longer unconditional"
        was = _or_markers([r.marker for r in locked[key]])
        now = _or_markers([r.marker for r in mine[key]])
        return f"{what} {_q(plain)} changed marker from {_q(was)} to {_q(now)}"
    return None


def _or_markers(markers: Sequence[str | None]) -> str:
    if any(m is None for m in markers):
        return "always"
    texts = [_marker_text(m) for m in markers if m is not None]
    return " or ".join(f"({m})" if len(texts) > 1 else m for m in texts)

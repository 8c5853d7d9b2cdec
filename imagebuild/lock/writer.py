"""Writing ``pylock.toml`` from resolutions, and judging whether it is still current.

A lock covers a set of targets (Python minor version × architecture × libc, from the
configured base). Each target is resolved on its own with every extra and dependency
group requested at once; the resolutions are then merged into one PEP 751 file:

- a version chosen on every target gets no environment marker; one chosen on some gets
  the OR of those targets' ``environments`` markers;
- a package needed only through an extra or a group gets ``'x' in extras`` /
  ``'g' in dependency_groups``, so one file serves every selection;
- each package lists every wheel usable on a target it applies to, plus its sdist.

What ``--locked`` / ``lock --check`` compare is recorded under ``[tool.imgbuild]``: the
project's requirements as written, requires-python, indexes, and the targets. Staleness
follows what users of uv expect: a new upstream release never makes a lock stale, nor does
tightening a specifier that still admits the locked version; adding or removing a
requirement, or loosening one past its pin, does.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import tomlkit
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.cache import write_atomic
from imagebuild.digest import Digest
from imagebuild.errors import LockError
from imagebuild.index.model import IndexFile
from imagebuild.net.transfer import strip_credentials
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.platform import TargetPlatform

if TYPE_CHECKING:
    from imagebuild.lock.resolve import Pin, Resolution
    from imagebuild.project.workspace import LocalPackage

INPUTS_VERSION = 1
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAIN = ""  # origin of project.dependencies


@dataclass(frozen=True, kw_only=True, slots=True)
class LockInputs:
    """Everything a lock is a function of, besides the index's contents."""

    requires_python: str | None
    """``project.requires-python`` as written (normalised specifier)."""
    requirements: tuple[tuple[str, tuple[str, ...]], ...]
    """Origin -> requirement strings, sorted: ``""`` for dependencies, ``extra:x``, ``group:g``."""
    indexes: tuple[str, ...]
    """Index URLs, primary first."""
    prereleases: bool
    """Whether pre-releases were allowed everywhere."""
    targets: tuple[TargetPlatform, ...]
    """The targets the lock covers, sorted."""


def environment_marker(target: TargetPlatform) -> str:
    """The PEP 751 ``environments`` marker for one target (libc is not expressible)."""
    major, minor = target.python_version
    return (
        f"sys_platform == 'linux' and platform_machine == '{target.arch}' "
        f"and python_version == '{major}.{minor}'"
    )


def sort_targets(targets: Sequence[TargetPlatform]) -> tuple[TargetPlatform, ...]:
    """Targets in a stable order (Python, then architecture, then libc)."""
    return tuple(
        sorted(set(targets), key=lambda t: (t.python_version, t.arch, t.libc, t.libc_version))
    )


def project_roots(project: ProjectSpec) -> dict[str, tuple[Requirement, ...]]:
    """Origin -> requirements: dependencies, then every extra and every group."""
    roots: dict[str, tuple[Requirement, ...]] = {MAIN: tuple(project.dependencies)}
    for extra, reqs in sorted(project.optional_dependencies.items()):
        roots[f"extra:{extra}"] = tuple(reqs)
    for group, reqs in sorted(project.dependency_groups.items()):
        roots[f"group:{group}"] = tuple(reqs)
    return roots


def project_inputs(
    project: ProjectSpec,
    *,
    indexes: Sequence[str],
    prereleases: bool,
    targets: Sequence[TargetPlatform],
    local: Sequence[ProjectSpec] = (),
) -> LockInputs:
    """The inputs of a lock of ``project`` (and the local projects it uses) for ``targets``."""
    requirements = [
        (origin, tuple(sorted(str(r) for r in reqs)))
        for origin, reqs in project_roots(project).items()
    ]
    for spec in sorted(local, key=lambda p: p.name):
        # A local project's own requirements are inputs too: editing them makes the lock stale.
        reqs = [*spec.dependencies]
        for extra, extra_reqs in sorted(spec.optional_dependencies.items()):
            reqs += [
                Requirement(f"{r}; extra == '{extra}'") if not r.marker else r for r in extra_reqs
            ]
        requirements.append((f"local:{spec.name}", tuple(sorted(str(r) for r in reqs))))
    return LockInputs(
        requires_python=str(project.requires_python) if project.requires_python else None,
        requirements=tuple(requirements),
        indexes=tuple(indexes),
        prereleases=prereleases,
        targets=sort_targets(targets),
    )


# -- rendering --------------------------------------------------------------------------


def render_pylock(
    project: ProjectSpec,
    inputs: LockInputs,
    resolutions: Sequence[Resolution],
    *,
    roots: Mapping[str, Sequence[Requirement]],
    lock_dir: Path,
    local: Mapping[NormalizedName, LocalPackage] | None = None,
    base_digests: Mapping[str, str] | None = None,
) -> str:
    """The pylock.toml text for ``resolutions`` (one per target), deterministic.

    ``roots`` are what was resolved (origin -> requirements, local projects already
    replaced by their requirements); ``local`` the local projects, written as
    ``directory`` entries relative to ``lock_dir``.
    """
    # (name, version) -> target -> origins that reach it on that target
    presence: dict[tuple[NormalizedName, Version], dict[TargetPlatform, set[str]]] = {}
    pins: dict[tuple[NormalizedName, Version], Pin] = {}
    for resolution in resolutions:
        reach = _reachability(resolution, roots)
        for pin in resolution.pins:
            key = (pin.name, pin.version)
            pins.setdefault(key, pin)
            presence.setdefault(key, {})[resolution.target] = reach.get(pin.name, set())

    all_targets = sort_targets([r.target for r in resolutions])
    doc = tomlkit.document()
    doc.add("lock-version", "1.0")
    doc.add("environments", _array([environment_marker(t) for t in all_targets]))
    if inputs.requires_python:
        doc.add("requires-python", inputs.requires_python)
    doc.add(
        "extras", _array(sorted(o[6:] for o, _ in inputs.requirements if o.startswith("extra:")))
    )
    doc.add(
        "dependency-groups",
        _array(sorted(o[6:] for o, _ in inputs.requirements if o.startswith("group:"))),
    )
    doc.add("created-by", "imgbuild")

    entries: list[tuple[str, str, tomlkit.items.Table]] = []
    for name, package in sorted((local or {}).items()):
        presence_local: dict[TargetPlatform, set[str]] = {}
        for target in all_targets:
            env = {**target.marker_environment(), "extra": ""}
            origins = {
                origin
                for origin, markers in package.markers.items()
                if any(m is None or m.evaluate(env) for m in markers)
            }
            if origins:
                presence_local[target] = origins
        if not presence_local:
            continue
        table = tomlkit.table()
        table.add("name", name)
        marker = _package_marker(presence_local, all_targets)
        if marker:
            table.add("marker", marker)
        path = os.path.relpath(package.project.root, lock_dir)
        table.add("directory", _inline({"path": Path(path).as_posix(), "editable": False}))
        entries.append((name, "", table))
    packages = tomlkit.aot()
    for key in sorted(pins):
        pin = pins[key]
        table = tomlkit.table()
        table.add("name", pin.name)
        table.add("version", str(pin.version))
        marker = _package_marker(presence[key], all_targets)
        if marker:
            table.add("marker", marker)
        index_url = next((f.index_url for f in pin.files if f.index_url), "")
        if index_url:
            table.add("index", strip_credentials(index_url))
        targets_here = [t for t in all_targets if t in presence[key]]
        sdists = [f for f in pin.files if f.kind == "sdist"]
        if sdists:
            table.add("sdist", _file_table(sdists[0], inline=True))
        wheels = [
            f
            for f in pin.files
            if f.kind == "wheel" and any(t.rank_wheels([f]) for t in targets_here)
        ]
        if wheels:
            array = tomlkit.array()
            array.multiline(True)
            for wheel in sorted(wheels, key=lambda f: f.filename):
                array.append(_file_table(wheel, inline=True))
            table.add("wheels", array)
        entries.append((key[0], str(key[1]), table))
    root = tomlkit.table()
    root.add("name", project.name)
    root_path = Path(os.path.relpath(project.root, lock_dir)).as_posix()
    root.add("directory", _inline({"path": root_path, "editable": False}))
    entries.append((project.name, "", root))
    for _, _, table in sorted(entries, key=lambda e: (e[0], e[1])):
        packages.append(table)
    doc.add("packages", packages)
    doc.add("tool", _tool_table(inputs, base_digests or {}))
    return tomlkit.dumps(doc)


def write_pylock(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, text.encode("utf-8"))


def _reachability(
    resolution: Resolution, roots: Mapping[str, Sequence[Requirement]]
) -> dict[NormalizedName, set[str]]:
    """Package -> the origins (dependencies, extra:x, group:g) that pull it in on this target."""
    env = resolution.target.marker_environment()
    by_name = {pin.name: pin for pin in resolution.pins}
    reach: dict[NormalizedName, set[str]] = {}
    for origin, reqs in roots.items():
        queue = [
            canonicalize_name(r.name)
            for r in reqs
            if r.marker is None or r.marker.evaluate({**env, "extra": ""})
        ]
        seen: set[NormalizedName] = set()
        while queue:
            name = queue.pop()
            if name in seen or name not in by_name:
                continue
            seen.add(name)
            queue.extend(by_name[name].dependencies)
        for name in seen:
            reach.setdefault(name, set()).add(origin)
    return reach


def _origin_marker(origins: set[str]) -> str | None:
    """None when the main dependencies need it; else the extras/groups that do."""
    if MAIN in origins or not origins:
        return None
    parts = []
    for origin in sorted(origins):
        kind, _, name = origin.partition(":")
        variable = "extras" if kind == "extra" else "dependency_groups"
        parts.append(f"'{name}' in {variable}")
    return " or ".join(parts)


def _package_marker(
    presence: Mapping[TargetPlatform, set[str]], all_targets: Sequence[TargetPlatform]
) -> str | None:
    per_target = {t: _origin_marker(o) for t, o in presence.items()}
    everywhere = set(presence) == set(all_targets)
    if everywhere and len(set(per_target.values())) == 1:
        return next(iter(per_target.values()))
    clauses = []
    for target in all_targets:
        if target not in presence:
            continue
        env = environment_marker(target)
        origin = per_target[target]
        clauses.append(f"({env} and ({origin}))" if origin else f"({env})")
    return " or ".join(dict.fromkeys(clauses))


def _file_table(file: IndexFile, *, inline: bool) -> object:
    data: dict[str, object] = {"url": strip_credentials(file.url)}
    if file.upload_time:
        data["upload-time"] = _datetime(file.upload_time)
    if file.size is not None:
        data["size"] = file.size
    if file.sha256:
        data["hashes"] = _inline({"sha256": file.sha256})
    return _inline(data)


def _datetime(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.astimezone(UTC)


def _inline(data: Mapping[str, object]) -> tomlkit.items.InlineTable:
    table = tomlkit.inline_table()
    for key, value in data.items():
        table.append(key, value)
    return table


def _array(values: Sequence[str]) -> tomlkit.items.Array:
    array = tomlkit.array()
    array.extend(values)
    return array


def _tool_table(inputs: LockInputs, base_digests: Mapping[str, str]) -> tomlkit.items.Table:
    tool = tomlkit.table()
    ours = tomlkit.table()
    ours.add("inputs-version", INPUTS_VERSION)
    if inputs.requires_python:
        ours.add("requires-python", inputs.requires_python)
    requirements = tomlkit.table()
    for origin, reqs in inputs.requirements:
        array = _array(list(reqs))
        if len(reqs) > 2:
            array.multiline(True)
        requirements.add(origin or "dependencies", array)
    ours.add("requirements", requirements)
    ours.add("indexes", _array([strip_credentials(url) for url in inputs.indexes]))
    ours.add("prereleases", inputs.prereleases)
    targets = tomlkit.aot()
    for target in inputs.targets:
        row = tomlkit.table()
        row.add("python", ".".join(map(str, target.python_version)))
        row.add("arch", target.arch)
        row.add("libc", target.libc)
        row.add("libc-version", ".".join(map(str, target.libc_version)))
        targets.append(row)
    ours.add("targets", targets)
    if base_digests:
        bases = tomlkit.table()
        for ref, digest in sorted(base_digests.items()):
            bases.add(ref, digest)
        ours.add("bases", bases)
    tool.add("imgbuild", ours)
    return tool


# -- reading back and staleness ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordedLock:
    """What an imgbuild pylock.toml says about how it was made."""

    inputs: LockInputs
    """The recorded inputs."""
    pins: Mapping[NormalizedName, tuple[Version, ...]]
    """Locked versions per package name."""
    bases: Mapping[str, Digest] = field(default_factory=dict)
    """Base image reference (as configured) -> the digest the lock was made for."""


def read_recorded(path: Path) -> RecordedLock | None:
    """The ``[tool.imgbuild]`` inputs of a pylock.toml, or None if imgbuild did not write it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LockError(f"{path}: cannot read ({exc})", hint="run 'imgbuild lock'") from exc
    tool = data.get("tool", {}).get("imgbuild")
    if not isinstance(tool, dict) or tool.get("inputs-version") != INPUTS_VERSION:
        return None
    try:
        requirements = tuple(
            (("" if origin == "dependencies" else origin), tuple(reqs))
            for origin, reqs in tool["requirements"].items()
        )
        targets = tuple(
            TargetPlatform(
                python_version=_pair(row["python"]),
                libc=row["libc"],
                libc_version=_pair(row["libc-version"]),
                arch=row["arch"],
            )
            for row in tool["targets"]
        )
        inputs = LockInputs(
            requires_python=tool.get("requires-python"),
            requirements=requirements,
            indexes=tuple(tool["indexes"]),
            prereleases=bool(tool["prereleases"]),
            targets=sort_targets(targets),
        )
        bases = {str(ref): Digest(str(digest)) for ref, digest in tool.get("bases", {}).items()}
        for ref, digest in bases.items():
            if not _DIGEST.match(digest):
                raise ValueError(f"bases[{ref!r}] = {digest!r} is not a sha256 digest")
        pins: dict[NormalizedName, list[Version]] = {}
        for package in data.get("packages", []):
            if "version" in package:
                pins.setdefault(canonicalize_name(package["name"]), []).append(
                    Version(package["version"])
                )
    except (KeyError, TypeError, ValueError, InvalidVersion) as exc:
        raise LockError(
            f"{path}: tool.imgbuild is malformed ({exc})", hint="run 'imgbuild lock'"
        ) from exc
    return RecordedLock(inputs=inputs, pins={k: tuple(v) for k, v in pins.items()}, bases=bases)


def _pair(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return (int(major), int(minor))


def staleness(recorded: RecordedLock, current: LockInputs) -> str | None:
    """Why the lock no longer fits ``current`` (one short clause), or None if it does."""
    old = recorded.inputs
    if old.requires_python != current.requires_python:
        return (
            f"requires-python changed from {old.requires_python or 'none'} "
            f"to {current.requires_python or 'none'}"
        )
    if tuple(map(strip_credentials, old.indexes)) != tuple(map(strip_credentials, current.indexes)):
        return f"the indexes changed ({', '.join(current.indexes)})"
    if old.prereleases != current.prereleases:
        return "the pre-release setting changed"
    missing = [t for t in current.targets if t not in old.targets]
    if missing:
        return f"target {missing[0].describe()} is not covered"
    old_reqs = dict(old.requirements)
    new_reqs = dict(current.requirements)
    for origin in sorted(set(old_reqs) | set(new_reqs)):
        label = _origin_label(origin)
        if origin not in old_reqs:
            return f"{label} was added"
        if origin not in new_reqs:
            return f"{label} was removed"
        reason = _requirements_change(old_reqs[origin], new_reqs[origin], recorded.pins)
        if reason:
            return f"{reason} ({label})" if origin else reason
    return None


def _origin_label(origin: str) -> str:
    if not origin:
        return "dependencies"
    kind, _, name = origin.partition(":")
    if kind == "local":
        return f"local project '{name}'"
    return f"optional dependencies '{name}'" if kind == "extra" else f"dependency group '{name}'"


def _requirements_change(
    old: Sequence[str],
    new: Sequence[str],
    pins: Mapping[NormalizedName, tuple[Version, ...]],
) -> str | None:
    def keyed(reqs: Sequence[str]) -> dict[tuple[NormalizedName, str, str], Requirement]:
        out = {}
        for text in reqs:
            req = Requirement(text)
            key = (canonicalize_name(req.name), ",".join(sorted(req.extras)), str(req.marker or ""))
            out[key] = req
        return out

    before, after = keyed(old), keyed(new)
    for key in sorted(set(after) - set(before)):
        return f"dependency '{after[key]}' was added"
    for key in sorted(set(before) - set(after)):
        return f"dependency '{before[key]}' was removed"
    for key in sorted(set(before) & set(after)):
        was, now = before[key].specifier, after[key].specifier
        if str(was) == str(now):
            continue
        locked = pins.get(key[0], ())
        for version in locked:
            if not now.contains(version, prereleases=True):
                return f"'{after[key]}' no longer admits the locked {key[0]} {version}"
        if locked and _loosened_past(was, now, max(locked)):
            return f"'{after[key]}' admits versions above the locked {key[0]} {max(locked)}"
    return None


def _loosened_past(was: SpecifierSet, now: SpecifierSet, pin: Version) -> bool:
    """Whether ``now`` admits a version above ``pin`` that ``was`` did not."""
    probes: set[Version] = set()
    for spec in [*was, *now]:
        try:
            bound = Version(spec.version.replace(".*", ""))
        except InvalidVersion:
            continue
        release = list(bound.release)
        probes.add(bound)
        for i in range(len(release)):
            bumped = [*release[:i], release[i] + 1]
            probes.add(Version(".".join(map(str, bumped))))
    return any(
        v > pin and now.contains(v, prereleases=True) and not was.contains(v, prereleases=True)
        for v in probes
    )


def check_pylock(path: Path, current: LockInputs) -> bool:
    """Raise LockError when an imgbuild pylock.toml is stale; False if not ours to judge."""
    recorded = read_recorded(path)
    if recorded is None:
        return False
    reason = staleness(recorded, current)
    if reason is not None:
        raise LockError(
            f"{path.name} is out of date with pyproject.toml: {reason}",
            hint="run 'imgbuild lock' (or drop --locked)",
        )
    return True


def recorded_bases(path: Path) -> dict[str, Digest]:
    """The base digests an imgbuild pylock.toml records (reference -> digest), else none."""
    recorded = read_recorded(path) if path.is_file() else None
    return dict(recorded.bases) if recorded is not None else {}


def pins_as_preferences(path: Path) -> dict[NormalizedName, Version]:
    """The newest locked version of each package, for keeping pins when re-locking."""
    recorded = read_recorded(path) if path.is_file() else None
    if recorded is None:
        return {}
    return {name: max(versions) for name, versions in recorded.pins.items()}


def marker_for(target: TargetPlatform) -> Marker:
    """``environment_marker`` as a Marker."""
    return Marker(environment_marker(target))

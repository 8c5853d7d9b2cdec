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
project's requirements as written, requires-python, indexes, and the targets
(``lock.inputs`` gathers them; ``lock.pylock`` reads that record back;
``lock.staleness`` judges it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import tomlkit
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from imagebuild.cache import write_atomic
from imagebuild.index.model import IndexFile
from imagebuild.lock.inputs import MAIN, environment_marker
from imagebuild.lock.model import LockInputs, sort_targets
from imagebuild.lock.pylock import INPUTS_VERSION
from imagebuild.net.transfer import strip_credentials
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.platform import TargetPlatform

if TYPE_CHECKING:
    from imagebuild.lock.direct import DirectPackage
    from imagebuild.lock.resolve import Pin, Resolution
    from imagebuild.project.workspace import LocalPackage

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
    direct: Sequence[DirectPackage] = (),
    base_lock: Mapping[str, Any] | None = None,
) -> str:
    """The pylock.toml text for ``resolutions`` (one per target), deterministic.

    ``roots`` are what was resolved (origin -> requirements, local projects already
    replaced by their requirements); ``local`` the local projects, written as
    ``directory`` entries relative to ``lock_dir``; ``base_lock`` a built base's packages
    (``[tool.imgbuild.debian]``, rendered by the debian stage).
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
    doc = _header(inputs, all_targets)
    entries = _local_entries(local or {}, all_targets, lock_dir)
    entries += [_direct_entry(p, all_targets, lock_dir) for p in direct]
    for key in sorted(pins):
        table = _pin_table(pins[key], presence[key], all_targets)
        entries.append((key[0], str(key[1]), table))
    root = tomlkit.table()
    root.add("name", project.name)
    root_path = Path(os.path.relpath(project.root, lock_dir)).as_posix()
    root.add("directory", _inline({"path": root_path, "editable": False}))
    entries.append((project.name, "", root))
    packages = tomlkit.aot()
    for _, _, table in sorted(entries, key=lambda e: (e[0], e[1])):
        packages.append(table)
    doc.add("packages", packages)
    doc.add("tool", _tool_table(inputs, base_digests or {}, base_lock))
    return tomlkit.dumps(doc)


def _header(inputs: LockInputs, all_targets: Sequence[TargetPlatform]) -> tomlkit.TOMLDocument:
    """The document's top-level keys, before ``packages``."""
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
    return doc


_Entry = tuple[str, str, tomlkit.items.Table]


def _local_entries(
    local: Mapping[NormalizedName, LocalPackage],
    all_targets: Sequence[TargetPlatform],
    lock_dir: Path,
) -> list[_Entry]:
    """``directory`` entries for the local projects needed on some target."""
    entries: list[_Entry] = []
    for name, package in sorted(local.items()):
        presence_local = _presence(package.markers, all_targets)
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
    return entries


def _presence(
    markers: Mapping[str, Sequence[Marker | None]], all_targets: Sequence[TargetPlatform]
) -> dict[TargetPlatform, set[str]]:
    """For each target, the origins (extras, groups) whose requirement markers hold there."""
    presence: dict[TargetPlatform, set[str]] = {}
    for target in all_targets:
        env = {**target.marker_environment(), "extra": ""}
        origins = {
            origin
            for origin, found in markers.items()
            if any(m is None or m.evaluate(env) for m in found)
        }
        if origins:
            presence[target] = origins
    return presence


def _direct_entry(
    package: DirectPackage, all_targets: Sequence[TargetPlatform], lock_dir: Path
) -> _Entry:
    """A ``vcs`` or ``archive`` entry, with the marker of the requirements on it."""
    presence = _presence(package.markers, all_targets)
    table = tomlkit.table()
    table.add("name", package.name)
    table.add("version", str(package.version))
    marker = _package_marker(presence, all_targets) if presence else None
    if marker:
        table.add("marker", marker)
    if package.requires_python is not None:
        table.add("requires-python", str(package.requires_python))
    source = package.source
    if source.kind == "git":
        vcs: dict[str, object] = {"type": "git", "url": strip_credentials(source.url)}
        if source.revision is not None:
            vcs["requested-revision"] = source.revision[1]
        vcs["commit-id"] = package.commit or ""
        if source.subdirectory:
            vcs["subdirectory"] = source.subdirectory
        table.add("vcs", _inline(vcs))
    else:
        archive: dict[str, object] = {}
        if source.kind == "path":
            local = Path(url2pathname(urlsplit(source.url).path))
            archive["path"] = Path(os.path.relpath(local, lock_dir)).as_posix()
        else:
            archive["url"] = strip_credentials(source.url)
        if package.size is not None:
            archive["size"] = package.size
        archive["hashes"] = _inline({"sha256": package.sha256 or ""})
        table.add("archive", _inline(archive))
    return (package.name, str(package.version), table)


def _pin_table(
    pin: Pin, presence: Mapping[TargetPlatform, set[str]], all_targets: Sequence[TargetPlatform]
) -> tomlkit.items.Table:
    """One index package: version, marker, index, sdist and the wheels some target uses."""
    table = tomlkit.table()
    table.add("name", pin.name)
    table.add("version", str(pin.version))
    marker = _package_marker(presence, all_targets)
    if marker:
        table.add("marker", marker)
    index_url = next((f.index_url for f in pin.files if f.index_url), "")
    if index_url:
        table.add("index", strip_credentials(index_url))
    targets_here = [t for t in all_targets if t in presence]
    sdists = [f for f in pin.files if f.kind == "sdist"]
    if sdists:
        table.add("sdist", _file_table(sdists[0], inline=True))
    wheels = [
        f for f in pin.files if f.kind == "wheel" and any(t.rank_wheels([f]) for t in targets_here)
    ]
    if wheels:
        array = tomlkit.array()
        array.multiline(True)
        for wheel in sorted(wheels, key=lambda f: f.filename):
            array.append(_file_table(wheel, inline=True))
        table.add("wheels", array)
    return table


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


def _tool_table(
    inputs: LockInputs, base_digests: Mapping[str, str], base_lock: Mapping[str, Any] | None
) -> tomlkit.items.Table:
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
    if base_lock:
        ours.add("debian", _base_lock_table(base_lock))
    tool.add("imgbuild", ours)
    return tool


def _base_lock_table(base_lock: Mapping[str, Any]) -> tomlkit.items.Table:
    """``[tool.imgbuild.debian]``: its lists on one line each, its rows as ``[[debs]]``."""
    table = tomlkit.table()
    for key, value in base_lock.items():
        if key == "debs":
            rows = tomlkit.aot()
            for row in value:
                item = tomlkit.table()
                for field_name, field_value in row.items():
                    item.add(field_name, field_value)
                rows.append(item)
            table.add(key, rows)
        elif isinstance(value, list):
            table.add(key, _array(value))
        else:
            table.add(key, value)
    return table

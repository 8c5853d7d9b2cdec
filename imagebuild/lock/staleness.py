"""Staleness: whether a lock still fits the project (``--locked``, ``lock --check``).

- uv.lock: uv's own ``--locked`` rules (``lock.uvinputs``), so a lock uv accepts is
  accepted here and one it refuses is refused with a like reason;
- an imgbuild pylock.toml: the inputs recorded under ``[tool.imgbuild]`` against the
  current ones. A new upstream release never makes it stale, nor does tightening a
  specifier that still admits the pin; adding or removing a requirement, or loosening one
  past its pin, does;
- any other pylock.toml records no inputs: only its declared extras and groups are compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.errors import LockError
from imagebuild.lock.model import RELOCK_HINT, Lock, LockInputs, RecordedLock
from imagebuild.lock.uvinputs import set_difference, uv_difference
from imagebuild.lock.uvworkspace import is_workspace_lock, uv_workspace_difference
from imagebuild.net.transfer import strip_credentials
from imagebuild.project.spec import ProjectSpec
from imagebuild.project.workspace import Workspace


def check_locked(lock: Lock, project: ProjectSpec, *, workspace: Workspace | None = None) -> None:
    """Raise ``LockError`` if ``lock`` no longer records ``project``'s inputs.

    For uv.lock this compares what uv records for the root package (``requires-dist``,
    ``provides-extras``, ``requires-dev``), its version and virtual/editable kind, the
    ``[manifest]`` constraints and overrides, and ``requires-python`` with pyproject.toml,
    normalised the way uv normalises them (canonical names and extras, specifiers compared
    by version, markers compared by meaning within ``requires-python``, duplicates merged).
    Inputs the project declares dynamic cannot be read without a build and are skipped.
    A pylock.toml records no inputs; only its declared extras and groups are compared.
    A uv workspace's lock (``workspace`` given) is judged over every member, as uv does.
    """
    if lock.kind != "uv":
        problem = _pylock_difference(lock, project)
    elif workspace is not None and is_workspace_lock(lock, workspace, project):
        problem = uv_workspace_difference(lock, workspace)
    else:
        problem = uv_difference(lock, project)
    if problem is not None:
        raise LockError(
            f"{lock.filename} is out of date with pyproject.toml: {problem}",
            hint=RELOCK_HINT if lock.kind == "uv" else "regenerate the lock (or drop --locked)",
        )


def _pylock_difference(lock: Lock, project: ProjectSpec) -> str | None:
    if lock.extras is not None:
        diff = set_difference("extra", set(project.optional_dependencies), set(lock.extras))
        if diff:
            return diff
    if lock.dependency_groups is not None:
        in_lock = {canonicalize_name(g) for g in (*lock.dependency_groups, *lock.default_groups)}
        diff = set_difference("dependency group", set(project.dependency_groups), in_lock)
        if diff:
            return diff
    return None


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
    if kind == "sources":
        return "tool.uv.sources"
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
        if before[key].url != after[key].url:
            return f"'{after[key]}' was '{before[key]}'"
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


def check_recorded(recorded: RecordedLock | None, current: LockInputs, *, filename: str) -> bool:
    """Raise LockError when an imgbuild pylock's record is stale; False if not ours to judge.

    ``recorded`` is ``Lock.recorded`` (a build) or ``load_recorded(path)`` (``imgbuild
    lock``): the file was read once, by whoever holds it; ``filename`` names it.
    """
    if recorded is None:
        return False
    reason = staleness(recorded, current)
    if reason is not None:
        raise LockError(
            f"{filename} is out of date with pyproject.toml: {reason}",
            hint="run 'imgbuild lock' (or drop --locked)",
        )
    return True


def check_pylock(path: Path, current: LockInputs) -> bool:
    """Raise LockError when an imgbuild pylock.toml is stale; False if not ours to judge.

    A thin wrapper that reads ``path``: prefer ``check_recorded`` on a record read once.
    """
    from imagebuild.lock.pylock import read_recorded  # (only for a pylock.toml)

    return check_recorded(read_recorded(path), current, filename=path.name)

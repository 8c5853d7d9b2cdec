"""What to install for a target: the packages of a ``Lock`` that apply to it.

uv.lock is a graph, walked from the root through the requested extras and groups along
edges whose markers hold; pylock.toml is a flat list, filtered by each entry's marker.
Each package selected then installs from a wheel for the target, else its sdist, else a
local directory (``sort_sources``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from packaging.utils import NormalizedName, canonicalize_name

from imagebuild.errors import LockError, TargetError
from imagebuild.lock.model import (
    RELOCK_HINT,
    Dependency,
    Lock,
    LockedPackage,
    WheelFile,
    sort_packages,
)
from imagebuild.target.platform import TargetPlatform


def select_packages(
    lock: Lock,
    *,
    root: str | None = None,
    target: TargetPlatform,
    extras: Collection[str] = frozenset(),
    groups: Collection[str] = frozenset(),
) -> tuple[LockedPackage, ...]:
    """The packages to install for ``target``: never the root project, never virtual ones.

    uv.lock: walk the graph from ``root`` (default ``lock.root``) through its dependencies,
    the requested extras' optional dependencies and the requested groups, following edges
    whose markers hold on the target. pylock.toml: evaluate each entry's marker with
    ``extras``/``dependency_groups`` set. Every selected package must be installable: from a
    wheel the lock lists, its sdist, or a local directory; otherwise ``LockError`` says which
    and how to fix it.
    """
    env = target.marker_environment()
    full = env["python_full_version"]
    if lock.requires_python is not None and not lock.requires_python.contains(
        full, prereleases=True
    ):
        raise LockError(
            f"{lock.filename} requires Python {lock.requires_python} but the target is {full}",
            hint="use a base image with a Python the lock supports",
        )
    root_name = canonicalize_name(root) if root is not None else lock.root
    if lock.kind == "uv":
        chosen = _select_uv(lock, root_name, env, extras, groups)
    else:
        chosen = _select_pylock(lock, root_name, env, extras, groups)
    for package in chosen:
        _check_installable(lock, package)
    return sort_packages(chosen)


def _check_installable(lock: Lock, package: LockedPackage) -> None:
    """Refuse a package the build could not install.

    Wheels install as they are; local directories (workspace members, path sources) and
    sdists are built into wheels at image build time; anything else is refused here.
    """
    where = f"{lock.filename}: package {package.describe()}"
    if package.wheels or package.sdist is not None:
        return
    source = package.source
    if source.kind in ("directory", "editable", "git"):
        return  # built from source (a git source at its locked commit)
    raise LockError(
        f"{where} ({source.describe()}) lists no wheel to install",
        hint="re-lock so the package is pinned to a wheel",
    )


def _check_environments(lock: Lock, env: Mapping[str, str], problem: str, *, hint: str) -> None:
    """Refuse a target that none of the lock's ``environments`` markers admits."""
    if lock.environments and not any(m.evaluate(dict(env)) for m in lock.environments):
        shown = " | ".join(str(m) for m in lock.environments)
        raise LockError(f"{lock.filename}: the target {problem} ({shown})", hint=hint)


def _select_uv(
    lock: Lock,
    root: NormalizedName | None,
    env: Mapping[str, str],
    extras: Collection[str],
    groups: Collection[str],
) -> list[LockedPackage]:
    _check_environments(
        lock,
        env,
        "is outside the lock's supported environments",
        hint="add the image's platform to [tool.uv] environments and run 'uv lock'",
    )
    graph = _UvGraph(lock, env)
    if root is None:
        raise LockError(
            f"{lock.filename} has no project package at its own directory",
            hint="run imgbuild in the directory that holds the uv.lock",
        )
    root_package = graph.root(root)
    want_extras = {canonicalize_name(e) for e in extras}
    want_groups = {canonicalize_name(g) for g in groups}
    _check_requested(lock, root_package, want_extras, "extra", "extras")
    _check_requested(lock, root_package, want_groups, "dependency group", "groups")
    seen = graph.walk(root_package, want_extras, want_groups)
    return [p for p in seen if p is not root_package and p.source.kind != "virtual"]


def _check_requested(
    lock: Lock, root: LockedPackage, wanted: set[NormalizedName], what: str, plural: str
) -> None:
    """Refuse extras or groups the root package does not have."""
    have = root.optional_dependencies if plural == "extras" else root.dependency_groups
    unknown = sorted(wanted - set(have))
    if unknown:
        known = ", ".join(have) or "none"
        raise LockError(
            f"{lock.filename}: {root.name} has no {what} {unknown[0]!r} ({plural}: {known})",
            hint=f"check the {what.split()[-1]}'s name, or run 'uv lock' after adding it",
        )


_Key = tuple[str, str, str, str]


class _UvGraph:
    """uv.lock's packages by name, and the walk over their edges on one target."""

    def __init__(self, lock: Lock, env: Mapping[str, str]) -> None:
        self.lock = lock
        self.env = env
        self.by_name: dict[NormalizedName, list[LockedPackage]] = {}
        for package in lock.packages:
            self.by_name.setdefault(package.name, []).append(package)

    def root(self, root: NormalizedName) -> LockedPackage:
        """The package to start from: the local one of that name, else the only one."""
        roots = self.by_name.get(root, [])
        local_roots = [p for p in roots if p.source.kind in ("editable", "virtual", "directory")]
        roots = local_roots or roots
        if len(roots) != 1:
            count = "no" if not roots else "several"
            raise LockError(
                f"{self.lock.filename} has {count} package {root!r} to start from",
                hint=RELOCK_HINT,
            )
        return roots[0]

    def resolve(self, dep: Dependency, parent: LockedPackage) -> LockedPackage:
        """The one entry an edge points at on this target."""
        candidates = self.by_name.get(dep.name, [])
        if dep.version is not None:
            candidates = [p for p in candidates if p.version == dep.version]
        if dep.source is not None:
            candidates = [p for p in candidates if p.source == dep.source]
        if len(candidates) > 1:
            # A forked resolution: keep the versions whose fork includes the target.
            candidates = [
                p
                for p in candidates
                if not p.resolution_markers
                or any(m.evaluate(dict(self.env)) for m in p.resolution_markers)
            ]
        if len(candidates) == 1:
            return candidates[0]
        what = "no entry" if not candidates else "several entries"
        wanted = f"{dep.name} {dep.version}" if dep.version is not None else str(dep.name)
        raise LockError(
            f"{self.lock.filename}: {parent.describe()} depends on {wanted}, but the lock has "
            f"{what} for it on this target",
            hint=RELOCK_HINT,
        )

    def walk(
        self, root: LockedPackage, extras: set[NormalizedName], groups: set[NormalizedName]
    ) -> list[LockedPackage]:
        """Every package reached from ``root``; an extra reached later re-opens a package."""
        seen: dict[_Key, LockedPackage] = {}
        activated: dict[_Key, set[NormalizedName]] = {}
        work: list[tuple[LockedPackage, set[NormalizedName], bool]] = [(root, extras, True)]
        while work:
            package, new_extras, is_root = work.pop()
            k = _key(package)
            first_visit = k not in seen
            seen[k] = package
            done = activated.setdefault(k, set())
            pending = (new_extras - done) if not first_visit else set(new_extras)
            done |= pending
            for dep, edge_extra in self._edges(package, first_visit, is_root, groups, pending):
                if dep.marker is not None and not dep.marker.evaluate(
                    {**self.env, "extra": edge_extra}
                ):
                    continue
                child = self.resolve(dep, package)
                child_key = _key(child)
                if child_key not in seen or not set(dep.extras) <= activated.get(child_key, set()):
                    work.append((child, set(dep.extras), False))
        return list(seen.values())

    @staticmethod
    def _edges(
        package: LockedPackage,
        first_visit: bool,
        is_root: bool,
        groups: set[NormalizedName],
        extras: set[NormalizedName],
    ) -> list[tuple[Dependency, str]]:
        """Edges to follow now, each with the extra that opened it (``""``: none)."""
        edges: list[tuple[Dependency, str]] = []
        if first_visit:
            edges += [(d, "") for d in package.dependencies]
            if is_root:
                for group in sorted(groups):
                    edges += [(d, "") for d in package.dependency_groups[group]]
        for extra in sorted(extras):
            edges += [(d, extra) for d in package.optional_dependencies.get(extra, ())]
        return edges


def _key(p: LockedPackage) -> _Key:
    return (p.name, str(p.version), p.source.kind, p.source.location)


def _select_pylock(
    lock: Lock,
    root: NormalizedName | None,
    env: Mapping[str, str],
    extras: Collection[str],
    groups: Collection[str],
) -> list[LockedPackage]:
    _check_environments(
        lock, env, "matches none of the lock's environments", hint="lock for the image's platform"
    )
    full = env["python_full_version"]
    lock_env: dict[str, str | frozenset[str]] = {
        **env,
        "extras": frozenset(canonicalize_name(e) for e in extras),
        "dependency_groups": frozenset(groups),
    }
    selected: dict[NormalizedName, LockedPackage] = {}
    for package in lock.packages:
        if package.marker is not None and not package.marker.evaluate(
            lock_env,
            context="lock_file",
        ):
            continue
        if package.requires_python is not None and not package.requires_python.contains(
            full, prereleases=True
        ):
            raise LockError(
                f"{lock.filename}: package {package.describe()} requires Python "
                f"{package.requires_python} but the target is {full}",
                hint="use a base image with a Python the lock supports",
            )
        if package.name in selected:
            raise LockError(
                f"{lock.filename}: two entries for {package.name} apply to the target "
                f"({selected[package.name].describe()} and {package.describe()})",
                hint="regenerate the lock so the entries' markers do not overlap",
            )
        selected[package.name] = package
    return [p for name, p in selected.items() if name != root]


def sort_sources(
    packages: Sequence[LockedPackage], target: TargetPlatform
) -> tuple[list[tuple[LockedPackage, WheelFile]], list[LockedPackage], list[LockedPackage]]:
    """Split the selection: a wheel for the target, else the sdist, else a local directory."""
    wheels: list[tuple[LockedPackage, WheelFile]] = []
    sdists: list[LockedPackage] = []
    local: list[LockedPackage] = []
    for pkg in packages:
        if pkg.wheels:
            try:
                wheels.append((pkg, target.choose_wheel(pkg.name, pkg.wheels)))
                continue
            except TargetError:
                if pkg.sdist is None:
                    raise
        if pkg.sdist is not None:
            sdists.append(pkg)
        else:
            local.append(pkg)
    return wheels, sdists, local

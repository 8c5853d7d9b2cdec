"""What a lock is made from, as ``[tool.imgbuild]`` records it: the project's requirements.

The requirements as written, by origin (dependencies, each extra, each group, the local
projects used, where direct sources point), requires-python, the indexes and the targets
(``LockInputs``). A build reads them to judge its lock (``--locked``) without rendering
one: this module needs no TOML writer (``lock.writer`` renders).
"""

from __future__ import annotations

from collections.abc import Sequence

from packaging.requirements import Requirement

from imagebuild.lock.model import LockInputs, sort_targets
from imagebuild.net.transfer import strip_credentials
from imagebuild.project.sources import uv_direct_sources
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.platform import TargetPlatform

MAIN = ""  # origin of project.dependencies
SOURCES = "sources"  # origin of [tool.uv.sources] git and archive entries (recorded only)


def environment_marker(target: TargetPlatform) -> str:
    """The PEP 751 ``environments`` marker for one target (libc is not expressible)."""
    major, minor = target.python_version
    return (
        f"sys_platform == 'linux' and platform_machine == '{target.arch}' "
        f"and python_version == '{major}.{minor}'"
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
        (origin, tuple(sorted(_recorded(r) for r in reqs)))
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
    direct = uv_direct_sources(project)
    if direct:
        # Where git and archive sources point is an input too (never their credentials).
        requirements.append((SOURCES, tuple(sorted(s.describe() for s in direct.values()))))
    return LockInputs(
        requires_python=str(project.requires_python) if project.requires_python else None,
        requirements=tuple(requirements),
        indexes=tuple(indexes),
        prereleases=prereleases,
        targets=sort_targets(targets),
    )


def _recorded(req: Requirement) -> str:
    """A requirement as a lock records it: a direct URL without its credentials."""
    if not req.url:
        return str(req)
    copy = Requirement(str(req))
    copy.url = strip_credentials(req.url)
    return str(copy)

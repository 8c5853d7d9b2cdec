"""uv's ``--locked`` for a workspace: the root's uv.lock against every member's inputs.

``uv sync --package NAME --locked`` refuses a lock that is stale anywhere in the
workspace, not only in NAME's part: the lock is the workspace's, written by one
``uv lock`` at its root. So every member is judged as uv judges a single project (its
entry, dependencies, extras and groups), with the members' joint ``requires-python``
and the root's ``[tool.uv]`` constraints and overrides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from packaging.specifiers import SpecifierSet

from imagebuild.lock.model import Lock
from imagebuild.lock.uvinputs import (
    local_difference,
    manifest_difference,
    package_difference,
    requires_python_difference,
    set_difference,
)
from imagebuild.project.spec import ProjectSpec
from imagebuild.project.workspace import Workspace


def is_workspace_lock(lock: Lock, workspace: Workspace, project: ProjectSpec) -> bool:
    """Whether ``lock`` is a workspace's (members besides the root, or ``project`` a member)."""
    return lock.kind == "uv" and (
        "members" in lock.manifest or project.name != lock.root or len(workspace.members) > 1
    )


def uv_workspace_difference(lock: Lock, workspace: Workspace) -> str | None:
    """The first input of the workspace that its uv.lock no longer records, or None."""
    members = workspace.members
    recorded = {r.name for r in lock.manifest.get("members", ())}
    if not recorded and lock.root is not None:
        recorded = {lock.root}  # uv lists members only when there are several
    diff = set_difference("workspace member", set(members), recorded) or (
        requires_python_difference(lock, joint_requires_python(members.values()))
    )
    if diff:
        return diff
    for name, member in sorted(members.items()):
        domain = lock.requires_python or member.requires_python
        diff = local_difference(lock, member) or package_difference(lock, member, domain)
        if diff:
            if name == lock.root:
                return diff
            where = os.path.relpath(member.root, workspace.root)
            return f"member '{name}' ({where}): {diff}"
    return manifest_difference(lock, workspace.tool_uv, lock.requires_python)


def joint_requires_python(members: Iterable[ProjectSpec]) -> SpecifierSet | None:
    """The Pythons every member allows (uv locks a workspace for their intersection)."""
    specs = [m.requires_python for m in members if m.requires_python is not None]
    if not specs:
        return None
    joint = SpecifierSet()
    for spec in specs:
        joint &= spec
    return joint

"""``imgbuild dockerfile``: the uv-style multi-stage Dockerfile equivalent to a project's image.

For teams that must build with ``docker build``: a builder stage ``FROM`` the same base
copies in uv (``--uv-image``, by default uv's own image at the version imgbuild ships) and
runs ``uv sync --locked --no-dev`` with bytecode compiled and copy link mode; the image
stage copies the environment onto the base and sets what ``imgbuild build`` sets: env,
labels, ports, workdir, user and entrypoint. The text comes from
``templates/uv.Dockerfile.j2``.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imagebuild import __version__
from imagebuild.cache import write_atomic
from imagebuild.errors import ProjectError
from imagebuild.image.name import ImageReference
from imagebuild.install.layers import VenvLayout
from imagebuild.lock.model import UV_LOCK
from imagebuild.pipeline.config import build_entrypoint, build_labels
from imagebuild.pipeline.locate import project_settings
from imagebuild.project.spec import load_project
from imagebuild.sinks.context import dockerfile_template
from imagebuild.target.base import find_entry, load_catalog
from imagebuild.target.choose import base_reference

TEMPLATE = "uv.Dockerfile.j2"
UV_IMAGE = "ghcr.io/astral-sh/uv"
"""uv's published image; its tag is the uv version imgbuild depends on."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DockerfileRequest:
    """What ``imgbuild dockerfile`` was asked for."""

    project_dir: Path
    """The project (with ``pyproject.toml`` and ``uv.lock``)."""
    base: str | None = None
    """``--base``: wins over the settings."""
    python: tuple[int, int] | None = None
    """``--python``: wins over the settings."""
    uv_image: str | None = None
    """The image uv is copied from; ``None`` means ``ghcr.io/astral-sh/uv:<version>``."""
    mirrors: Mapping[str, str] = field(default_factory=dict)
    """Registry host -> mirror host, applied to the base the Dockerfile names."""


def default_uv_image() -> str:
    """The image of uv at the version imgbuild itself runs."""
    try:
        return f"{UV_IMAGE}:{importlib.metadata.version('uv')}"
    except importlib.metadata.PackageNotFoundError:
        return f"{UV_IMAGE}:latest"


def render_uv_dockerfile(request: DockerfileRequest) -> str:
    """The Dockerfile text for ``request``'s project (``uv sync`` needs its ``uv.lock``)."""
    project = load_project(request.project_dir)
    if not (project.root / UV_LOCK).is_file():
        raise ProjectError(
            f"{project.root}: no uv.lock; the Dockerfile runs 'uv sync --locked', which reads it",
            hint="run 'uv lock' in the project first",
        )
    settings = project_settings(project, base=request.base, python=request.python)
    entry, reference = base_reference(settings, project)
    if entry is not None and entry.built:
        # A built base has no image to start FROM: uv's documented Dockerfile uses
        # python:3.X-slim, the pulled flavor with the same Python.
        entry = find_entry(load_catalog(), "debian-slim", entry.python_version)
        reference = entry.reference
    base = str(ImageReference.parse(reference).with_mirrors(request.mirrors))
    interpreter = entry.interpreter if entry is not None else PurePosixPath("python3")
    version = entry.python_version if entry is not None else settings.python or (3, 0)
    venv = VenvLayout(base_interpreter=interpreter, python_version=version)
    sync_args = [*(("--extra", e) for e in settings.extras)]
    sync_args += [("--group", g) for g in settings.groups]
    labels = sorted(build_labels(project, settings, reference).items())
    env = (("VIRTUAL_ENV", str(venv.root)), *settings.env)
    return _render(
        version=__version__,
        title=f"{project.name} {project.version or ''}".strip(),
        base=base,
        uv_image=request.uv_image or default_uv_image(),
        interpreter=str(interpreter),
        sync_args="".join(f", {json.dumps(flag)}, {json.dumps(v)}" for flag, v in sync_args),
        venv=str(venv.root),
        env=env,
        labels=labels,
        ports=[f"{port}/tcp" for port in settings.ports],
        workdir=settings.workdir,
        user=settings.user,
        entrypoint=build_entrypoint(settings, project, venv),
        cmd=settings.cmd or (),
    )


def _render(**values: object) -> str:
    pairs = [*values["env"], *values["labels"]]  # type: ignore[misc]
    return dockerfile_template(TEMPLATE, pairs).render(**values)


def write_dockerfile(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then renamed)."""
    write_atomic(path, text.encode("utf-8"))

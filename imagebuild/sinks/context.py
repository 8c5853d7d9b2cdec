"""A Docker build context for the image: a Dockerfile and one directory per layer.

For places that must build with ``docker build`` (a policy, a platform that only takes a
Dockerfile), as jib's ``exportDockerContext`` offers. The Dockerfile starts ``FROM`` the
base pinned by digest, then ``COPY``s each of imgbuild's layers from its own directory,
in order, so Docker's layer cache behaves like imgbuild's: a change to the project
rebuilds only the last ``COPY``. The image config (env, labels, ports, user, workdir,
entrypoint) follows. The Dockerfile comes from ``templates/Dockerfile.j2``.

The directory is written aside and renamed into place, so it is either the previous
context or the new one, never half of each. ``ContextSink`` is the ``context:DIR`` output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from imagebuild import __version__
from imagebuild.errors import ImageError
from imagebuild.image.model import ImageConfig, Layer
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.target.base import BUILT_REGISTRY

if TYPE_CHECKING:
    from imagebuild.report import Reporter
    from imagebuild.sinks.sink import Finished

TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[1] / "_data" / "templates",  # installed wheel
    Path(__file__).resolve().parents[2] / "templates",  # source checkout
)
MARKER = ".imgbuild-context"
"""File that marks a directory as a context imgbuild wrote (and may replace)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ContextLayer:
    """One of imgbuild's layers, as a directory of the context."""

    directory: str
    created_by: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ContextSink:
    """``--output context:DIR``: a Dockerfile ``FROM`` the base as pulled, and the layers."""

    path: Path
    """The context directory (absent, empty, or a context written before)."""
    kind: str = field(default="context", init=False)
    """The ``--output`` kind."""
    takes_index: bool = field(default=False, init=False)
    """A Dockerfile describes one platform's image."""

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        """Write the context for ``finished``'s first image, pinned to the base's digest."""
        pulled = finished.base_pulled
        if pulled.registry == BUILT_REGISTRY:
            raise ImageError(
                f"--output context:{self.path}: base {finished.base_upstream} is built by "
                "imgbuild, not pulled, so a Dockerfile cannot start FROM it",
                hint="use --output oci-archive:FILE, or a base from a registry (--base distroless)",
            )
        # Through a mirror, the Dockerfile names the upstream base beside the pulled one.
        mirrored = pulled.name != ImageReference.parse(finished.base_upstream).name
        write_docker_context(
            self.path,
            title=finished.title,
            base=f"{pulled.name}@{finished.base.manifest_digest}",
            upstream=finished.base_upstream if mirrored else None,
            layers=finished.layers,
            config=finished.config,
            store=finished.image.store,
        )
        return (f"wrote Docker build context {self.path}",)


def write_docker_context(
    dest: Path,
    *,
    title: str,
    base: str,
    upstream: str | None,
    layers: Sequence[Layer],
    config: ImageConfig,
    store: BlobStore,
) -> None:
    """Write the context for ``layers`` over ``base`` (``name@digest``) into ``dest``.

    ``dest`` must be absent, empty, or a context written before (it is replaced).
    """
    _check_destination(dest)
    entries = [
        ContextLayer(
            directory=f"layers/{n:02d}-{_slug(layer.created_by)}", created_by=layer.created_by
        )
        for n, layer in enumerate(layers, start=1)
    ]
    text = _render(
        title=title,
        base=base,
        upstream=upstream,
        layers=entries,
        config=config,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for entry, layer in zip(entries, layers, strict=True):
            _unpack(store.path(layer.digest), staging / entry.directory, layer)
        (staging / "Dockerfile").write_text(text, encoding="utf-8")
        (staging / MARKER).write_text(f"imgbuild {__version__}\n", encoding="utf-8")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_destination(dest: Path) -> None:
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ImageError(f"context destination {dest} exists and is not a directory")
    if any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise ImageError(
            f"context destination {dest} is not empty and not a context imgbuild wrote",
            hint="choose an empty or new directory",
        )


def _render(
    *,
    title: str,
    base: str,
    upstream: str | None,
    layers: Sequence[ContextLayer],
    config: ImageConfig,
) -> str:
    template = dockerfile_template("Dockerfile.j2", [*config.env, *config.labels])
    return template.render(
        version=__version__,
        title=title,
        base=base,
        upstream=upstream,
        layers=layers,
        env=config.env,
        labels=config.labels,
        ports=config.exposed_ports,
        workdir=config.workdir,
        user=config.user,
        entrypoint=config.entrypoint,
        cmd=config.cmd,
    )


def dockerfile_template(name: str, pairs: Sequence[tuple[str, str]]) -> jinja2.Template:
    """The Dockerfile template ``name`` of ``templates/``, its values checked for line breaks.

    ``pairs`` are the env and label names and values the Dockerfile will carry: a line
    break in one would end its instruction and start another.
    """
    for key, value in pairs:
        if "\n" in key or "\n" in value or "\r" in value:
            raise ImageError(
                f"{key!r}: a value with a line break cannot be written into a Dockerfile",
                hint="remove the line break from [tool.imgbuild] env/labels or the project's "
                "description",
            )
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in TEMPLATE_DIRS if d.is_dir()]),
        autoescape=False,  # a Dockerfile, not HTML: values are quoted by the dq filter
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["dq"] = _double_quoted
    environment.filters["tojson"] = lambda value: json.dumps(list(value), ensure_ascii=False)
    try:
        return environment.get_template(name)
    except jinja2.TemplateNotFound as exc:
        raise ImageError(f"the template {name} is missing", hint="reinstall imgbuild") from exc


def _double_quoted(value: str) -> str:
    """A Dockerfile double-quoted word: no variable expansion, backslashes kept."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _slug(created_by: str) -> str:
    """``imgbuild: dependency fastapi 0.115.0`` -> ``dependency-fastapi-0.115.0``."""
    text = created_by.removeprefix("imgbuild:").strip().lower()
    slug = re.sub(r"[^a-z0-9.]+", "-", text).strip("-.")
    return slug[:60].rstrip("-.") or "layer"


def _unpack(blob: Path, target: Path, layer: Layer) -> None:
    """Extract one of our own layer tars (gzip) into ``target``."""
    target.mkdir(parents=True)
    try:
        with tarfile.open(blob, "r:*") as tar:
            # Our layers hold absolute symlinks (bin/python -> the base's interpreter): the
            # "tar" filter keeps them and still refuses absolute or climbing member names.
            # (Filters came in 3.11.4; before, these layers of our own extract the same.)
            tar.extraction_filter = getattr(tarfile, "tar_filter", None)
            tar.extractall(target)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(
            f"layer {layer.digest} ({layer.created_by}) cannot be unpacked: {exc}",
            hint="clear the cache and rebuild",
        ) from exc

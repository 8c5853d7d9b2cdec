"""``imgbuild dockerfile``: the command, registered on the app by ``cli``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from imagebuild.errors import ImagebuildError


def dockerfile(
    path: Annotated[Path, typer.Argument(help="Project directory (with uv.lock).")] = Path("."),
    base: Annotated[str | None, typer.Option(help="Base: a catalog flavor or a reference.")] = None,
    python: Annotated[str | None, typer.Option(help="Python minor version, e.g. 3.11.")] = None,
    uv_image: Annotated[
        str | None,
        typer.Option(help="Image to copy /uv from (default ghcr.io/astral-sh/uv:<uv version>)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Print the multi-stage Dockerfile (uv sync in a builder stage) equivalent to the image."""
    from imagebuild.image.name import parse_mirrors
    from imagebuild.pipeline.dockerfile import (
        DockerfileRequest,
        render_uv_dockerfile,
        write_dockerfile,
    )
    from imagebuild.project.settings import parse_python_version

    try:
        request = DockerfileRequest(
            project_dir=path.resolve(),
            base=base,
            python=parse_python_version(python, "--python") if python else None,
            uv_image=uv_image,
            mirrors=parse_mirrors(os.environ.get("IMGBUILD_REGISTRY_MIRRORS", "")),
        )
        text = render_uv_dockerfile(request)
        if output is not None:
            write_dockerfile(output, text)
    except ImagebuildError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if output is None:
        typer.echo(text, nl=False)
    else:
        typer.echo(f"wrote {output}", err=True)

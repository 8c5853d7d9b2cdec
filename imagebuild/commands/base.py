"""``imgbuild base``: bases imgbuild builds from Debian packages, on their own.

``imgbuild base build debian --python 3.11 --push -t REF`` assembles the base a project
build would use, with no project: to push it to a registry other tools pull from, to load
it into an engine (``-o docker``), or to keep it as a file (``-o oci-archive:FILE``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from imagebuild.commands import options as opt
from imagebuild.commands.wiring import cache_dir as resolve_cache_dir
from imagebuild.commands.wiring import (
    engine,
    fail,
    interrupted,
    output_values,
    platforms,
    ports,
    registry,
    using_cache,
)
from imagebuild.errors import ImagebuildError
from imagebuild.project.settings import parse_python_version

base_app = typer.Typer(
    help="Bases built from Debian packages (no registry, locked like dependencies).",
    no_args_is_help=True,
)

SystemPackage = Annotated[
    list[str] | None,
    typer.Option("--system-package", help="A Debian package to add in its own layer (repeatable)."),
]
Mirror = Annotated[
    str | None, typer.Option("--debian-mirror", help="Debian archive root (e.g. a snapshot).")
]
SecurityMirror = Annotated[
    str | None, typer.Option("--debian-security-mirror", help="Debian security archive root.")
]


@base_app.command("build")
def build_base(
    flavor: Annotated[
        str, typer.Argument(help="debian, debian-shell, or a base definition file (.toml).")
    ] = "debian",
    python: opt.Python = None,
    platform: opt.Platform = None,
    system_package: SystemPackage = None,
    tag: opt.Tag = None,
    output: opt.Output = None,
    push: opt.Push = False,
    cache_dir: opt.BuildCacheDir = None,
    mirror: Mirror = None,
    security_mirror: SecurityMirror = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Build a base from Debian packages and load, write or push it."""
    from imagebuild.commands.console import Verbosity, open_reporter
    from imagebuild.net.http import http_client
    from imagebuild.pipeline.basebuild import BaseBuildRequest, run_base_build
    from imagebuild.pipeline.outputs import make_sinks, parse_outputs

    try:
        request = BaseBuildRequest(
            flavor=flavor,
            python=parse_python_version(python, "--python") if python else None,
            platforms=platforms(platform),
            system_packages=tuple(sorted(set(system_package or ()))),
            tags=tuple(tag or ()),
            cache_dir=resolve_cache_dir(cache_dir),
            mirror=mirror,
            security_mirror=security_mirror,
        )
        with (
            using_cache(request.cache_dir),
            http_client() as http,
            open_reporter(Verbosity(quiet=quiet, verbose=verbose)) as rep,
        ):
            client = registry(http)
            sinks = make_sinks(
                parse_outputs(output_values(output, push=push)), registry=client, engine=engine
            )
            result = run_base_build(request, ports=ports(http, client, rep), sinks=sinks)
    except ImagebuildError as exc:
        fail(exc, verbose)
        return
    except KeyboardInterrupt as exc:
        interrupted(exc)
        return
    for line in result.summary_lines():
        typer.echo(line)

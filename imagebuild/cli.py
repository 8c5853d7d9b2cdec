"""The ``imgbuild`` command line: options become a request, sinks and ports; errors one line.

This is the only module that reads environment variables, prints, or picks exit codes, and
the one that builds the real ports (HTTP client, index, registry, engine) the pipeline uses.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core
import typer.main

from imagebuild import __version__
from imagebuild.commands import options as opt
from imagebuild.commands.base import base_app
from imagebuild.commands.cache import cache_app
from imagebuild.commands.dockerfile import dockerfile as _dockerfile_command
from imagebuild.commands.server import server_app
from imagebuild.commands.wiring import (
    cache_dir as _cache_dir,
)
from imagebuild.commands.wiring import (
    engine as _engine,
)
from imagebuild.commands.wiring import (
    fail as _fail,
)
from imagebuild.commands.wiring import (
    interrupted as _interrupted,
)
from imagebuild.commands.wiring import (
    mirrors as _mirrors,
)
from imagebuild.commands.wiring import (
    output_values as _outputs,
)
from imagebuild.commands.wiring import (
    platforms as _platforms,
)
from imagebuild.commands.wiring import (
    ports as _ports,
)
from imagebuild.commands.wiring import (
    registry as _registry,
)
from imagebuild.commands.wiring import (
    using_cache as _using_cache,
)
from imagebuild.errors import ImagebuildError, ProjectError
from imagebuild.project.settings import parse_python_version

if TYPE_CHECKING:
    from imagebuild.pipeline.requests import CompileWith

_COMPILE_WITH: dict[str, CompileWith] = {"auto": "auto", "host": "host", "image": "image"}

app = typer.Typer(
    name="imgbuild",
    help="Build reproducible container images for Python projects from their lockfiles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise ProjectError(
            f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds",
            hint="set it to an integer, e.g. $(git log -1 --format=%ct)",
        )
    return int(value)


@app.command()
def build(
    path: opt.ProjectPath = Path("."),
    tag: opt.Tag = None,
    output: opt.Output = None,
    push: opt.Push = False,
    base: opt.Base = None,
    python: opt.Python = None,
    locked: opt.Locked = False,
    frozen: opt.Frozen = False,
    group: opt.Group = None,
    extra: opt.Extra = None,
    package: opt.Package = None,
    no_compile: opt.NoCompile = False,
    compile_with: opt.CompileWith = "auto",
    platform: opt.Platform = None,
    expect_digest: opt.ExpectDigest = None,
    cache_dir: opt.BuildCacheDir = None,
    index_url: opt.IndexUrl = None,
    extra_index_url: opt.ExtraIndexUrl = None,
    cache_from: opt.CacheFrom = None,
    cache_to: opt.CacheTo = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Build an image from a project and its lock (uv.lock or pylock.toml)."""
    from imagebuild.commands.console import Verbosity, open_reporter, summary_line
    from imagebuild.commands.signals import sigterm_as_interrupt
    from imagebuild.net.http import http_client
    from imagebuild.pipeline.build import run_build
    from imagebuild.pipeline.outputs import make_sinks, parse_outputs
    from imagebuild.pipeline.requests import BuildRequest

    started = time.monotonic()
    try:
        _check_build_options(compile_with, locked=locked, frozen=frozen, digest=expect_digest)
        outputs = parse_outputs(_outputs(output, push=push))
        request = BuildRequest(
            project_dir=path.resolve(),
            tags=tuple(tag or ()),
            base=base,
            python=parse_python_version(python, "--python") if python else None,
            lock_mode="locked" if locked else "frozen" if frozen else "check-if-present",
            groups=tuple(group or ()),
            extras=tuple(extra or ()),
            package=package,
            compile_bytecode=not no_compile,
            compile_with=_COMPILE_WITH[compile_with],
            platforms=_platforms(platform),
            cache_dir=_cache_dir(cache_dir),
            source_date_epoch=_source_date_epoch(),
            mirrors=_mirrors(),
            expect_digest=expect_digest,
            index_urls=_indexes(index_url, extra_index_url),
            cache_from=cache_from,
            cache_to=cache_to,
            default_output=not output and not push,
        )
        with (
            sigterm_as_interrupt(),
            _using_cache(request.cache_dir),
            http_client() as http,
            open_reporter(Verbosity(quiet=quiet, verbose=verbose)) as rep,
        ):
            registry = _registry(http)
            sinks = make_sinks(outputs, registry=registry, engine=_engine)
            result = run_build(request, ports=_ports(http, registry, rep), sinks=sinks)
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    except KeyboardInterrupt as exc:
        _interrupted(exc)
        return
    for line in result.summary_lines():
        typer.echo(line)
    if not quiet:
        seconds = time.monotonic() - started
        typer.echo(summary_line(result, seconds), err=True)


def _check_build_options(
    compile_with: str, *, locked: bool, frozen: bool, digest: str | None
) -> None:
    """Options that are wrong on their own, refused before anything is read."""
    if compile_with not in _COMPILE_WITH:
        raise ProjectError(
            f"--compile-with {compile_with!r}: unknown choice", hint="use auto, host or image"
        )
    if locked and frozen:
        raise ProjectError("--locked and --frozen cannot be used together")
    if digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ProjectError(
            f"--expect-digest {digest!r}: not a sha256 digest",
            hint="give it as sha256:<64 hex digits>, as imgbuild prints it",
        )


def _indexes(index_url: str | None, extra_index_url: list[str] | None) -> tuple[str, ...]:
    """``--index-url`` and ``--extra-index-url`` (primary first), as lock and build take them."""
    if index_url or extra_index_url:
        return (index_url or "https://pypi.org/simple/", *(extra_index_url or ()))
    return ()


@app.command()
def lock(
    path: opt.ProjectPath = Path("."),
    check: opt.Check = False,
    upgrade: opt.Upgrade = False,
    upgrade_package: opt.UpgradePackage = None,
    index_url: opt.IndexUrl = None,
    extra_index_url: opt.ExtraIndexUrl = None,
    package: opt.LockPackage = None,
    base: opt.LockBase = None,
    python: opt.LockPython = None,
    cache_dir: opt.LockCacheDir = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Resolve the project for its image targets and write pylock.toml (PEP 751)."""
    from imagebuild.commands.console import Verbosity, open_reporter
    from imagebuild.net.http import http_client
    from imagebuild.pipeline.lock import run_lock
    from imagebuild.pipeline.requests import LockRequest

    indexes = _indexes(index_url, extra_index_url)
    try:
        request = LockRequest(
            project_dir=path.resolve(),
            cache_dir=_cache_dir(cache_dir),
            check=check,
            upgrade=upgrade,
            upgrade_packages=tuple(upgrade_package or ()),
            index_urls=indexes,
            package=package,
            base=base,
            python=parse_python_version(python, "--python") if python else None,
            mirrors=_mirrors(),
        )
        with (
            _using_cache(request.cache_dir),
            http_client() as http,
            open_reporter(Verbosity(quiet=quiet, verbose=verbose)) as rep,
        ):
            result = run_lock(request, ports=_ports(http, _registry(http), rep))
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    if check:
        typer.echo(f"{result.path.name} is up to date")
        return
    for line in result.summary_lines():
        typer.echo(line)


@app.command()
def bases() -> None:
    """List the base images imgbuild knows."""
    from imagebuild.target.base import load_catalog

    catalog = load_catalog()
    width = max(len(entry.flavor) for entry in catalog)
    for entry in catalog:
        version = ".".join(map(str, entry.python_version))
        shell = "shell" if entry.shell else "no shell"
        libc = f"{entry.libc} {'.'.join(map(str, entry.libc_version))}"
        source = f"built from Debian {entry.recipe.suite}" if entry.recipe else entry.reference
        typer.echo(
            f"{entry.flavor:<{width}} {version:<5} {source:<42} {str(entry.interpreter):<26} "
            f"{libc}, {shell}"
        )


@app.command()
def version() -> None:
    """Print imgbuild's version."""
    typer.echo(__version__)


_Image = Annotated[
    str, typer.Argument(help="An image reference, oci:DIR or oci-archive:FILE.", show_default=False)
]
_InspectPlatform = Annotated[
    str, typer.Option("--platform", help="The image to show from an index (os/arch).")
]


@app.command()
def inspect(
    image: _Image, platform: _InspectPlatform = "linux/amd64", verbose: opt.Verbose = False
) -> None:
    """Print an existing image's layers: digest, size in bytes, and what made each."""
    from imagebuild.commands.inspect import read_listing
    from imagebuild.image.listing import layer_table
    from imagebuild.net.http import http_client

    try:
        with http_client() as http:
            listing = read_listing(image, platform, _registry(http))
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    for line in layer_table(listing):
        typer.echo(line)


@app.command()
def init(path: opt.ProjectPath = Path("."), verbose: opt.Verbose = False) -> None:
    """Add a commented tool.imgbuild table to pyproject.toml (the rest stays as it is)."""
    from imagebuild.commands.init import init_settings

    try:
        written = init_settings(path)
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    typer.echo(f"added a [tool.imgbuild] table to {written}")


@app.command()
def verify(
    image: Annotated[str, typer.Argument(help="The published image: a reference or oci:DIR.")],
    path: opt.ProjectPath = Path("."),
    platform: Annotated[str, typer.Option(help="A single image's os/arch.")] = "linux/amd64",
    cache_dir: opt.BuildCacheDir = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Rebuild the project from its lock and check it is the published image (exit 0 if so)."""
    from imagebuild.commands.console import Verbosity, open_reporter
    from imagebuild.net.http import http_client
    from imagebuild.pipeline.requests import BuildRequest
    from imagebuild.pipeline.verify import run_verify

    given = bool(os.environ.get("SOURCE_DATE_EPOCH", "").strip())
    try:
        request = BuildRequest(  # the lock as it is (frozen): that is what was published
            project_dir=path.resolve(),
            lock_mode="frozen",
            platforms=_platforms([platform]),
            cache_dir=_cache_dir(cache_dir),
            source_date_epoch=_source_date_epoch(),
            mirrors=_mirrors(),
        )
        with (
            _using_cache(request.cache_dir),
            http_client() as http,
            open_reporter(Verbosity(quiet=quiet, verbose=verbose)) as rep,
        ):
            ports = _ports(http, _registry(http), rep)
            result = run_verify(image, request, ports=ports, epoch_given=given)
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    typer.echo("\n".join(result.report_lines(image)))
    if not result.identical:
        raise typer.Exit(1)


app.command(name="dockerfile")(_dockerfile_command)
app.add_typer(base_app, name="base")
app.add_typer(server_app, name="server")
app.add_typer(cache_app, name="cache")


@app.command()
def plan(
    path: opt.ProjectPath = Path("."),
    base: opt.Base = None,
    python: opt.Python = None,
    platform: Annotated[str, typer.Option(help="The platform to plan (os/arch).")] = "linux/amd64",
    group: opt.Group = None,
    extra: opt.Extra = None,
    package: opt.Package = None,
    no_compile: opt.NoCompile = False,
    cache_dir: opt.BuildCacheDir = None,
    output_format: Annotated[
        str, typer.Option("--format", help="table (for people) or json.")
    ] = "table",
    verbose: opt.Verbose = False,
) -> None:
    """Show the layers a build would make: packages, sizes, and which the cache holds."""
    from imagebuild.commands.console import Verbosity, open_reporter
    from imagebuild.net.http import http_client
    from imagebuild.pipeline.planning import run_plan
    from imagebuild.pipeline.requests import BuildRequest

    try:
        if output_format not in ("table", "json"):
            raise ProjectError(f"--format {output_format!r}: unknown", hint="use table or json")
        request = BuildRequest(
            project_dir=path.resolve(),
            base=base,
            python=parse_python_version(python, "--python") if python else None,
            groups=tuple(group or ()),
            extras=tuple(extra or ()),
            package=package,
            compile_bytecode=not no_compile,
            platforms=_platforms([platform]),
            cache_dir=_cache_dir(cache_dir),
            source_date_epoch=_source_date_epoch(),
            mirrors=_mirrors(),
        )
        with (
            _using_cache(request.cache_dir),
            http_client() as http,
            open_reporter(Verbosity(quiet=True, verbose=verbose)) as rep,
        ):
            result = run_plan(request, ports=_ports(http, _registry(http), rep))
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    typer.echo(result.to_json() if output_format == "json" else "\n".join(result.table_lines()))


def main() -> None:
    """The ``imgbuild`` command: run it, then leave without tearing the interpreter down.

    Once the command is done, its output flushed and the ``atexit`` handlers run
    (multiprocessing's and tempfile's clean-ups), tearing down a build's modules and objects one
    by one only cost each run about 60 ms (a tenth of a warm build); the layer workers' fork
    server ends by itself once this process is gone. The teardown is skipped only when the main
    thread is the only one left; while any other runs, the interpreter exits as usual and waits
    for it.
    """
    status = run_command()
    if threading.active_count() > 1:
        raise SystemExit(status)
    atexit._run_exitfuncs()
    os._exit(status)


@functools.cache
def click_command() -> typer.core.TyperGroup:
    """``app`` as the click command typer makes of it, made once per process.

    Calling ``app`` makes it again each time (6 ms, from every command's signature): the
    resident server makes it before it forks, so a build it serves takes it made.
    """
    command = typer.main.get_command(app)
    assert isinstance(command, typer.core.TyperGroup)
    return command


def run_command() -> int:
    """Run the command ``sys.argv`` names; its exit status, its output flushed."""
    try:
        click_command()()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    status = exit_status(code)
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def exit_status(code: object) -> int:
    """The process status ``SystemExit(code)`` stands for (a message is printed: status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1

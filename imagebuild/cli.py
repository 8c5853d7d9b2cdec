"""The ``imgbuild`` command line: options become a BuildRequest; errors become one line.

This is the only module that reads environment variables, prints, or picks exit codes.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated

import httpx
import typer

from imagebuild import __version__
from imagebuild.errors import ImagebuildError, ProjectError
from imagebuild.project.settings import parse_python_version

app = typer.Typer(
    name="imgbuild",
    help="Build reproducible container images for Python projects from their lockfiles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class ConsoleReporter:
    """Progress on stderr, one line per step; quiet hides steps but never warnings."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def step(self, message: str) -> None:
        """Print a progress line."""
        if not self.quiet:
            typer.echo(f"· {message}", err=True)

    def warn(self, message: str) -> None:
        """Print a warning line."""
        typer.echo(f"warning: {message}", err=True)


def _fail(exc: ImagebuildError, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    # One line: what, where, and (after "; ") how to fix it.
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def _cache_dir(option: Path | None) -> Path:
    import platformdirs

    if option is not None:
        return option
    env = os.environ.get("IMGBUILD_CACHE_DIR")
    # The same place fetch.default_cache_dir names (not imported: `lock` needs none of fetch).
    return Path(env) if env else Path(platformdirs.user_cache_dir("imgbuild", appauthor=False))


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


def http_client() -> httpx.Client:
    """The one HTTP client for a run; honours SSL_CERT_FILE and proxies (trust_env)."""
    return httpx.Client(
        timeout=httpx.Timeout(60.0, connect=15.0),
        follow_redirects=True,
        headers={"User-Agent": f"imgbuild/{__version__}"},
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
    )


@app.command()
def build(
    path: Annotated[Path, typer.Argument(help="Project directory (with pyproject.toml).")] = Path(
        "."
    ),
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", "-t", help="Image reference to tag (repeatable)."),
    ] = None,
    output: Annotated[
        list[str] | None,
        typer.Option(
            "--output",
            "-o",
            help="docker (load into the engine; default), oci:DIR, oci-archive:FILE, "
            "registry (push every --tag), or context:DIR (a Dockerfile and the layers, for "
            "`docker build`). Repeatable.",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="Base: distroless, debian-slim, alpine, or an image reference."),
    ] = None,
    python: Annotated[str | None, typer.Option(help="Python minor version, e.g. 3.11.")] = None,
    locked: Annotated[
        bool, typer.Option("--locked", help="Fail if the lock does not match pyproject.toml.")
    ] = False,
    frozen: Annotated[
        bool, typer.Option("--frozen", help="Use the lock as it is, without checking it.")
    ] = False,
    group: Annotated[
        list[str] | None, typer.Option("--group", help="Also install this dependency group.")
    ] = None,
    extra: Annotated[
        list[str] | None, typer.Option("--extra", help="Install this extra of the project.")
    ] = None,
    package: Annotated[
        str | None,
        typer.Option(help="Build this uv workspace member (PATH is the workspace root)."),
    ] = None,
    no_compile: Annotated[
        bool, typer.Option("--no-compile", help="Do not compile bytecode.")
    ] = False,
    compile_with: Annotated[
        str,
        typer.Option(
            help="Which interpreter compiles bytecode: auto (the base image's own, run "
            "through Docker; without an engine, a host python3.X of the target's minor "
            "version, with a warning), host or image."
        ),
    ] = "auto",
    platform: Annotated[
        list[str] | None,
        typer.Option(
            "--platform",
            help="Target platform, e.g. linux/arm64 (default linux/amd64). Repeat it, or list "
            "several with commas, for an image index (with --output registry, oci:DIR or "
            "oci-archive:FILE).",
        ),
    ] = None,
    expect_digest: Annotated[
        str | None,
        typer.Option(
            "--expect-digest",
            help="Fail, before any output, unless the image (or index) has this digest: "
            "a check that a published image is rebuilt exactly.",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache directory (default: IMGBUILD_CACHE_DIR or the user cache)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors.")] = False,
) -> None:
    """Build an image from a project and its lock (uv.lock or pylock.toml)."""
    from imagebuild.image.name import parse_mirrors
    from imagebuild.pipeline.build import BuildRequest, parse_outputs, run_build

    reporter = ConsoleReporter(quiet=quiet)
    try:
        if compile_with not in ("auto", "host", "image"):
            raise ProjectError(
                f"--compile-with {compile_with!r}: unknown choice", hint="use auto, host or image"
            )
        if locked and frozen:
            raise ProjectError("--locked and --frozen cannot be used together")
        if expect_digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", expect_digest):
            raise ProjectError(
                f"--expect-digest {expect_digest!r}: not a sha256 digest",
                hint="give it as sha256:<64 hex digits>, as imgbuild prints it",
            )
        request = BuildRequest(
            project_dir=path.resolve(),
            tags=tuple(tag or ()),
            outputs=parse_outputs(output or ["docker"]),
            base=base,
            python=parse_python_version(python, "--python") if python else None,
            lock_mode="locked" if locked else "frozen" if frozen else "check-if-present",
            groups=tuple(group or ()),
            extras=tuple(extra or ()),
            package=package,
            compile_bytecode=not no_compile,
            compile_with=compile_with,
            # Repeated or comma-separated, as docker buildx and ko take them.
            platforms=tuple(p for value in platform for p in value.split(",") if p)
            if platform
            else ("linux/amd64",),
            cache_dir=_cache_dir(cache_dir),
            source_date_epoch=_source_date_epoch(),
            mirrors=parse_mirrors(os.environ.get("IMGBUILD_REGISTRY_MIRRORS", "")),
            docker_config=_docker_config_path(),
            expect_digest=expect_digest,
        )
        with http_client() as http:
            result = run_build(request, http=http, reporter=reporter)
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    for line in result.summary_lines():
        typer.echo(line)


@app.command()
def lock(
    path: Annotated[Path, typer.Argument(help="Project directory (with pyproject.toml).")] = Path(
        "."
    ),
    check: Annotated[
        bool,
        typer.Option("--check", help="Exit 1 if pylock.toml is out of date; write nothing."),
    ] = False,
    upgrade: Annotated[
        bool, typer.Option("--upgrade", "-U", help="Ignore the locked versions.")
    ] = False,
    upgrade_package: Annotated[
        list[str] | None,
        typer.Option("--upgrade-package", "-P", help="Ignore the locked version of NAME."),
    ] = None,
    index_url: Annotated[
        str | None, typer.Option(help="Primary index (Simple API base URL).")
    ] = None,
    extra_index_url: Annotated[
        list[str] | None, typer.Option(help="Further index, consulted after the primary.")
    ] = None,
    package: Annotated[
        str | None,
        typer.Option(help="Lock this workspace member into pylock.NAME.toml at PATH."),
    ] = None,
    base: Annotated[str | None, typer.Option(help="Base the lock is for.")] = None,
    python: Annotated[str | None, typer.Option(help="Python minor version.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors.")] = False,
) -> None:
    """Resolve the project for its image targets and write pylock.toml (PEP 751)."""
    from imagebuild.image.name import parse_mirrors
    from imagebuild.pipeline.build import LockRequest, run_lock

    reporter = ConsoleReporter(quiet=quiet)
    indexes: tuple[str, ...] = ()
    if index_url or extra_index_url:
        indexes = (index_url or "https://pypi.org/simple/", *(extra_index_url or ()))
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
            mirrors=parse_mirrors(os.environ.get("IMGBUILD_REGISTRY_MIRRORS", "")),
            docker_config=_docker_config_path(),
        )
        with http_client() as http:
            result = run_lock(request, http=http, reporter=reporter)
    except ImagebuildError as exc:
        _fail(exc, verbose)
        return
    if check:
        typer.echo(f"{result.path.name} is up to date")
        return
    for line in result.summary_lines():
        typer.echo(line)


def _docker_config_path() -> Path:
    root = os.environ.get("DOCKER_CONFIG")
    return Path(root) / "config.json" if root else Path.home() / ".docker" / "config.json"


@app.command()
def bases() -> None:
    """List the base images imgbuild knows."""
    from imagebuild.target.base import load_catalog

    for entry in load_catalog():
        version = ".".join(map(str, entry.python_version))
        shell = "shell" if entry.shell else "no shell"
        libc = f"{entry.libc} {'.'.join(map(str, entry.libc_version))}"
        typer.echo(
            f"{entry.flavor:<12} {version:<5} {entry.reference:<45} {entry.interpreter}  "
            f"{libc}, {shell}"
        )


@app.command()
def version() -> None:
    """Print imgbuild's version."""
    typer.echo(__version__)

"""The command line's options, as typer declares them (shared ones once).

Kept apart from ``cli.py`` so that the commands read as what they do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ProjectPath = Annotated[Path, typer.Argument(help="Project directory (with pyproject.toml).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings.")]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Every step on a line, tracebacks on errors.")
]
Tag = Annotated[
    list[str] | None, typer.Option("--tag", "-t", help="Image reference to tag (repeatable).")
]
Output = Annotated[
    list[str] | None,
    typer.Option(
        "--output",
        "-o",
        help="docker (load into the engine; default), oci:DIR, oci-archive:FILE, "
        "registry (push every --tag), or context:DIR (a Dockerfile and the layers, for "
        "`docker build`). Repeatable.",
    ),
]
Push = Annotated[
    bool, typer.Option("--push", help="Push every --tag: short for --output registry.")
]
Base = Annotated[
    str | None,
    typer.Option(
        help="Base: debian (built from Debian packages; the default), debian-shell, "
        "distroless, debian-slim, alpine, an image reference, or a base definition (.toml)."
    ),
]
Python = Annotated[str | None, typer.Option(help="Python minor version, e.g. 3.11.")]
Locked = Annotated[
    bool, typer.Option("--locked", help="Fail if the lock does not match pyproject.toml.")
]
Frozen = Annotated[
    bool, typer.Option("--frozen", help="Use the lock as it is, without checking it.")
]
Group = Annotated[
    list[str] | None, typer.Option("--group", help="Also install this dependency group.")
]
Extra = Annotated[
    list[str] | None, typer.Option("--extra", help="Install this extra of the project.")
]
Package = Annotated[
    str | None, typer.Option(help="Build this uv workspace member (PATH is the workspace root).")
]
NoCompile = Annotated[bool, typer.Option("--no-compile", help="Do not compile bytecode.")]
CompileWith = Annotated[
    str,
    typer.Option(
        help="Which interpreter compiles bytecode: auto (the base image's own, run "
        "through Docker; without an engine, a host python3.X of the target's minor "
        "version, with a warning), host or image."
    ),
]
Platform = Annotated[
    list[str] | None,
    typer.Option(
        "--platform",
        help="Target platform, e.g. linux/arm64 (default linux/amd64). Repeat it, or list "
        "several with commas, for an image index (with --output registry, oci:DIR or "
        "oci-archive:FILE).",
    ),
]
ExpectDigest = Annotated[
    str | None,
    typer.Option(
        "--expect-digest",
        help="Fail, before any output, unless the image (or index) has this digest: "
        "a check that a published image is rebuilt exactly.",
    ),
]
BuildCacheDir = Annotated[
    Path | None,
    typer.Option(help="Cache directory (default: IMGBUILD_CACHE_DIR or the user cache)."),
]
Check = Annotated[
    bool, typer.Option("--check", help="Exit 1 if pylock.toml is out of date; write nothing.")
]
Upgrade = Annotated[bool, typer.Option("--upgrade", "-U", help="Ignore the locked versions.")]
UpgradePackage = Annotated[
    list[str] | None,
    typer.Option("--upgrade-package", "-P", help="Ignore the locked version of NAME."),
]
IndexUrl = Annotated[str | None, typer.Option(help="Primary index (Simple API base URL).")]
ExtraIndexUrl = Annotated[
    list[str] | None, typer.Option(help="Further index, consulted after the primary.")
]
LockPackage = Annotated[
    str | None, typer.Option(help="Lock this workspace member into pylock.NAME.toml at PATH.")
]
LockBase = Annotated[str | None, typer.Option(help="Base the lock is for.")]
LockPython = Annotated[str | None, typer.Option(help="Python minor version.")]
LockCacheDir = Annotated[Path | None, typer.Option(help="Cache directory.")]

CacheFrom = Annotated[
    str | None,
    typer.Option(
        "--cache-from",
        help="A registry repository to take already built layers from, by their cache key "
        "(CI's shared cache; default: cache-from in tool.imgbuild).",
    ),
]
CacheTo = Annotated[
    str | None,
    typer.Option(
        "--cache-to",
        help="A registry repository to keep the built layers in, by their cache key "
        "(default: cache-to in tool.imgbuild).",
    ),
]

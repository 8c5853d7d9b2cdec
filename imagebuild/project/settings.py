"""Image settings: ``[tool.imgbuild]`` in pyproject.toml, then command-line overrides.

Recognised keys (all optional)::

    [tool.imgbuild]
    base = "distroless"            # catalog flavor (distroless, debian-slim, alpine) or a reference
    python = "3.11"                # Python minor version of the base (catalog flavors only)
    entrypoint = ["hello-api"]     # a console script name or a path, plus arguments
    cmd = ["--port", "8000"]
    user = "65532"                 # "root" or "0" to run as root
    workdir = "/app"
    env = { LOG_LEVEL = "info" }
    labels = { "org.example.team" = "data" }
    ports = [8000]
    groups = ["prod"]              # dependency groups to install (dev groups are left out)
    extras = ["postgres"]
    index-url = "https://pypi.org/simple/"        # for imgbuild lock (else [[tool.uv.index]])
    extra-index-urls = []
    platforms = ["linux/amd64", "linux/arm64"]   # what imgbuild lock covers
    prereleases = false
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from imagebuild.errors import ProjectError

DEFAULT_USER = "65532"
_VERSION_RE = re.compile(r"^3\.(\d+)$")


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageSettings:
    """Everything about the image that is not in the lock."""

    base: str = "distroless"
    """Catalog flavor or image reference."""
    python: tuple[int, int] | None = None
    """Requested Python minor version; None picks from the catalog and requires-python."""
    entrypoint: tuple[str, ...] | None = None
    """Entrypoint; None derives it from ``[project.scripts]``."""
    cmd: tuple[str, ...] | None = None
    """Default arguments."""
    user: str = DEFAULT_USER
    """User the container runs as."""
    workdir: str = "/app"
    """Working directory."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment, sorted by name."""
    labels: tuple[tuple[str, str], ...] = ()
    """Extra labels, sorted by key (override the ones derived from pyproject)."""
    ports: tuple[int, ...] = ()
    """Exposed TCP ports."""
    groups: tuple[str, ...] = ()
    """Dependency groups to install."""
    extras: tuple[str, ...] = ()
    """Extras of the project to install."""
    index_url: str | None = None
    """Primary index for locking; None falls back to [[tool.uv.index]], then PyPI."""
    extra_index_urls: tuple[str, ...] = ()
    """Further indexes, consulted in order after the primary (first index wins)."""
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64")
    """OCI platforms a lock covers."""
    prereleases: bool = False
    """Allow pre-releases everywhere when locking."""
    source: str = field(default="pyproject.toml", compare=False)
    """Where settings came from, for messages."""


def parse_python_version(text: str, where: str) -> tuple[int, int]:
    """``"3.11"`` -> ``(3, 11)``; anything else is a ProjectError naming ``where``."""
    match = _VERSION_RE.match(text.strip())
    if not match:
        raise ProjectError(f"{where}: Python version {text!r} must look like '3.11'")
    return (3, int(match[1]))


def parse_settings(table: Mapping[str, Any], *, source: str = "pyproject.toml") -> ImageSettings:
    """Validate a ``[tool.imgbuild]`` table."""
    prefix = f"{source}: tool.imgbuild"
    known = {
        "base",
        "python",
        "entrypoint",
        "cmd",
        "user",
        "workdir",
        "env",
        "labels",
        "ports",
        "groups",
        "extras",
        "index-url",
        "extra-index-urls",
        "platforms",
        "prereleases",
    }
    unknown = sorted(set(table) - known)
    if unknown:
        raise ProjectError(
            f"{prefix}.{unknown[0]}: unknown setting",
            hint=f"known settings: {', '.join(sorted(known))}",
        )

    def string(key: str) -> str | None:
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise ProjectError(f"{prefix}.{key}: expected a string, got {value!r}")
        return value

    def strings(key: str) -> tuple[str, ...] | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProjectError(f"{prefix}.{key}: expected a list of strings, got {value!r}")
        return tuple(value)

    def mapping(key: str) -> tuple[tuple[str, str], ...]:
        value = table.get(key, {})
        if not isinstance(value, Mapping):
            raise ProjectError(f"{prefix}.{key}: expected a table, got {value!r}")
        pairs = []
        for name, item in value.items():
            if not isinstance(item, str | int | float | bool):
                raise ProjectError(f"{prefix}.{key}.{name}: expected a string, got {item!r}")
            pairs.append((str(name), str(item)))
        return tuple(sorted(pairs))

    ports = table.get("ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
        raise ProjectError(f"{prefix}.ports: expected a list of port numbers, got {ports!r}")
    python = string("python")
    user = table.get("user", DEFAULT_USER)
    if not isinstance(user, str | int):
        raise ProjectError(f"{prefix}.user: expected a user name or uid, got {user!r}")
    platforms = strings("platforms") or ("linux/amd64", "linux/arm64")
    for platform in platforms:
        if platform not in ("linux/amd64", "linux/arm64"):
            raise ProjectError(
                f"{prefix}.platforms: unsupported platform {platform!r}",
                hint="use linux/amd64 and/or linux/arm64",
            )
    prereleases = table.get("prereleases", False)
    if not isinstance(prereleases, bool):
        raise ProjectError(f"{prefix}.prereleases: expected true or false, got {prereleases!r}")
    return ImageSettings(
        index_url=string("index-url"),
        extra_index_urls=strings("extra-index-urls") or (),
        platforms=tuple(platforms),
        prereleases=prereleases,
        base=string("base") or "distroless",
        python=parse_python_version(python, f"{prefix}.python") if python else None,
        entrypoint=strings("entrypoint"),
        cmd=strings("cmd"),
        user=str(user),
        workdir=string("workdir") or "/app",
        env=mapping("env"),
        labels=mapping("labels"),
        ports=tuple(sorted(set(ports))),
        groups=tuple(sorted(set(strings("groups") or ()))),
        extras=tuple(sorted(set(strings("extras") or ()))),
        source=source,
    )


def with_overrides(settings: ImageSettings, **overrides: Any) -> ImageSettings:
    """Apply command-line values that were given (None means 'not given')."""
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    return replace(settings, **given)

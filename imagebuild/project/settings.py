"""Image settings: ``[tool.imgbuild]`` in pyproject.toml, then command-line overrides.

Recognised keys (all optional)::

    [tool.imgbuild]
    base = "debian"                # built from Debian packages (debian, debian-shell), a pulled
                                   # flavor (distroless, debian-slim, alpine), a reference, or
                                   # a base definition of the project's own ("base.toml")
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
    max-layers = 100               # layers in the whole image, the base's included (engines: 127)
    exclude = ["tests/**"]         # kept from the wheel's build, after .dockerignore (its syntax)
    allow-secrets = ["app/demo.pem"]  # wheel paths that may ship though they look like secrets
    cache-from = "ghcr.io/org/app-cache"  # a registry repository to take built layers from
    cache-to = "ghcr.io/org/app-cache"    # and to keep newly built layers in (CI's shared cache)
    system-packages = ["libmagic1"]        # Debian packages in a layer of their own, below Python
    debian-mirror = "https://snapshot.debian.org/archive/debian/20260101T000000Z"
    debian-security-mirror = "https://snapshot.debian.org/archive/debian-security/20260101T000000Z"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from imagebuild.errors import ProjectError
from imagebuild.project.fields import Fields

DEFAULT_USER = "65532"
DEFAULT_BASE = "debian"
"""Built by imgbuild from Debian packages: nothing is pulled, and the lock pins it."""
_VERSION_RE = re.compile(r"^3\.(\d+)$")
# POSIX portable user names (useradd's rule, upper case allowed); ids are 32-bit, -1 reserved.
_USER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_MAX_ID = 2**32 - 2


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageSettings:
    """Everything about the image that is not in the lock."""

    base: str = DEFAULT_BASE
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
    max_layers: int = 100
    """Layers the image may have in all, the base's included (engines refuse more than 127)."""
    exclude: tuple[str, ...] = ()
    """Source patterns the project's wheel is built without (``.dockerignore`` syntax)."""
    allow_secrets: tuple[str, ...] = ()
    """Wheel paths or patterns that may ship though they look like secrets."""
    cache_from: str | None = None
    """A registry repository whose kept layers a build reuses (``--cache-from``)."""
    cache_to: str | None = None
    """A registry repository to keep a build's layers in (``--cache-to``)."""
    system_packages: tuple[str, ...] = ()
    """Debian packages (with their Depends) installed in a layer below the Python layers."""
    debian_mirror: str | None = None
    """The Debian archive root bases are built from (None: the recipe's, deb.debian.org)."""
    debian_security_mirror: str | None = None
    """The Debian security archive root (None: the recipe's)."""
    source: str = field(default="pyproject.toml", compare=False)
    """Where settings came from, for messages."""


def parse_python_version(text: str, where: str) -> tuple[int, int]:
    """``"3.11"`` -> ``(3, 11)``; anything else is a ProjectError naming ``where``."""
    match = _VERSION_RE.match(text.strip())
    if not match:
        raise ProjectError(f"{where}: Python version {text!r} must look like '3.11'")
    return (3, int(match[1]))


_KNOWN = frozenset(
    {
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
        "max-layers",
        "exclude",
        "allow-secrets",
        "cache-from",
        "cache-to",
        "system-packages",
        "debian-mirror",
        "debian-security-mirror",
    }
)
_PLATFORMS = ("linux/amd64", "linux/arm64")


def parse_settings(table: Mapping[str, Any], *, source: str = "pyproject.toml") -> ImageSettings:
    """Validate a ``[tool.imgbuild]`` table."""
    t = _Table(table, Fields(source, ProjectError))
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        t.fields.fail(
            f"tool.imgbuild.{unknown[0]}",
            "unknown setting",
            hint=f"known settings: {', '.join(sorted(_KNOWN))}",
        )
    python = t.string("python")
    return ImageSettings(
        index_url=t.string("index-url"),
        extra_index_urls=t.strings("extra-index-urls") or (),
        platforms=_platforms(t),
        prereleases=_prereleases(t),
        max_layers=_max_layers(t),
        base=t.string("base") or DEFAULT_BASE,
        python=parse_python_version(python, t.key("python")) if python else None,
        entrypoint=t.strings("entrypoint"),
        cmd=t.strings("cmd"),
        user=_user(t),
        workdir=t.string("workdir") or "/app",
        env=t.mapping("env"),
        labels=t.mapping("labels"),
        ports=_ports(t),
        groups=tuple(sorted(set(t.strings("groups") or ()))),
        extras=tuple(sorted(set(t.strings("extras") or ()))),
        exclude=t.strings("exclude") or (),
        allow_secrets=t.strings("allow-secrets") or (),
        cache_from=t.string("cache-from"),
        cache_to=t.string("cache-to"),
        system_packages=_system_packages(t),
        debian_mirror=_mirror(t, "debian-mirror"),
        debian_security_mirror=_mirror(t, "debian-security-mirror"),
        source=source,
    )


@dataclass(frozen=True, slots=True)
class _Table:
    """Reads of ``[tool.imgbuild]`` keys, failing with ``expected …, got …``."""

    data: Mapping[str, Any]
    fields: Fields

    def key(self, name: str) -> str:
        return f"{self.fields.source}: tool.imgbuild.{name}"

    def fail(self, name: str, message: str, *, hint: str | None = None) -> NoReturn:
        self.fields.fail(f"tool.imgbuild.{name}", message, hint=hint)

    def string(self, name: str) -> str | None:
        value = self.data.get(name)
        message = f"expected a string, got {value!r}"
        return self.fields.optional_string(value, f"tool.imgbuild.{name}", message=message)

    def strings(self, name: str) -> tuple[str, ...] | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(name, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def mapping(self, name: str) -> tuple[tuple[str, str], ...]:
        value = self.data.get(name, {})
        if not isinstance(value, Mapping):
            self.fail(name, f"expected a table, got {value!r}")
        pairs = []
        for key, item in value.items():
            if not isinstance(item, str | int | float | bool):
                self.fail(f"{name}.{key}", f"expected a string, got {item!r}")
            pairs.append((str(key), str(item)))
        return tuple(sorted(pairs))


def _ports(t: _Table) -> tuple[int, ...]:
    ports = t.data.get("ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
        t.fail("ports", f"expected a list of port numbers, got {ports!r}")
    return tuple(sorted(set(ports)))


def _user(t: _Table) -> str:
    """``NAME``, ``UID``, or either with ``:GROUP``/``:GID``, as the engine runs it.

    A TOML ``true`` is not a uid (``bool`` is an ``int`` in Python), and neither is a
    negative number: both used to reach the image config as written.
    """
    user = t.data.get("user", DEFAULT_USER)
    text = str(user) if isinstance(user, int) and not isinstance(user, bool) else user
    if not isinstance(text, str) or not all(_user_part(p) for p in text.split(":", 1)):
        t.fail(
            "user",
            f"expected a user name or uid, optionally with :group, got {user!r}",
            hint='use e.g. "65532", "65532:65532" or "nonroot"',
        )
    return text


def _user_part(part: str) -> bool:
    if part.isdecimal():
        return part.isascii() and int(part) <= _MAX_ID
    return _USER_NAME_RE.fullmatch(part) is not None


def _platforms(t: _Table) -> tuple[str, ...]:
    platforms = t.strings("platforms") or _PLATFORMS
    for platform in platforms:
        if platform not in _PLATFORMS:
            t.fail(
                "platforms",
                f"unsupported platform {platform!r}",
                hint="use linux/amd64 and/or linux/arm64",
            )
    return tuple(platforms)


def _prereleases(t: _Table) -> bool:
    prereleases = t.data.get("prereleases", False)
    if not isinstance(prereleases, bool):
        t.fail("prereleases", f"expected true or false, got {prereleases!r}")
    return prereleases


def _max_layers(t: _Table) -> int:
    value = t.data.get("max-layers", 100)
    if isinstance(value, bool) or not isinstance(value, int) or not 3 <= value <= 127:
        t.fail(
            "max-layers",
            f"expected a whole number from 3 to 127, got {value!r}",
            hint="engines refuse images of more than 127 layers",
        )
    return value


_DEB_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def _system_packages(t: _Table) -> tuple[str, ...]:
    """Debian package names (policy: lower case, digits, ``+ - .``), sorted and deduplicated."""
    names = t.strings("system-packages") or ()
    for name in names:
        if not _DEB_NAME_RE.fullmatch(name):
            t.fail(
                "system-packages",
                f"{name!r} is not a Debian package name",
                hint='name binary packages as apt does, e.g. "libgomp1"',
            )
    return tuple(sorted(set(names)))


def _mirror(t: _Table, name: str) -> str | None:
    url = t.string(name)
    if url is not None and not url.startswith(("http://", "https://", "file://")):
        t.fail(
            name, f"{url!r} is not an http(s) or file URL", hint="e.g. http://deb.debian.org/debian"
        )
    return url.rstrip("/") if url else None

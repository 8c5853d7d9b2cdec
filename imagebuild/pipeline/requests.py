"""What the pipeline is asked to do and what it answers: build and lock requests, results.

The CLI validates options into these values; nothing in them is a client or an open file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

LockMode = Literal["locked", "frozen", "check-if-present"]
"""``locked`` (refuse a stale lock), ``frozen`` (use as is) or ``check-if-present``."""

CompileWith = Literal["auto", "host", "image"]
"""Which interpreter compiles bytecode (see ``BuildRequest.compile_with``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildRequest:
    """Everything a build needs, already validated by the CLI (outputs are sinks beside it)."""

    project_dir: Path
    """The project (or, with ``package``, the workspace root)."""
    tags: tuple[str, ...] = ()
    """Every ``--tag``; empty means ``<project>:latest``."""
    base: str | None = None
    """``--base``: a catalog flavor or an image reference; wins over the settings."""
    python: tuple[int, int] | None = None
    """``--python``: the minor version; wins over the settings."""
    lock_mode: LockMode = "check-if-present"
    """``locked`` (refuse a stale lock), ``frozen`` (use as is) or ``check-if-present``."""
    groups: tuple[str, ...] = ()
    """Dependency groups installed beside the configured ones."""
    extras: tuple[str, ...] = ()
    """Extras of the project installed beside the configured ones."""
    package: str | None = None
    """Build this workspace member (``project_dir`` is the workspace root)."""
    compile_bytecode: bool = True
    """False for ``--no-compile``."""
    compile_with: CompileWith = "auto"
    """``auto`` (the base's own Python through Docker, else a host one of the same minor
    version, with a warning), ``host`` or ``image``."""
    platforms: tuple[str, ...] = ("linux/amd64",)
    """``os/arch`` of each image; more than one makes an image index (registry, oci)."""
    cache_dir: Path
    """The cache directory every bucket lives under."""
    source_date_epoch: int = 0
    """The timestamp written into layers and the config (``SOURCE_DATE_EPOCH``)."""
    mirrors: Mapping[str, str] = field(default_factory=dict)
    """Registry host -> mirror host, for pulling the base."""
    cache_from: str | None = None
    """``--cache-from``: a registry repository to take kept layers from (else the setting)."""
    cache_to: str | None = None
    """``--cache-to``: a registry repository to keep new layers in (else the setting)."""
    expect_digest: str | None = None
    """Refuse to send the image anywhere unless its (or its index's) digest is this."""
    index_urls: tuple[str, ...] = ()
    """Command-line indexes (primary first), as ``imgbuild lock`` takes them; empty means
    the settings, then ``[[tool.uv.index]]``. ``--locked`` compares them with the lock's."""
    default_output: bool = False
    """No output was asked for: load into Docker, or, with no engine, write an archive of
    the image to the project's ``dist/`` and say how to load it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildResult:
    """What was built and where it went."""

    manifest_digest: str
    """The image manifest's digest, or the image index's for several platforms."""
    written: tuple[str, ...]
    """The lines the sinks answered: what was loaded, written or pushed."""
    tag: str = ""
    """The first tag the image was given."""
    size: int = 0
    """Bytes of its blobs as stored (compressed layers, configs, manifests), each counted once."""
    layers: int = 0
    """How many layers it has (summed over platforms), its base's included."""
    layers_built: int = 0
    """How many of those this build made; the rest were the base's or the layer cache's."""

    def summary_lines(self) -> list[str]:
        """Lines the CLI prints on success."""
        return [*self.written, f"digest: {self.manifest_digest}"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LockRequest:
    """What ``imgbuild lock`` was asked to do."""

    project_dir: Path
    """The project (or, with ``package``, the workspace root)."""
    cache_dir: Path
    """The cache directory every bucket lives under."""
    check: bool = False
    """Only judge whether the existing lock is current (no network); never write."""
    upgrade: bool = False
    """Ignore the existing pins."""
    upgrade_packages: tuple[str, ...] = ()
    """Ignore the existing pins of these packages only."""
    index_urls: tuple[str, ...] = ()
    """Command-line indexes (primary first); empty means settings, then [[tool.uv.index]]."""
    package: str | None = None
    """Lock this workspace member (into ``pylock.<name>.toml`` at the workspace root)."""
    base: str | None = None
    """``--base``: wins over the settings."""
    python: tuple[int, int] | None = None
    """``--python``: wins over the settings."""
    mirrors: Mapping[str, str] = field(default_factory=dict)
    """Registry host -> mirror host, for pulling a base given by reference."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LockResult:
    """What the lock step did."""

    path: Path
    """The lock file written or checked."""
    changed: bool
    """Whether its text changed."""
    packages: int
    """How many packages it pins (0 for ``--check``)."""
    targets: tuple[str, ...]
    """The targets it covers, described."""

    def summary_lines(self) -> list[str]:
        """Lines the CLI prints on success."""
        verb = "wrote" if self.changed else "unchanged"
        return [f"{verb} {self.path} ({self.packages} packages for {', '.join(self.targets)})"]

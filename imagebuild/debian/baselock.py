"""The base lock: which .debs a built base is made of, recorded in the project's pylock.toml.

It sits in ``[tool.imgbuild.debian]``: the recipe's inputs (flavor, suite, the packages
asked for, the system packages, the excluded ones), then one ``[[debs]]`` row per package
and platform with its version, architecture, URL, sha256 and size. A build from the lock
fetches exactly those files (from another mirror if configured: the pool path is kept), so
the base is rebuilt byte for byte; inputs that no longer match make the lock stale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from imagebuild.debian.model import LockedDeb
from imagebuild.digest import parse_digest
from imagebuild.errors import LockError

LayerName = Literal["base", "system"]


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseInputs:
    """What a built base is asked to be; a lock made for other inputs is stale."""

    flavor: str
    suite: str
    packages: tuple[str, ...]
    system_packages: tuple[str, ...]
    exclude: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlatformDebs:
    """One platform's packages: the base layer's and the system-packages layer's."""

    base: tuple[LockedDeb, ...]
    system: tuple[LockedDeb, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseLock:
    """A built base's inputs and, per architecture, its packages."""

    inputs: BaseInputs
    platforms: Mapping[str, PlatformDebs]

    def stale_for(self, inputs: BaseInputs, arch: str) -> str | None:
        """Why this lock does not fit ``inputs`` on ``arch`` (None when it does)."""
        if self.inputs != inputs:
            for name in ("flavor", "suite", "packages", "system_packages", "exclude"):
                was, now = getattr(self.inputs, name), getattr(inputs, name)
                if was != now:
                    key = name.replace("_", "-")
                    was_, is_ = ("were", "are") if isinstance(was, tuple) else ("was", "is")
                    return f"its base {key} {was_} {_show(was)}, {is_} now {_show(now)}"
        if arch not in self.platforms:
            return f"it has no base packages for {arch}"
        return None


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(value) if value else "none"
    return str(value)


def render_base_lock(lock: BaseLock) -> dict[str, Any]:
    """The ``[tool.imgbuild.debian]`` table, as plain TOML values, rows sorted."""
    rows: list[dict[str, Any]] = []
    for arch in sorted(lock.platforms):
        debs = lock.platforms[arch]
        for layer, group in (("base", debs.base), ("system", debs.system)):
            for deb in sorted(group, key=lambda d: d.name):
                rows.append(
                    {
                        "arch": arch,
                        "layer": layer,
                        "name": deb.name,
                        "version": deb.version,
                        "architecture": deb.architecture,
                        "url": deb.url,
                        "sha256": deb.sha256.removeprefix("sha256:"),
                        "size": deb.size,
                    }
                )
    inputs = lock.inputs
    return {
        "flavor": inputs.flavor,
        "suite": inputs.suite,
        "packages": list(inputs.packages),
        "system-packages": list(inputs.system_packages),
        "exclude": list(inputs.exclude),
        "debs": rows,
    }


def parse_base_lock(table: Mapping[str, Any], *, source: str) -> BaseLock:
    """A ``[tool.imgbuild.debian]`` table read back; malformed is one LockError."""
    try:
        inputs = BaseInputs(
            flavor=str(table["flavor"]),
            suite=str(table["suite"]),
            packages=_names(table["packages"], "packages"),
            system_packages=_names(table["system-packages"], "system-packages"),
            exclude=_names(table["exclude"], "exclude"),
        )
        grouped: dict[str, dict[str, list[LockedDeb]]] = {}
        for row in table["debs"]:
            layer = str(row["layer"])
            if layer not in ("base", "system"):
                raise ValueError(f"layer {layer!r}")
            deb = LockedDeb(
                name=str(row["name"]),
                version=str(row["version"]),
                architecture=str(row["architecture"]),
                url=str(row["url"]),
                sha256=parse_digest(str(row["sha256"]), bare_hex=True),
                size=_size(row["size"]),
            )
            grouped.setdefault(str(row["arch"]), {}).setdefault(layer, []).append(deb)
    except (KeyError, TypeError, ValueError) as exc:
        raise LockError(
            f"{source}: tool.imgbuild.debian is malformed ({exc})", hint="run 'imgbuild lock'"
        ) from exc
    return BaseLock(
        inputs=inputs,
        platforms={
            arch: PlatformDebs(base=tuple(g.get("base", ())), system=tuple(g.get("system", ())))
            for arch, g in grouped.items()
        },
    )


def _names(value: object, key: str) -> tuple[str, ...]:
    """A list of package names, or ValueError naming ``key``."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of package names")
    return tuple(value)


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"size {value!r} is not a byte count")
    return value


def merge_platforms(locks: Sequence[tuple[str, PlatformDebs]], inputs: BaseInputs) -> BaseLock:
    """One lock over the platforms resolved one by one."""
    return BaseLock(inputs=inputs, platforms=dict(locks))

"""Recipes of bases imgbuild builds itself from Debian packages (``[build]`` in a catalog file).

A catalog file whose ``[build]`` table has ``kind = "debian"`` describes a base with no
upstream image: each ``[[python]]`` entry names a Debian suite and the packages that carry
its Python; ``[build]`` names what every entry shares (the archive, the keyring, the runtime
packages, packages never installed, accounts, environment). ``imagebuild.debian`` turns a
recipe and a platform into layers; this module only reads and checks the TOML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from imagebuild.errors import TargetError
from imagebuild.project.fields import Fields

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True, kw_only=True, slots=True)
class Account:
    """A user of the image, written to ``/etc/passwd``."""

    name: str
    uid: int
    gid: int
    home: str
    """Absolute; made (0700, owned by the account) unless ``/`` or ``/nonexistent``."""
    shell: str = "/sbin/nologin"


@dataclass(frozen=True, kw_only=True, slots=True)
class Group:
    """A group of the image, written to ``/etc/group``."""

    name: str
    gid: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class DebianRecipe:
    """How one catalog entry's base is built from the Debian archive."""

    suite: str
    """The release's codename, e.g. ``bookworm``; ``-updates`` and ``-security`` are read too."""
    packages: tuple[str, ...]
    """What the base installs (their Depends and Pre-Depends come along)."""
    exclude: tuple[str, ...]
    """Packages never installed (maintainer scripts need them; a runtime does not)."""
    mirror: str
    """The archive root (a snapshot mirror rebuilds an old lock)."""
    security_mirror: str
    """The security archive root."""
    keyring: str
    """The OpenPGP keyring ``InRelease`` files are verified against."""
    accounts: tuple[Account, ...]
    groups: tuple[Group, ...]
    symlinks: tuple[tuple[str, str], ...]
    """``(path, target)`` links the packages' scripts would have made, e.g. python3."""
    env: tuple[tuple[str, str], ...]
    """The image config's environment."""

    def with_mirrors(self, mirror: str | None, security: str | None) -> DebianRecipe:
        """The same recipe read from other mirrors (``debian-mirror`` settings)."""
        return replace(
            self,
            mirror=(mirror or self.mirror).rstrip("/"),
            security_mirror=(security or self.security_mirror).rstrip("/"),
        )


def read_recipe(
    data: Mapping[str, object], python: Mapping[str, object], *, path: Path, index: int
) -> DebianRecipe | None:
    """The recipe of ``python`` (the ``index``-th entry of the catalog file), or None.

    None when the file has no ``[build]`` table: its base is pulled by reference.
    """
    if "build" not in data:
        return None
    fields = Fields(str(path), TargetError)
    build = fields.table(data["build"], "build")
    kind = fields.string(build.get("kind"), "build.kind")
    if kind != "debian":
        fields.fail("build.kind", f"unknown kind {kind!r}", hint='use kind = "debian"')
    key = f"python[{index}]"
    shared = _strings(fields, build.get("packages", []), "build.packages")
    own = _strings(fields, python.get("packages", []), f"{key}.packages")
    links = {
        **fields.table(build.get("symlinks", {}), "build.symlinks"),
        **fields.table(python.get("symlinks", {}), f"{key}.symlinks"),
    }
    env = fields.table(build.get("env", {}), "build.env")
    return DebianRecipe(
        suite=fields.string(python.get("suite"), f"{key}.suite"),
        packages=tuple(dict.fromkeys((*own, *shared))),
        exclude=_strings(fields, build.get("exclude", []), "build.exclude"),
        mirror=fields.string(build.get("mirror", DEFAULT_MIRROR), "build.mirror").rstrip("/"),
        security_mirror=fields.string(
            build.get("security-mirror", DEFAULT_SECURITY_MIRROR), "build.security-mirror"
        ).rstrip("/"),
        keyring=fields.string(build.get("keyring", DEFAULT_KEYRING), "build.keyring"),
        accounts=tuple(
            _account(fields, a, i) for i, a in enumerate(_list(fields, build, "accounts"))
        ),
        groups=tuple(_group(fields, g, i) for i, g in enumerate(_list(fields, build, "groups"))),
        symlinks=tuple(
            sorted((p, fields.string(t, f"{key}.symlinks.{p}")) for p, t in links.items())
        ),
        env=tuple((k, fields.string(v, f"build.env.{k}")) for k, v in env.items()),
    )


def _list(fields: Fields, build: Mapping[str, object], key: str) -> list[object]:
    return fields.array(build.get(key, []), f"build.{key}")


def _strings(fields: Fields, value: object, key: str) -> tuple[str, ...]:
    return tuple(fields.string(v, f"{key}[{i}]") for i, v in enumerate(fields.array(value, key)))


def _account(fields: Fields, value: object, index: int) -> Account:
    key = f"build.accounts[{index}]"
    table = fields.table(value, key)
    return Account(
        name=fields.string(table.get("name"), f"{key}.name"),
        uid=_id(fields, table.get("uid"), f"{key}.uid"),
        gid=_id(fields, table.get("gid"), f"{key}.gid"),
        home=fields.string(table.get("home"), f"{key}.home"),
        shell=fields.string(table.get("shell", "/sbin/nologin"), f"{key}.shell"),
    )


def _group(fields: Fields, value: object, index: int) -> Group:
    key = f"build.groups[{index}]"
    table = fields.table(value, key)
    return Group(
        name=fields.string(table.get("name"), f"{key}.name"),
        gid=_id(fields, table.get("gid"), f"{key}.gid"),
    )


def _id(fields: Fields, value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
        fields.fail(key, "must be an integer id")
    return value

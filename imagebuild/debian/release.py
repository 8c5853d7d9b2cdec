"""Which Debian release a pulled base is, and which packages it already has.

Read off its layer tars (gzip or plain, base layer first; a later layer's file wins):
``/etc/os-release`` (or ``/usr/lib/os-release``) for ``ID`` and ``VERSION_CODENAME``, and
dpkg's ``status`` file and ``status.d/`` entries (distroless images have only the latter)
for the installed packages. System packages added on top of such a base are resolved
against that release, leaving out what it has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagebuild.target.base import open_layer

_OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
_STATUS = "var/lib/dpkg/status"
_STATUS_D = "var/lib/dpkg/status.d/"
_PACKAGE_RE = re.compile(r"^Package:\s*(\S+)", re.MULTILINE)


@dataclass(frozen=True, kw_only=True, slots=True)
class InstalledRelease:
    """A base's distribution and packages."""

    id: str
    """``ID`` of os-release (``debian``, ``ubuntu``, ``alpine``...), empty if unknown."""
    codename: str
    """``VERSION_CODENAME`` (``bookworm``), empty if unknown."""
    packages: frozenset[str]
    """Packages dpkg records as installed."""


def read_release(layers: Sequence[Path]) -> InstalledRelease:
    """The release and installed packages of the image made of ``layers``."""
    files: dict[str, bytes] = {}
    status_d: dict[str, bytes] = {}
    for path in layers:
        with open_layer(path) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                wanted = name in _OS_RELEASE or name == _STATUS or name.startswith(_STATUS_D)
                if not wanted or not member.isfile():
                    continue
                stream = tar.extractfile(member)
                data = stream.read() if stream is not None else b""
                if name.startswith(_STATUS_D):
                    status_d[name] = data
                else:
                    files[name] = data
    fields = _os_release(files.get(_OS_RELEASE[0]) or files.get(_OS_RELEASE[1]) or b"")
    return InstalledRelease(
        id=fields.get("ID", ""),
        codename=fields.get("VERSION_CODENAME", ""),
        packages=frozenset(_installed(files.get(_STATUS, b""), status_d)),
    )


def _os_release(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            fields[key.strip()] = value.strip().strip("\"'")
    return fields


def _installed(status: bytes, status_d: dict[str, bytes]) -> set[str]:
    """Packages dpkg's status (installed entries only) and status.d name."""
    names: set[str] = set()
    for paragraph in status.decode("utf-8", "replace").split("\n\n"):
        found = _PACKAGE_RE.search(paragraph)
        if found and "install ok installed" in paragraph:
            names.add(found[1])
    for name, data in status_d.items():
        if name.endswith((".md5sums", ".list")):
            continue
        found = _PACKAGE_RE.search(data.decode("utf-8", "replace"))
        if found:
            names.add(found[1])
    return names

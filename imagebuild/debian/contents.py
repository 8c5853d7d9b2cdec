"""Which Debian package ships a library: read from the archive's Contents index.

Only asked when a build must name a package to add (an extension needs a library the image
lacks), so nothing here runs on a build that passes. A Contents index is large (about 12 MB
compressed, 150 MB of text for bookworm's main/amd64); it is fetched once per sha256 into
the cache and scanned as a stream, a few MB at a time, by one regular expression that only
matches the files asked for in library directories, so no line is kept that is not an answer.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import httpx
from filelock import FileLock

from imagebuild.debian.archive import Release, fetch_index
from imagebuild.digest import digest_hex
from imagebuild.errors import DebianError

_TRIPLETS = {
    "amd64": "x86_64-linux-gnu",
    "arm64": "aarch64-linux-gnu",
    "armhf": "arm-linux-gnueabihf",
    "armel": "arm-linux-gnueabi",
    "i386": "i386-linux-gnu",
    "ppc64el": "powerpc64le-linux-gnu",
    "riscv64": "riscv64-linux-gnu",
    "s390x": "s390x-linux-gnu",
}
"""Debian architecture -> its multiarch triplet (the library directory's name)."""

_BLOCK = 4 << 20
_SONAME = re.compile(r"(?P<stem>.+?)\.so(?:\.(?P<version>[0-9.]+))?")


def multiarch_triplet(arch: str) -> str:
    """The multiarch triplet of Debian architecture ``arch`` (``amd64``: x86_64-linux-gnu)."""
    try:
        return _TRIPLETS[arch]
    except KeyError:
        raise DebianError(
            f"architecture {arch!r} has no known library directory",
            hint=f"use one of {', '.join(sorted(_TRIPLETS))}",
        ) from None


def find_providers(
    http: httpx.Client,
    releases: Sequence[Release],
    *,
    arch: str,
    component: str = "main",
    filenames: Collection[str],
    cache: Path,
) -> dict[str, str]:
    """The package that ships each of ``filenames`` in a library directory, if any does.

    Library directories are ``usr/lib/<triplet>/``, ``lib/<triplet>/``, ``usr/lib/`` and
    ``lib/``. Where several packages ship a file, the one Debian policy names after the
    library wins (``libstdc++.so.6``: ``libstdc++6``; ``libGL.so.1``: ``libgl1``; a
    ``t64`` rename too), then a package that ships it under the triplet directory, then the
    first name. Files no package ships are left out of the answer. Each release's
    ``<component>/Contents-<arch>.gz`` is read; a release without one (a security suite of
    an old archive) is skipped.
    """
    wanted = sorted({name for name in filenames if name and "/" not in name})
    if not wanted:
        return {}
    triplet = multiarch_triplet(arch)
    pattern = _pattern(wanted, triplet)
    found: dict[str, dict[str, bool]] = {}  # file -> package -> in the triplet directory
    path = f"{component}/Contents-{arch}.gz"
    readable = [release for release in releases if path in release.sha256]
    if not readable:
        suites = ", ".join(release.source.suite for release in releases) or "no suite"
        raise DebianError(
            f"no Contents index {path} in {suites}: cannot tell which package ships "
            f"{', '.join(wanted)}",
            hint="check the architecture and component, or find the package on "
            "https://packages.debian.org and add it to system-packages",
        )
    for release in readable:
        local = _contents_file(http, release, path, cache)
        for directory, filename, packages in _scan(local, pattern):
            for package in packages:
                seen = found.setdefault(filename, {})
                seen[package] = seen.get(package, False) or directory == triplet
    return {name: _best(name, found[name]) for name in wanted if name in found}


def _contents_file(http: httpx.Client, release: Release, path: str, cache: Path) -> Path:
    digest, _ = release.sha256[path]
    local = cache / "contents" / f"{digest_hex(digest)}.gz"
    with FileLock(f"{local}.lock"):
        if not local.is_file():
            fetch_index(http, release, path, dest=local)
    return local


def _pattern(filenames: Sequence[str], triplet: str) -> re.Pattern[bytes]:
    # A Contents line is "<path><spaces><section>/<package>[,<section>/<package>...]"; the
    # path has no leading slash. The directory group is the triplet or nothing.
    names = b"|".join(re.escape(name.encode()) for name in filenames)
    return re.compile(
        rb"^(?:usr/)?lib/(?:(?P<dir>" + re.escape(triplet.encode()) + rb")/)?"
        rb"(?P<file>" + names + rb")[ \t]+(?P<packages>\S+)[ \t]*$",
        re.MULTILINE,
    )


def _scan(path: Path, pattern: re.Pattern[bytes]) -> Iterator[tuple[str, str, list[str]]]:
    """(directory, file name, packages) of each line ``pattern`` matches in a Contents.gz."""
    rest = b""
    with gzip.open(path, "rb") as stream:
        while block := stream.read(_BLOCK):
            # Scan whole lines only; the partial last line waits for the next block.
            head, _, tail = (rest + block).rpartition(b"\n")
            if head:
                yield from _matches(head, pattern)
            rest = tail
        if rest:
            yield from _matches(rest, pattern)


def _matches(text: bytes, pattern: re.Pattern[bytes]) -> Iterator[tuple[str, str, list[str]]]:
    for match in pattern.finditer(text):
        packages = [
            entry.rpartition(b"/")[2].decode() for entry in match["packages"].split(b",") if entry
        ]
        directory = (match["dir"] or b"").decode()
        yield directory, match["file"].decode(), packages


def policy_names(filename: str) -> tuple[str, ...]:
    """The package names Debian policy (8.1) gives the library ``filename``, best first.

    ``libstdc++.so.6`` -> ``libstdc++6``; ``libfoo-1.2.so.3`` -> ``libfoo-1.2-3`` (a hyphen
    when the name ends in a digit); each also with the ``t64`` suffix of the 2024 rename.
    """
    match = _SONAME.fullmatch(filename)
    if match is None:
        return ()
    stem, version = match["stem"].lower(), match["version"] or ""
    name = f"{stem}-{version}" if version and stem[-1].isdigit() else f"{stem}{version}"
    name = name.replace("_", "-")
    return (name, f"{name}t64")


def _best(filename: str, packages: dict[str, bool]) -> str:
    preferred = policy_names(filename)

    def rank(package: str) -> tuple[int, int, str]:
        named = preferred.index(package) if package in preferred else len(preferred)
        return (named, 0 if packages[package] else 1, package)

    return min(packages, key=rank)

"""Packages indexes: their paragraphs parsed into values, and kept parsed as JSON rows."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from imagebuild.cache import write_atomic
from imagebuild.debian.model import IndexedPackage
from imagebuild.digest import parse_digest
from imagebuild.errors import DebianError

PACKAGES_FORMAT = 2  # bump when the parsed-index JSON changes shape
MIRROR_HINT = "the mirror is inconsistent or was tampered with: retry later or use another mirror"

# Packages field -> IndexedPackage attribute; rows of the parsed cache keep this order.
# fmt: off
_COLUMNS = (
    ("Package", "name"), ("Version", "version"), ("Architecture", "architecture"),
    ("Filename", "filename"), ("SHA256", "sha256"), ("Size", "size"), ("Depends", "depends"),
    ("Pre-Depends", "pre_depends"), ("Provides", "provides"), ("Essential", "essential"),
    ("Multi-Arch", "multi_arch"), ("Source", "source"),
)
# fmt: on
_REQUIRED = ("Package", "Version", "Architecture", "Filename", "SHA256", "Size")


def parse_packages(stream: io.BufferedIOBase, *, mirror: str) -> tuple[IndexedPackage, ...]:
    """The paragraphs of a Packages index as values, sorted by name, architecture, version."""
    found = []
    for paragraph in _paragraphs(stream.read().decode("utf-8", "replace")):
        values: dict[str, Any] = {attr: paragraph.get(field, "") for field, attr in _COLUMNS}
        try:
            missing = next((field for field in _REQUIRED if not paragraph.get(field)), None)
            if missing:
                raise ValueError(f"no {missing} field")
            values["sha256"] = parse_digest(values["sha256"], bare_hex=True)
            values["size"] = int(values["size"])
        except ValueError as exc:
            raise DebianError(
                f"Packages index from {mirror}: package {values['name'] or '?'} is unusable: {exc}",
                hint=MIRROR_HINT,
            ) from exc
        values["essential"] = values["essential"].strip() == "yes"
        found.append(IndexedPackage(mirror=mirror, **values))
    return tuple(sorted(found, key=lambda p: (p.name, p.architecture, p.version)))


_WANTED = frozenset(field for field, _ in _COLUMNS)


def _paragraphs(text: str) -> Iterator[dict[str, str]]:
    """The fields of each paragraph that ``_COLUMNS`` names.

    deb822: ``Name: value`` lines, continuation lines start with a space or tab, paragraphs
    are split by blank lines. A loop of our own rather than python-debian's reader: over
    the 66,000 paragraphs of a suite's index that reader took seven seconds of a cold
    build, this takes under one.
    """
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = ""
        for line in block.split("\n"):
            if not line or line[0] == "#":
                continue
            if line[0] in " \t":
                if last in fields:
                    fields[last] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            last = name if sep and name in _WANTED else ""
            if last:
                fields[last] = value.strip()
        if fields:
            yield fields


def store_rows(path: Path, packages: Sequence[IndexedPackage]) -> None:
    """Keep parsed ``packages`` as compact JSON rows (in ``_COLUMNS`` order)."""
    rows = [[getattr(p, attr) for _, attr in _COLUMNS] for p in packages]
    data = json.dumps({"format": PACKAGES_FORMAT, "packages": rows}, separators=(",", ":"))
    write_atomic(path, data.encode("utf-8"))


def load_rows(path: Path) -> list[list[Any]] | None:
    """The rows ``store_rows`` kept, or None when absent, unreadable or of another format."""
    try:
        record = json.loads(path.read_bytes())
        return list(record["packages"]) if record["format"] == PACKAGES_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def from_row(row: list[Any], mirror: str) -> IndexedPackage:
    """One kept row as a value."""
    return IndexedPackage(mirror=mirror, **dict(zip((a for _, a in _COLUMNS), row, strict=True)))

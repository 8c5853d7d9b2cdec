"""The commands a wheel puts in the venv's ``bin/``: console and GUI scripts, data scripts.

Read from the wheel's ``entry_points.txt`` and its ``.data/scripts/`` members, without
installing it: enough to tell whether an entrypoint names a command the image will have.
"""

from __future__ import annotations

import configparser
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath


def wheel_scripts(wheel: Path) -> frozenset[str]:
    """The names ``wheel`` installs into ``bin/``; none if it cannot be read."""
    names: set[str] = set()
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                parts = PurePosixPath(member).parts
                if len(parts) == 3 and parts[0].endswith(".data") and parts[1] == "scripts":
                    names.add(parts[2])
                elif len(parts) == 2 and parts[0].endswith(".dist-info"):
                    if parts[1] == "entry_points.txt":
                        names |= _entry_point_scripts(archive.read(member))
    except (OSError, zipfile.BadZipFile):
        return frozenset()
    return frozenset(names)


def scripts_of(wheels: Iterable[Path]) -> frozenset[str]:
    """Every name the ``wheels`` install into ``bin/``."""
    return frozenset(name for wheel in wheels for name in wheel_scripts(wheel))


def _entry_point_scripts(data: bytes) -> set[str]:
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(data.decode("utf-8", "replace"))
    except configparser.Error:
        return set()
    return {
        name.strip()
        for section in ("console_scripts", "gui_scripts")
        if parser.has_section(section)
        for name in parser.options(section)
    }

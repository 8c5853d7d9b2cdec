"""Typed reads of decoded TOML that fail with ``<file>: <dotted.key>: <message>``.

pyproject.toml, ``[tool.imgbuild]`` and both lock formats are validated through ``Fields``;
each caller picks the error class (``ProjectError``, ``LockError``) and the file name shown.
The default messages (``must be a string`` …) are the ones the pyproject and lock readers
have always used; a caller with its own wording passes ``message``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from packaging.markers import InvalidMarker, Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from imagebuild.errors import ImagebuildError


@dataclass(frozen=True, slots=True)
class Fields:
    """Validating accessors for one file's decoded TOML."""

    source: str
    """The file as messages name it (a path, or just its name)."""
    error: type[ImagebuildError]
    """What a failure raises."""

    def fail(self, key: str, message: str, *, hint: str | None = None) -> NoReturn:
        """Raise ``error`` naming the file and ``key`` (no key: the file alone)."""
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        raise self.error(where + message, hint=hint)

    def table(
        self, value: object, key: str, *, message: str = "must be a table"
    ) -> Mapping[str, object]:
        """``value`` as a table."""
        if not isinstance(value, dict):
            self.fail(key, message)
        return value

    def array(self, value: object, key: str, *, message: str = "must be an array") -> list[object]:
        """``value`` as an array."""
        if not isinstance(value, list):
            self.fail(key, message)
        return value

    def string(self, value: object, key: str, *, message: str = "must be a string") -> str:
        """``value`` as a string."""
        if not isinstance(value, str):
            self.fail(key, message)
        return value

    def optional_string(
        self, value: object, key: str, *, message: str = "must be a string"
    ) -> str | None:
        """``value`` as a string, or None when absent."""
        return None if value is None else self.string(value, key, message=message)

    def strings(self, value: object, key: str) -> list[str]:
        """``value`` as an array of strings (the failing item is named by index)."""
        items = self.array(value, key, message="must be an array of strings")
        for i, item in enumerate(items):
            self.string(item, f"{key}[{i}]")
        return [str(item) for item in items]

    def optional_size(self, value: object, key: str) -> int | None:
        """``value`` as a non-negative integer, or None when absent."""
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self.fail(key, "must be a non-negative integer")
        return value

    def name(self, value: object, key: str) -> NormalizedName:
        """A required package name, canonicalised."""
        if not isinstance(value, str) or not value:
            self.fail(key, "missing or not a string")
        return canonicalize_name(value)

    def optional_version(self, value: object, key: str) -> Version | None:
        """``value`` as a ``Version``, or None when absent."""
        if value is None:
            return None
        try:
            return Version(self.string(value, key))
        except InvalidVersion:
            self.fail(key, f"invalid version {value!r}")

    def optional_specifier(self, value: object, key: str) -> SpecifierSet | None:
        """``value`` as a ``SpecifierSet``, or None when absent."""
        if value is None:
            return None
        try:
            return SpecifierSet(self.string(value, key))
        except InvalidSpecifier:
            self.fail(key, f"invalid specifier {value!r}")

    def marker(self, value: object, key: str) -> Marker:
        """``value`` as an environment ``Marker``."""
        try:
            return Marker(self.string(value, key))
        except InvalidMarker:
            self.fail(key, f"invalid marker {value!r}")

    def requirement(self, text: str, key: str) -> Requirement:
        """``text`` as a PEP 508 ``Requirement``."""
        try:
            return Requirement(text)
        except InvalidRequirement:
            self.fail(key, f"invalid requirement {text!r}")

    def requirements(self, value: object, key: str) -> list[Requirement]:
        """``value`` as an array of requirement strings, in the order written."""
        items = self.array(value, key, message="must be an array of requirement strings")
        out: list[Requirement] = []
        for i, item in enumerate(items):
            text = self.string(item, f"{key}[{i}]", message="must be a requirement string")
            out.append(self.requirement(text, f"{key}[{i}]"))
        return out

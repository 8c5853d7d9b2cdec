"""Progress reporting: library code talks to a ``Reporter``; the CLI supplies one."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    """Where stages send progress and non-fatal warnings."""

    def step(self, message: str) -> None:
        """Announce a stage or a notable action (one short line)."""

    def warn(self, message: str) -> None:
        """Report something the user should know that does not stop the build."""


class NullReporter:
    """A reporter that drops everything (the default for library callers and tests)."""

    def step(self, message: str) -> None:
        """Drop the message."""

    def warn(self, message: str) -> None:
        """Drop the warning."""

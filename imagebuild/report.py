"""Progress reporting: library code talks to a ``Reporter``; the CLI supplies one."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    """Where stages send progress and non-fatal warnings."""

    def step(self, message: str) -> None:
        """Announce a stage or a notable action (one short line)."""

    def warn(self, message: str) -> None:
        """Report something the user should know that does not stop the build."""

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        """Report how far a counted phase has got.

        ``task`` names the phase (``download``, ``install``, ``compile``, ``compress``,
        ``push``); ``done`` of ``total`` ``unit`` are complete (``unit`` ``"B"`` means bytes,
        ``total`` is ``None`` while it is unknown). The caller's last call for a phase has
        ``done == total``; a later call for the same ``task`` starts it afresh (the next
        platform's layers). Calls may come from several threads at once.
        """


class NullReporter:
    """A reporter that drops everything (the default for library callers and tests)."""

    def step(self, message: str) -> None:
        """Drop the message."""

    def warn(self, message: str) -> None:
        """Drop the warning."""

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        """Drop the progress."""

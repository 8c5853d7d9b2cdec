"""The console reporters: live rich progress on a terminal, plain step lines in a log.

``open_reporter`` picks one: on a terminal (stderr a TTY, ``TERM`` not ``dumb``) a live
display shows the current step beside bars for downloads (bytes and rate) and for the
counted phases (``commands.live``, imported only then: rich's console and progress cost a
run 25 ms); elsewhere (CI logs, pipes) each step is one ``· step`` line with no escape
codes or timestamps, and each counted phase one line when it ends.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from rich.filesize import decimal

from imagebuild.report import Reporter

if TYPE_CHECKING:
    from imagebuild.pipeline.requests import BuildResult


@dataclass(frozen=True, kw_only=True, slots=True)
class Verbosity:
    """How much the console says (``-q`` / ``-v``)."""

    quiet: bool = False
    """Only errors, warnings and the command's answer."""
    verbose: bool = False
    """Every step as a line of its own, also on a terminal, and tracebacks on errors."""


def amount(done: int, unit: str) -> str:
    """``done`` in ``unit``: bytes as decimal sizes (``12.3 MB``), counts with their unit."""
    if unit == "B":
        return decimal(done)
    return f"{done} {unit}".rstrip()


def summary_line(result: BuildResult, seconds: float) -> str:
    """The one line a finished build ends with: image, digest, size, layers and time."""
    reused = result.layers - result.layers_built
    # Docker Hub's official images by their familiar name, as docker prints them.
    tag = result.tag.removeprefix("docker.io/library/")
    return (
        f"built {tag} {result.manifest_digest} ({decimal(result.size)}, "
        f"{result.layers} layers: {result.layers_built} new, {reused} reused) in {seconds:.1f}s"
    )


class PlainReporter:
    """Line-per-step output for logs: ``· step``, ``warning: …``, a line per finished phase."""

    def __init__(self, verbosity: Verbosity, out: TextIO | None = None) -> None:
        self._verbosity = verbosity
        self._out = out
        self._lock = threading.Lock()

    def _line(self, text: str) -> None:
        out = self._out or sys.stderr
        with self._lock:
            print(text, file=out, flush=True)

    def step(self, message: str) -> None:
        """Print ``· message`` (not with ``-q``)."""
        if not self._verbosity.quiet:
            self._line(f"· {message}")

    def warn(self, message: str) -> None:
        """Print ``warning: message``, even with ``-q``."""
        self._line(f"warning: {message}")

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        """Print ``· task: done unit`` once a phase ends; nothing while it runs."""
        if not self._verbosity.quiet and total is not None and done == total:
            self._line(f"· {task}: {amount(done, unit)}")


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that takes a live display."""
    return stream.isatty() and os.environ.get("TERM", "") != "dumb"


@contextmanager
def open_reporter(verbosity: Verbosity) -> Iterator[Reporter]:
    """The reporter for this run: live on a terminal (unless ``-q``), plain otherwise."""
    if verbosity.quiet or not is_terminal(sys.stderr):
        yield PlainReporter(verbosity)
        return
    from rich.console import Console

    from imagebuild.commands.live import LiveReporter

    live = LiveReporter(Console(stderr=True, highlight=False), verbose=verbosity.verbose)
    live.start()
    try:
        yield live
    finally:
        live.stop()

"""The console reporters: live rich progress on a terminal, plain step lines in a log.

``open_reporter`` picks one: on a terminal (stderr a TTY, ``TERM`` not ``dumb``) a live
display shows the current step beside bars for downloads (bytes and rate) and for the
counted phases; elsewhere (CI logs, pipes) each step is one ``· step`` line with no
escape codes or timestamps, and each counted phase one line when it ends.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from rich.console import Console, RenderableType
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

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


class _Amount(ProgressColumn):
    """``3/5 layers``, or for bytes ``1.2/4.5 MB 3.1 MB/s``."""

    def render(self, task: Task) -> Text:
        unit = str(task.fields.get("unit", ""))
        if task.fields.get("status"):
            return Text("")
        done, total = int(task.completed), task.total
        if unit == "B":
            text = decimal(done) if total is None else f"{decimal(done)}/{decimal(int(total))}"
            speed = task.speed
            if task.finished:
                # The average over the whole phase (rich's sampled speed may be unset).
                took = task.finished_time or 0
                speed = task.finished_speed or (done / took if took > 0 else None)
            if speed:
                text += f" {decimal(int(speed))}/s"
            return Text(text, style="progress.download")
        shown = f"{done}" if total is None else f"{done}/{int(total)}"
        return Text(f"{shown} {unit}".rstrip(), style="progress.download")


class _Bar(ProgressColumn):
    """A bar for counted phases; none on the status line."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=30)

    def render(self, task: Task) -> RenderableType:
        if task.fields.get("status"):
            return Text("")
        return self._bar.render(task)


class LiveReporter:
    """A live display on a terminal: the current step, then a bar per phase."""

    def __init__(self, verbosity: Verbosity, console: Console) -> None:
        self._verbosity = verbosity
        self._console = console
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            _Bar(),
            _Amount(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._status = self._progress.add_task("", total=None, status=True)
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Show the display."""
        self._progress.start()

    def stop(self) -> None:
        """Stop the display, leaving the finished bars on screen (the status line goes)."""
        self._progress.remove_task(self._status)
        self._progress.stop()

    def step(self, message: str) -> None:
        """Show ``message`` as the current step (and, with ``-v``, as a line of its own)."""
        self._progress.update(self._status, description=f"[dim]{message}")
        if self._verbosity.verbose:
            self._console.print(f"· {message}", style="dim", highlight=False, markup=False)

    def warn(self, message: str) -> None:
        """Print ``warning: message`` above the bars."""
        self._console.print(f"warning: {message}", style="yellow", highlight=False, markup=False)

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        """Move ``task``'s bar; a phase that ended and starts again gets a new bar."""
        with self._lock:
            current = self._tasks.get(task)
            # A phase of unknown size (compile, in modules) starts again at 0 of None.
            again = done < total if total is not None else done == 0
            if current is None or (self._progress.tasks[self._index(current)].finished and again):
                current = self._progress.add_task(task, total=total, unit=unit)
                self._tasks[task] = current
        self._progress.update(current, completed=done, total=total)

    def _index(self, task: TaskID) -> int:
        return next(i for i, t in enumerate(self._progress.tasks) if t.id == task)


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that takes a live display."""
    return stream.isatty() and os.environ.get("TERM", "") != "dumb"


@contextmanager
def open_reporter(verbosity: Verbosity) -> Iterator[Reporter]:
    """The reporter for this run: live on a terminal (unless ``-q``), plain otherwise."""
    if verbosity.quiet or not is_terminal(sys.stderr):
        yield PlainReporter(verbosity)
        return
    live = LiveReporter(verbosity, Console(stderr=True, highlight=False))
    live.start()
    try:
        yield live
    finally:
        live.stop()

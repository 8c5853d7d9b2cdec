"""The live display on a terminal: the current step, then a bar per phase (rich)."""

from __future__ import annotations

import threading

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

    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        """``verbose`` (``-v``): every step also as a line of its own."""
        self._verbose = verbose
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
        if self._verbose:
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

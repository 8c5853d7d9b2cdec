"""SIGTERM unwinds a run as Ctrl-C does, so what it made on the way is removed.

``docker stop``, CI cancellations and ``kill`` send SIGTERM, whose default action ends the
process at once: temporary files (``.part``), the build's scratch tree and its compile
container would stay behind. Raised as ``KeyboardInterrupt`` instead, it runs every
``finally`` and context exit on the way out, as an interrupted build does.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """The run got SIGTERM (the CLI exits 143, as a shell reports it)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Terminated`` in the main thread.

    A second SIGTERM during the unwinding is ignored, so clean-up is not cut short. Off the
    main thread (where signals cannot be handled) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

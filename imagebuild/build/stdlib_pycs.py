"""The standard library's own pycs, linked under a build environment's bytecode prefix.

With ``PYTHONPYCACHEPREFIX`` set, Python looks for every module's pyc under the prefix
only, the standard library's too: a new environment's first hook compiled the 80 standard
modules hatchling imports (0.23 s of a FastAPI wheel's 0.38 s alone). The environment's
interpreter is the one running imgbuild (a venv of it), so its standard library's
``__pycache__`` serves. A hard link costs 15 microseconds on ext4 (a symbolic link, a new
inode, 250); where none can be made (an environment in memory, another filesystem, a
protected owner's files), a symbolic link is made instead, cheap on the memory filesystem.
Python replaces a stale pyc by renaming a new file over the link, never writing into it.
Where neither can be made, none is: the hooks then compile as before.

This module imports nothing of imgbuild: ``build.runner`` runs it as a script, in a
process of its own (``python -I -S stdlib_pycs.py PREFIX TAG STDLIB...``), so its thousand
system calls never wait for imgbuild's GIL while other threads run Python.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable

SKIPPED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})
"""Standard library directories whose pycs no hook needs."""


def link_all(prefix: str, tag: str, stdlibs: Iterable[str]) -> None:
    """Link each ``*<tag>`` pyc (no ``.opt-``) of ``stdlibs`` under ``prefix``.

    Each goes where Python looks for it there: ``<prefix>/<source directory>/<module><tag>``.
    """
    hard = True
    for stdlib in sorted(set(stdlibs)):
        for directory, children, files in os.walk(stdlib):
            children[:] = sorted(c for c in children if c not in SKIPPED)
            if os.path.basename(directory) != "__pycache__":
                continue
            target = os.path.join(prefix, os.path.dirname(directory).lstrip(os.sep))
            try:
                os.makedirs(target, exist_ok=True)
                for name in sorted(files):
                    if name.endswith(tag) and ".opt-" not in name:
                        source = os.path.join(directory, name)
                        hard = _link(source, os.path.join(target, name), hard=hard)
            except OSError:
                return


def _link(source: str, dest: str, *, hard: bool) -> bool:
    """Link ``dest`` to ``source``, hard when ``hard`` and possible, else symbolically.

    Whether the next link may be tried hard: after one fails, the rest would too (one
    failed call, not one per file). A symbolic link that cannot be made raises.
    """
    if hard:
        try:
            os.link(source, dest)
        except FileExistsError:
            return True
        except OSError:
            pass
        else:
            return True
    with contextlib.suppress(FileExistsError):
        os.symlink(source, dest)
    return False


if __name__ == "__main__":
    link_all(sys.argv[1], sys.argv[2], sys.argv[3:])

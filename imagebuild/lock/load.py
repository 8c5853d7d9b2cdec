"""The lock reader: find the lock next to a project and read it, once, into a ``Lock``."""

from __future__ import annotations

from pathlib import Path

import tomli

from imagebuild.errors import LockError
from imagebuild.lock.model import PYLOCK, UV_LOCK, Lock
from imagebuild.lock.uvlock import parse_uv_lock


def find_lock(project_dir: Path) -> Path | None:
    """The lock file next to the project: ``pylock.toml`` first, then ``uv.lock``."""
    for name in (PYLOCK, UV_LOCK):
        candidate = project_dir / name
        if candidate.is_file():
            return candidate
    return None


def load_lock(path: Path) -> Lock:
    """Read ``uv.lock`` or a ``pylock[.name].toml`` into a ``Lock``; ``LockError`` if invalid.

    An imgbuild pylock's ``[tool.imgbuild]`` record comes with it (``Lock.recorded``), so
    nothing downstream reads the file again.
    """
    try:
        data = tomli.loads(path.read_text(encoding="utf-8"))  # tomllib's parser, compiled
    except FileNotFoundError:
        raise LockError(f"{path}: no such lock file", hint="run 'uv lock' to create one") from None
    except OSError as exc:
        raise LockError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise LockError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except tomli.TOMLDecodeError as exc:
        raise LockError(f"{path}: invalid TOML: {exc}") from exc
    if path.name == UV_LOCK or ("package" in data and "lock-version" not in data):
        return parse_uv_lock(data, path=path)
    if "lock-version" in data or _pylock_named(path):
        # (imported here: a uv.lock, which most builds read, needs neither)
        from imagebuild.lock.pylock import parse_pylock

        return parse_pylock(data, path=path)
    raise LockError(
        f"{path}: not a lock file imgbuild knows",
        hint="use uv.lock or pylock.toml (PEP 751)",
    )


def _pylock_named(path: Path) -> bool:
    """Whether ``path`` is named as PEP 751 names locks (``pylock[.name].toml``)."""
    if not path.name.startswith("pylock."):
        return False  # every name the spec allows starts so: packaging's check not needed
    from packaging.pylock import is_valid_pylock_path

    return is_valid_pylock_path(path)

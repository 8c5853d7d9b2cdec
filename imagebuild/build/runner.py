"""The one subprocess runner: build backends and build-requirement installers run quietly.

A process's output is captured, never shown while it runs; when it fails, its output is
kept on the exception so the message can quote the line that says why (pypa/build's quiet
runner does the same). ``hook_runner`` gives pypa/build a runner of that kind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from imagebuild.build import stdlib_pycs
from imagebuild.build.resident import NotServed, run_resident


class Runner(Protocol):
    """pypa/build's subprocess runner (``ProjectBuilder(runner=...)``)."""

    def __call__(
        self,
        cmd: Sequence[str],
        cwd: str | None = None,
        extra_environ: Mapping[str, str] | None = None,
    ) -> None:
        """Run ``cmd`` in ``cwd`` with ``extra_environ`` added; raise if it fails."""
        ...


class ProcessFailed(Exception):
    """A subprocess exited non-zero; its captured output is kept for the message."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = tuple(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(self.last_line())

    def last_line(self, *, stdout: bool = True) -> str:
        """The last non-blank line of stderr (else of stdout, when ``stdout``), or ``exit N``."""
        for text in (self.stderr, self.stdout) if stdout else (self.stderr,):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return f"exit {self.returncode}"


BACKGROUND_NICENESS = 10
"""The niceness ``background_priority`` gives by default (0 is the default, 19 the lowest)."""


def background_priority(niceness: int = BACKGROUND_NICENESS) -> None:
    """Run this thread, and every process it starts from now on, at ``niceness``.

    Linux keeps a niceness per thread, and a process starts with that of the thread that
    started it. Where the thread cannot be named so (another system), or a niceness already
    above it was set, nothing changes.
    """
    try:
        thread = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, thread) < niceness:
            os.setpriority(os.PRIO_PROCESS, thread, niceness)
    except (OSError, AttributeError):
        pass


def run_captured(
    cmd: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run ``cmd`` with its output captured; its stdout, or ``ProcessFailed`` if it fails.

    ``env`` is the whole environment (None: this process's). A process still running after
    ``timeout`` seconds is killed and fails with ``timed out after N s``.
    """
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=None if env is None else dict(env),
            capture_output=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProcessFailed(cmd, -1, "", f"timed out after {exc.timeout:g} s") from None
    if proc.returncode != 0:
        raise ProcessFailed(
            cmd,
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )
    return proc.stdout.decode("utf-8", "replace")


def hook_runner(
    extra_env: Mapping[str, str] | None = None, *, resident: Path | None = None
) -> Runner:
    """A pypa/build runner that captures output as ``run_captured`` does.

    With ``resident`` (the resident server's directory), a hook is forked from a resident
    process that imported the backend (``build.resident``), when one answers.

    The environment is this process's, then pypa/build's additions, then ``extra_env``
    (``SOURCE_DATE_EPOCH``) over both. Bytecode goes under the build environment (the
    interpreter's ``<env>/bin/python`` -> ``<env>/.pycache``), never into the project's
    source tree, and is written even where ``PYTHONDONTWRITEBYTECODE`` is set (CI and
    container shells often set it): a kept environment's backend then starts from its pycs
    on every later build (hatchling building a wheel: 0.25 s without them, 0.12 s with).
    """
    fixed = dict(extra_env or {})

    def runner(
        cmd: Sequence[str], cwd: str | None = None, extra_environ: Mapping[str, str] | None = None
    ) -> None:
        env = {**os.environ, **(extra_environ or {}), **fixed}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode_prefix(Path(cmd[0]).parent.parent))
        if resident is not None and cwd is not None:
            try:
                status, stdout, stderr = run_resident(resident, cmd, cwd, env)
            except NotServed:
                pass
            else:
                if status != 0:
                    raise ProcessFailed(cmd, status, stdout, stderr)
                return
        run_captured(cmd, cwd=cwd, env=env)

    return runner


BYTECODE_DIR = ".pycache"
"""Where a build environment's hooks write bytecode: ``PYTHONPYCACHEPREFIX``."""
SEED_SECONDS = 60
"""How long linking the standard library's pycs may take before it is given up."""


def bytecode_prefix(env: Path) -> Path:
    """The ``PYTHONPYCACHEPREFIX`` of the hooks run by the environment ``env``."""
    return env / BYTECODE_DIR


def seed_standard_bytecode(env: Path) -> Callable[[], None]:
    """Start linking the standard library's pycs for ``env``; what waits for it to end.

    The links go under ``env``'s bytecode prefix (``build.stdlib_pycs``), made by a
    process of its own. The caller goes on meanwhile (a kept environment is fetched and
    unpacked). A process that cannot start, fails or takes over ``SEED_SECONDS`` leaves the
    links it made: the hooks compile what is missing.
    """
    paths = sysconfig.get_paths()
    command = [
        sys.executable, "-I", "-S", stdlib_pycs.__file__, str(bytecode_prefix(env)),
        f".{sys.implementation.cache_tag}.pyc", paths["stdlib"], paths["platstdlib"],
    ]  # fmt: skip
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError:
        return lambda: None

    def wait() -> None:
        try:
            process.wait(timeout=SEED_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    return wait

"""Layer contents: the venv skeleton, wheels installed in copy mode, and their bytecode.

Each layer is a staging directory that mirrors the image's filesystem from ``/``
(``staging/app/.venv/lib/...``). Wheels are spread with ``installer`` using container
paths for every scheme and the staging directory as ``destdir``, so scripts get a
``#!/app/.venv/bin/python`` shebang whatever the build host is.

Bytecode is compiled by an interpreter of the *target's* minor version, never by the
process running imgbuild: a host ``python3.X`` when one exists, otherwise the base
image's own Python run through the Docker engine (see ``daemon.py``). Either way the
compiler is a fresh process fed one file at a time in sorted order and writes
hash-based pycs, so the bytes are the same on every build (cpython#129724).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from imagebuild.errors import LayerError
from imagebuild.install.compilescript import (
    COMPILE_FLAGS,
    COMPILE_SCRIPT,
    compile_listing,
)

Sources = list[tuple[Path, PurePosixPath]]
"""Sources to compile, sorted: each with its path in the image (its pyc's ``co_filename``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VenvLayout:
    """Where the virtual environment lives in the image and which Python runs it."""

    root: PurePosixPath = PurePosixPath("/app/.venv")  # noqa: RUF009 (immutable)
    """The venv directory inside the image."""
    base_interpreter: PurePosixPath
    """The base image's Python, which ``bin/python`` links to."""
    python_version: tuple[int, int]
    """Target Python minor version."""

    @property
    def python(self) -> PurePosixPath:
        """The venv's interpreter path, used in script shebangs."""
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> PurePosixPath:
        """The venv's site-packages inside the image."""
        major, minor = self.python_version
        return self.root / "lib" / f"python{major}.{minor}" / "site-packages"

    def scheme(self) -> dict[str, str]:
        """The install scheme (pip/uv's venv layout) with container paths."""
        major, minor = self.python_version
        return {
            "purelib": str(self.site_packages),
            "platlib": str(self.site_packages),
            "scripts": str(self.root / "bin"),
            "data": str(self.root),
            "headers": str(self.root / "include" / "site" / f"python{major}.{minor}"),
        }


class BytecodeCompiler(Protocol):
    """Compiles sources below a work directory with the target interpreter."""

    @property
    def identity(self) -> str:
        """Names the exact interpreter: layers compiled by different ones are not shared."""

    def compile(self, root: Path, groups: Sequence[Sources]) -> int:
        """Write a pyc beside each ``(host path, in-image path)``; return how many failed.

        Each group (one layer's sources) is compiled by a fresh process of its own, so its
        pycs do not depend on the other groups. Every host path lies below ``root``, so one
        call can cover several staging trees.
        """


VERSION_PROBE = "import sys; print(sys.version.split()[0])"
COMPILE_SECONDS = 600.0
"""How long one compile (a layer's sources, or a build's) may take before it is given up:
a compiler that hangs must not hold a build, or a CI job, forever."""


class HostCompiler:
    """A host interpreter of the target's minor version, run as a fresh subprocess."""

    def __init__(
        self, executable: Path, *, probe: str = VERSION_PROBE, known: str | None = None
    ) -> None:
        """Start it once with ``probe``, a script that prints the full version last.

        ``version`` is empty when it did not start, failed, or took over a minute. ``known``:
        the version an earlier probe of the same command printed (it is not started then).
        """
        self.executable = executable
        if known:
            self._version = known
            return
        try:
            proc = subprocess.run(
                [*self.command(), *COMPILE_FLAGS, "-c", probe],
                capture_output=True,
                text=True,
                env=_compile_env(0),
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            self._version = ""
            return
        self._version = proc.stdout.strip() if proc.returncode == 0 else ""

    def command(self) -> list[str]:
        """What runs the interpreter (its path; a subclass may put a loader in front)."""
        return [str(self.executable)]

    @property
    def identity(self) -> str:
        """``host:`` and the interpreter's full version (pyc bytes follow patch releases)."""
        return f"host:{self._version}"

    def compile(self, root: Path, groups: Sequence[Sources], *, jobs: int = 0) -> int:
        """Compile with ``-I`` (isolated) so nothing from the host environment leaks in.

        ``jobs`` is how many worker processes share the groups (0: one per CPU, up to 8).
        """
        try:
            proc = subprocess.run(
                [*self.command(), *COMPILE_FLAGS, "-c", COMPILE_SCRIPT],
                input=compile_listing([[(str(s), str(d)) for s, d in group] for group in groups]),
                capture_output=True,
                text=True,
                env=_compile_env(jobs),
                timeout=COMPILE_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise _timed_out(self.executable) from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise LayerError(
                f"compiling bytecode with {self.executable} failed: {last}",
                hint="pass --no-compile to skip bytecode",
            )
        return int(proc.stdout.strip() or 0)

    def serve(self) -> CompileServer:
        """A running interpreter that compiles one listing after another (one worker each)."""
        return CompileServer(
            [*self.command(), *COMPILE_FLAGS, "-c", COMPILE_SCRIPT, "--serve"], self
        )


def _timed_out(executable: Path) -> LayerError:
    return LayerError(
        f"compiling bytecode with {executable} took over {COMPILE_SECONDS:.0f} s; it was stopped",
        hint="pass --no-compile to skip bytecode, or --compile-with to choose the compiler",
    )


def _compile_env(jobs: int) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}
    if jobs:
        env["IMGBUILD_COMPILE_JOBS"] = str(jobs)
    return env


class CompileServer:
    """The compile script kept running: a listing a line, its failures counted back.

    Starting the target's interpreter costs about a twentieth of a second; a build of many
    small layers would pay it once per layer. Each group is still compiled by a process
    forked for it alone, as in a one-off run, so the pycs are the same bytes.
    """

    def __init__(self, command: list[str], compiler: HostCompiler) -> None:
        self._compiler = compiler
        # Compile warnings (SyntaxWarning and the like) go to a file: a pipe nobody reads
        # could fill up and stall the server.
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=_compile_env(1),
        )

    def compile(self, groups: Sequence[Sources]) -> int:
        """Write a pyc beside each source of ``groups``; return how many failed."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        listing = compile_listing([[(str(s), str(d)) for s, d in group] for group in groups])
        try:
            self._proc.stdin.write(listing + "\n")
            self._proc.stdin.flush()
            # Nothing is buffered before the answer: the pipe itself says when it comes.
            ready, _, _ = select.select([self._proc.stdout], [], [], COMPILE_SECONDS)
            if not ready:
                self._proc.kill()
                raise _timed_out(self._compiler.executable)
            answer = self._proc.stdout.readline()
        except OSError:
            answer = ""
        if not answer.strip().isdigit():
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
            raise LayerError(
                f"compiling bytecode with {self._compiler.executable} failed: "
                f"{lines[-1] if lines else 'the compiler stopped'}",
                hint="pass --no-compile to skip bytecode",
            )
        return int(answer)

    def close(self) -> None:
        """Stop the interpreter (end of its input) and wait for it."""
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


def find_host_python(version: tuple[int, int]) -> Path | None:
    """A working host interpreter whose minor version equals the target's, if any.

    Candidates are probed, because a ``python3.X`` on PATH may be a shim (pyenv) that
    fails for a version that is not active; pyenv's own installs are looked at too.
    """
    if sys.version_info[:2] == version:
        return Path(sys.executable)
    name = f"python{version[0]}.{version[1]}"
    candidates = [shutil.which(name)]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(
        str(p) for p in pyenv_root.glob(f"versions/{version[0]}.{version[1]}.*/bin/{name}")
    )
    for candidate in candidates:
        if candidate and _reports_version(Path(candidate), version):
            return Path(candidate)
    return None


def _reports_version(executable: Path, version: tuple[int, int]) -> bool:
    try:
        proc = subprocess.run(
            [str(executable), "-I", "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return proc.returncode == 0 and proc.stdout.split() == [str(v) for v in version]


def stage_venv(staging: Path, venv: VenvLayout) -> None:
    """Write the venv skeleton: ``pyvenv.cfg``, ``bin/python*`` links, empty site-packages."""
    root = _host_path(staging, venv.root)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    _host_path(staging, venv.site_packages).mkdir(parents=True, exist_ok=True)
    major, minor = venv.python_version
    (root / "pyvenv.cfg").write_text(
        f"home = {venv.base_interpreter.parent}\n"
        "include-system-site-packages = false\n"
        f"version = {major}.{minor}\n"
        f"executable = {venv.base_interpreter}\n"
        "implementation = CPython\n"
        "prompt = app\n",
        encoding="utf-8",
    )
    # lib64 -> lib mirrors what CPython's venv creates on 64-bit POSIX.
    (root / "lib64").symlink_to("lib")
    (root / "bin" / "python").symlink_to(str(venv.base_interpreter))
    (root / "bin" / "python3").symlink_to("python")
    (root / "bin" / f"python{major}.{minor}").symlink_to("python")


def ready_installer() -> None:
    """Import what ``install_wheel`` uses now: installer, with its email and configparser.

    12 ms of imports. For a build whose last layer waits for a wheel still building: made
    while the backend runs, not once the wheel is there and the layer waits for them.
    """
    import installer.destinations  # noqa: F401
    import installer.sources  # noqa: F401

    import imagebuild.install.wheelcheck  # noqa: F401


def install_wheel(wheel: Path, staging: Path, venv: VenvLayout) -> None:
    """Spread one wheel into ``staging`` with container paths (copy mode, no pycs)."""
    # Imported here: `imgbuild lock` loads this module through pipeline but installs nothing.
    from zipfile import BadZipFile

    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.exceptions import InstallerError

    from imagebuild.install.wheelcheck import CheckedWheel

    destination = SchemeDictionaryDestination(
        venv.scheme(),
        interpreter=str(venv.python),
        script_kind="posix",
        # installer would compile with the host Python; bytecode is compile_tree's job.
        bytecode_optimization_levels=(),
        destdir=str(staging),
    )
    try:
        # Names and kinds are checked before anything is written, RECORD as files are.
        source = CheckedWheel.open_checked(wheel)
        try:
            install(source, destination, {"INSTALLER": b"imgbuild\n"})
        finally:
            source.close()
    except (InstallerError, ValueError, OSError, BadZipFile) as exc:
        raise LayerError(
            f"wheel {wheel.name}: cannot install ({exc})",
            hint="the wheel may be corrupt; clear it from the cache and rebuild",
        ) from exc


def compile_sources(staging: Path, venv: VenvLayout) -> Sources:
    """Every ``.py`` under the staged site-packages, sorted, with its path in the image."""
    site = _host_path(staging, venv.site_packages)
    files: list[tuple[Path, PurePosixPath]] = []
    for path in sorted(site.rglob("*.py")):
        if "__pycache__" in path.parts or not path.is_file() or path.is_symlink():
            continue
        inside = PurePosixPath("/") / path.relative_to(staging).as_posix()
        files.append((path, inside))
    return files


def compile_tree(staging: Path, venv: VenvLayout, compiler: BytecodeCompiler) -> int:
    """Compile every ``.py`` under the staged site-packages; return how many failed."""
    files = compile_sources(staging, venv)
    return compiler.compile(staging, [files]) if files else 0


def _host_path(staging: Path, inside: PurePosixPath) -> Path:
    return staging / str(inside).lstrip("/")

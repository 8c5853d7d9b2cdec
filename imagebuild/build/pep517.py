"""PEP 517 builds: the project, its local packages, and sdists, each into a wheel.

``build`` (pypa/build) calls the backend's hooks through ``pyproject-hooks`` with the
interpreter of an environment that holds exactly the backend's requirements
(``build-system.requires``, plus whatever ``get_requires_for_build_wheel`` adds). Those
are installed with uv (the binary of the ``uv`` package imgbuild depends on, so a
pip-installed imgbuild has it too; one on PATH if that is missing; pip as the last
resort, several times slower), from the same indexes the project
locks from: a project that names a private index never has its build backend fetched from
another one by name (the dependency-confusion hole), and a machine that only reaches a
mirror can still build.

Environments are kept under a cache directory, keyed by interpreter, installer, indexes
and requirements, and reused by every later build with the same backend (as uv keeps its
build environments): setting one up costs more than the build itself. Each is made aside
and renamed into place whole, so a killed build never leaves a half-made one. New ones are
made in memory instead when the cache has a place there (``cache.build_envs_memory``);
one already kept on disk is used where it is.

Beside a kept environment, ``get_requires_for_build_wheel``'s answer is kept too, keyed by
the environment and by the files backends compute it from (``pyproject.toml``,
``setup.py``, ``setup.cfg``): asking costs a process and the backend's import, about a
third of the project's build on a code change, and a code change does not alter the
answer. Each hook still runs in a fresh process of its own.

With a ``shared`` store (the registry cache of ``--cache-from``/``--cache-to``), a runner
that starts with an empty cache takes a kept environment's installed packages (their
bytecode and kept answers with them) instead of resolving and downloading the backend
again: a fresh venv of its own is made, and only the packages are unpacked into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from build import BuildBackendException, BuildException, ProjectBuilder
from filelock import FileLock
from uv import find_uv_bin

from imagebuild.build.resident import READY_MARKER
from imagebuild.build.runner import (
    ProcessFailed,
    Runner,
    hook_runner,
    run_captured,
    seed_standard_bytecode,
)
from imagebuild.build.secrets import SourcePolicy, check_wheel, filtered_copy, source_rules
from imagebuild.cache import forget_idle_trees, mark_used, write_json
from imagebuild.errors import BuildError, ProjectError
from imagebuild.net.credentials import IndexCredentials

# Index settings of the user's shell or config that would override ours in the installer.
_INDEX_VARIABLES = frozenset(
    {
        "UV_INDEX",
        "UV_DEFAULT_INDEX",
        "UV_INDEX_URL",
        "UV_EXTRA_INDEX_URL",
        "UV_FIND_LINKS",
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_FIND_LINKS",
        "PIP_NO_INDEX",
    }
)
# The files the usual backends derive dynamic build requirements from.
_REQUIRES_INPUTS = ("pyproject.toml", "setup.py", "setup.cfg")
_DECORATION = re.compile(r"^(?:[×╰─▶│\s]+|(?:caused by|cause):\s*)+", re.IGNORECASE)


class SharedEnvironments(Protocol):
    """Where build environments' packages are kept for other machines (``pipeline.buildenvs``)."""

    def fetch(self, key: str, env: Path, home: Path) -> bool:
        """Unpack what is kept under ``key`` into the fresh venv ``env``; False: nothing is.

        ``env`` is then moved to ``home``, where its bytecode is looked for.
        """
        ...

    def keep(self, key: str, env: Path) -> None:
        """Keep the packages of the venv ``env`` under ``key``, unless they are kept already."""
        ...


class RequirementsInstallError(Exception):
    """Installing build requirements failed; the message is the installer's last line."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildEnvironments:
    """Where build environments live and where their requirements come from."""

    indexes: tuple[str, ...]
    """Simple API URLs in priority order (the first that has a project wins, as in uv)."""
    root: Path | None = None
    """Directory of kept environments; None makes a throwaway one per build."""
    memory: Path | None = None
    """Where new kept environments are made instead of ``root`` (in memory); None: ``root``."""
    credentials: IndexCredentials | None = None
    """The indexes' credentials, put into their URLs only for the installer process."""
    resident: Path | None = None
    """Where resident backend processes listen (``build.resident``); None: none is used."""
    shared: SharedEnvironments | None = None
    """Environments kept for other machines, taken before one is made here; None: none."""
    used: dict[str, Path] = field(default_factory=dict)
    """The kept environments this build used, by key (what ``share`` keeps)."""

    @contextmanager
    def builder(self, source: Path, runner: Runner) -> Iterator[ProjectBuilder]:
        """A ``ProjectBuilder`` for ``source`` whose interpreter has its build requirements.

        Raises ``RequirementsInstallError`` when they cannot be installed; pypa/build's own
        errors (a bad ``[build-system]``, a failing hook) pass through.
        """
        requires = ProjectBuilder(source, runner=runner).build_system_requires
        with self._environment(requires) as python:
            builder = ProjectBuilder(source, python_executable=str(python), runner=runner)
            extra = self._dynamic_requires(builder, source, python) - requires
            if not extra:
                yield builder
                return
        # Dynamic requirements (setuptools' `wheel`, say): an environment of their own, so
        # a kept environment always holds exactly what its key says.
        with self._environment(requires | extra) as python:
            yield ProjectBuilder(source, python_executable=str(python), runner=runner)

    def _dynamic_requires(self, builder: ProjectBuilder, source: Path, python: Path) -> set[str]:
        """``get_requires_for_build_wheel`` of ``source`` in the environment of ``python``.

        In a kept environment the answer is kept (see the module doc); a record that does
        not read back as a list of strings is asked again.
        """
        if self.root is None:
            return builder.get_requires_for_build("wheel")
        key = hashlib.sha256()
        for name in _REQUIRES_INPUTS:
            path = source / name
            key.update(f"\0{name}\0".encode())
            if path.is_file():
                key.update(path.read_bytes())
        # Kept inside the environment (``<env>/bin/python``): they go when it goes.
        record = python.parent.parent / ".imgbuild-requires" / f"{key.hexdigest()[:32]}.json"
        try:
            kept = json.loads(record.read_text())
        except (OSError, ValueError):
            kept = None
        if isinstance(kept, list) and all(isinstance(item, str) for item in kept):
            return set(kept)
        answer = builder.get_requires_for_build("wheel")
        write_json(record, sorted(answer), durable=False)  # asked again unless whole
        return answer

    @contextmanager
    def _environment(self, requires: set[str]) -> Iterator[Path]:
        uv = find_uv()
        if self.root is None:
            with tempfile.TemporaryDirectory(prefix="imgbuild-build-env-") as tmp:
                env = Path(tmp) / "env"
                self._create(env, requires, uv)
                yield env / "bin" / "python"
            return
        yield self._kept(requires, uv)

    def _kept(self, requires: set[str], uv: str | None) -> Path:
        assert self.root is not None
        installer = "pip" if uv is None else "uv"
        key = hashlib.sha256(
            "\n".join([sys.version, installer, *self.indexes, "", *sorted(requires)]).encode()
        ).hexdigest()[:24]
        home = self.root
        if self.memory is not None and not (home / key / READY_MARKER).is_file():
            home = self.memory
        env_dir = home / key
        python = env_dir / "bin" / "python"
        ready = env_dir / READY_MARKER
        self.used[key] = env_dir
        if ready.is_file():
            mark_used(env_dir)  # in memory, what keeps it from being forgotten as idle
            return python
        home.mkdir(parents=True, exist_ok=True)
        with FileLock(str(home / f"{key}.lock")):
            if ready.is_file():
                return python
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=home))
            try:
                self._venv(staging, uv)
                seeded = seed_standard_bytecode(staging)  # in its own process, meanwhile
                try:
                    if self.shared is None or not self.shared.fetch(key, staging, env_dir):
                        self._install_requires(staging, requires, uv)
                finally:
                    seeded()
                (staging / READY_MARKER).write_text("")
                shutil.rmtree(env_dir, ignore_errors=True)
                staging.rename(env_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        if home == self.memory:
            forget_idle_trees(home)
        return python

    def share(self) -> None:
        """Keep the environments this build used for other machines (``shared``)."""
        if self.shared is None:
            return
        for key, env in sorted(self.used.items()):
            if (env / READY_MARKER).is_file():
                self.shared.keep(key, env)

    def _create(self, env: Path, requires: set[str], uv: str | None) -> None:
        self._venv(env, uv)
        seeded = seed_standard_bytecode(env)
        try:
            self._install_requires(env, requires, uv)
        finally:
            seeded()

    @staticmethod
    def _venv(env: Path, uv: str | None) -> None:
        if uv is None:  # pip installs the requirements: the venv gets it
            _install([sys.executable, "-m", "venv", str(env)])
            return
        # uv installs them: the venv alone is made here, by the standard library's venv
        # (2 ms), not by starting uv (20 ms alone, 0.1 s on a busy CI runner's longest chain).
        try:
            venv.EnvBuilder(symlinks=True, with_pip=False).create(str(env))
        except OSError as exc:
            raise RequirementsInstallError(f"venv: {exc}") from exc

    def _install_requires(self, env: Path, requires: set[str], uv: str | None) -> None:
        if not requires:
            return
        python = str(env / "bin" / "python")
        environ = {k: v for k, v in os.environ.items() if k not in _INDEX_VARIABLES}
        indexes = self._installer_indexes()
        if uv is not None:
            cmd = [uv, "pip", "install", "--quiet", "--no-config", "--python", python]
            # uv consults --index entries in order, then the default index.
            environ["UV_DEFAULT_INDEX"] = indexes[-1]
            if len(indexes) > 1:
                environ["UV_INDEX"] = " ".join(indexes[:-1])
        else:
            cmd = [python, "-m", "pip", "install", "--quiet"]
            environ["PIP_INDEX_URL"] = indexes[0]
            if len(indexes) > 1:
                environ["PIP_EXTRA_INDEX_URL"] = " ".join(indexes[1:])
        _install([*cmd, *sorted(requires)], environ)

    def _installer_indexes(self) -> tuple[str, ...]:
        # The one place credentials go into URLs: the installer is another process, which
        # cannot share our httpx auth flow, and reads them from its index URLs only (in its
        # environment, never on its command line). Everywhere else they stay in the auth.
        if self.credentials is None:
            return self.indexes
        return tuple(self.credentials.authenticated(url) for url in self.indexes)


def find_uv() -> str | None:
    """The uv binary: the ``uv`` package's, else one on PATH; None: make do with pip."""
    try:
        return find_uv_bin()
    except FileNotFoundError:
        # A platform the uv package ships no binary for installs it without one.
        return shutil.which("uv")


def build_project_wheel(
    project_dir: Path,
    out_dir: Path,
    *,
    source_date_epoch: int,
    envs: BuildEnvironments,
    policy: SourcePolicy | None = None,
) -> Path:
    """Build ``project_dir`` into a wheel in ``out_dir`` and return its path.

    With a ``policy`` (``build.secrets``), the backend sees only what ``.dockerignore`` and
    the policy's ``exclude`` keep, and a wheel that would ship a secret is refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if policy is None:
        return _build_wheel(project_dir, out_dir, project_dir, source_date_epoch, envs)
    rules = source_rules(project_dir, policy)
    if not rules:
        wheel = _build_wheel(project_dir, out_dir, project_dir, source_date_epoch, envs)
    else:
        with tempfile.TemporaryDirectory(prefix=".source-", dir=out_dir.parent) as tmp:
            source = filtered_copy(project_dir, Path(tmp) / project_dir.name, rules)
            wheel = _build_wheel(source, out_dir, project_dir, source_date_epoch, envs)
    try:
        check_wheel(wheel, policy, source_dir=project_dir)
    except ProjectError:
        wheel.unlink(missing_ok=True)
        raise
    return wheel


def _build_wheel(
    source: Path, out_dir: Path, project_dir: Path, source_date_epoch: int, envs: BuildEnvironments
) -> Path:
    """Run the backend on ``source`` (``project_dir`` or a filtered copy of it)."""
    where = project_dir / "pyproject.toml"
    # A filtered copy is a new directory each build: no resident backend would serve twice.
    resident = envs.resident if source == project_dir else None
    runner = hook_runner({"SOURCE_DATE_EPOCH": str(source_date_epoch)}, resident=resident)
    try:
        with envs.builder(source, runner) as builder:
            return Path(builder.build("wheel", out_dir))
    except ProcessFailed as exc:
        raise _backend_failed(where, exc) from None
    except RequirementsInstallError as exc:
        raise BuildError(
            f"{where}: installing the build requirements failed: {exc}",
            hint="check [build-system] requires and that the project's indexes serve them",
        ) from exc
    except BuildBackendException as exc:
        if isinstance(exc.exception, ProcessFailed):
            # pypa/build wraps what our runner raised: report the runner's line, once.
            raise _backend_failed(where, exc.exception) from None
        raise BuildError(
            f"{where}: cannot build the project into a wheel ({exc.exception!r})",
            hint="check [build-system] in pyproject.toml",
        ) from exc
    except (BuildException, subprocess.CalledProcessError) as exc:
        raise BuildError(
            f"{where}: cannot build the project into a wheel ({exc})",
            hint="check [build-system] in pyproject.toml",
        ) from exc


def _backend_failed(where: Path, exc: ProcessFailed) -> BuildError:
    return BuildError(
        f"{where}: the build backend failed: {exc.last_line()}",
        hint="run 'python -m build --wheel' in the project to see the full output",
    )


def _install(cmd: list[str], environ: Mapping[str, str] | None = None) -> None:
    """Run a step of making an environment; ``RequirementsInstallError`` naming the tool."""
    try:
        run_captured(cmd, env=environ)
    except ProcessFailed as exc:
        # uv's report ends on the reason, drawn as "╰─▶ …" or "Caused by: …".
        last = exc.last_line(stdout=False)
        last = last if last.startswith("exit ") else _DECORATION.sub("", last)
        raise RequirementsInstallError(f"{Path(cmd[0]).name}: {last}") from exc

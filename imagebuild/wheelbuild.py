"""Build the project itself into a wheel through its PEP 517 backend, in isolation.

``build`` (pypa/build) calls the hooks through ``pyproject-hooks`` in an environment that
holds only the backend's ``build-system.requires`` (installed with uv when it is on PATH,
pip otherwise). The wheel is then installed like any other, so the image never holds an
editable install or a link back to the build host.

With ``env_cache``, the build environment is kept, keyed by the requirements and the
interpreter, and reused by the next build of any project with the same backend (as uv
keeps its build environments): setting one up costs more than the build itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from build import BuildBackendException, BuildException, ProjectBuilder
from build.env import DefaultIsolatedEnv

from imagebuild.errors import BuildError


def build_project_wheel(
    project_dir: Path, out_dir: Path, *, source_date_epoch: int, env_cache: Path | None = None
) -> Path:
    """Build ``project_dir`` into a wheel in ``out_dir`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extra_env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)}
    installer: Literal["pip", "uv"] = "uv" if shutil.which("uv") else "pip"

    def runner(
        cmd: Sequence[str], cwd: str | None = None, extra_environ: Mapping[str, str] | None = None
    ) -> None:
        merged = {**os.environ, **(extra_environ or {}), **extra_env}
        proc = subprocess.run(list(cmd), cwd=cwd, env=merged, capture_output=True, check=False)
        if proc.returncode != 0:
            output = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
            raise BuildError(
                f"{project_dir / 'pyproject.toml'}: the build backend failed: "
                + (output.splitlines()[-1] if output else f"exit {proc.returncode}"),
                hint="run 'python -m build --wheel' in the project to see the full output",
            )

    try:
        if env_cache is not None:
            requires = ProjectBuilder(project_dir).build_system_requires
            python = _cached_env(env_cache, requires, installer)
            builder = ProjectBuilder(project_dir, python_executable=str(python), runner=runner)
            extra = builder.get_requires_for_build("wheel") - requires
            if extra:  # dynamic requirements (rare): installed into the kept env too
                _install(python, extra, installer)
            return Path(builder.build("wheel", out_dir))
        with DefaultIsolatedEnv(installer=installer) as env:
            builder = ProjectBuilder.from_isolated_env(env, project_dir, runner=runner)
            env.install(builder.build_system_requires)
            env.install(builder.get_requires_for_build("wheel"))
            return Path(builder.build("wheel", out_dir))
    except BuildError:
        raise
    except BuildBackendException as exc:
        if isinstance(exc.exception, BuildError):
            # pypa/build wraps what our runner raised: report the runner's line, once.
            raise exc.exception from None
        raise BuildError(
            f"{project_dir / 'pyproject.toml'}: cannot build the project into a wheel "
            f"({exc.exception!r})",
            hint="check [build-system] in pyproject.toml",
        ) from exc
    except (BuildException, subprocess.CalledProcessError) as exc:
        raise BuildError(
            f"{project_dir / 'pyproject.toml'}: cannot build the project into a wheel ({exc})",
            hint="check [build-system] in pyproject.toml",
        ) from exc


def _cached_env(root: Path, requires: set[str], installer: Literal["pip", "uv"]) -> Path:
    """The interpreter of a kept build environment for ``requires``, created if needed."""
    import hashlib
    import sys
    import tempfile

    from filelock import FileLock

    key = hashlib.sha256(
        "\n".join([sys.version, installer, *sorted(requires)]).encode()
    ).hexdigest()[:24]
    env_dir = root / key
    python = env_dir / "bin" / "python"
    ready = env_dir / ".imgbuild-ready"
    if ready.is_file():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if ready.is_file():
            return python
        # Built aside and renamed, so a killed build never leaves a half-made environment.
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            if installer == "uv":
                _run(
                    [
                        shutil.which("uv") or "uv",
                        "venv",
                        "--quiet",
                        "--python",
                        sys.executable,
                        str(staging),
                    ]
                )
            else:
                _run([sys.executable, "-m", "venv", str(staging)])
            _install(staging / "bin" / "python", requires, installer)
            (staging / ".imgbuild-ready").write_text("")
            shutil.rmtree(env_dir, ignore_errors=True)
            staging.rename(env_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return python


def _install(python: Path, requirements: set[str], installer: Literal["pip", "uv"]) -> None:
    if not requirements:
        return
    if installer == "uv":
        cmd = [shutil.which("uv") or "uv", "pip", "install", "--quiet", "--python", str(python)]
    else:
        cmd = [str(python), "-m", "pip", "install", "--quiet"]
    _run([*cmd, *sorted(requirements)])


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise BuildError(
            f"setting up the build environment failed ({cmd[0]}): {last}",
            hint="check [build-system] requires and that the index is reachable",
        )

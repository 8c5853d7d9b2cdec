"""Build the project itself into a wheel through its PEP 517 backend, in isolation.

``build`` (pypa/build) creates a throwaway environment, installs the backend's
``build-system.requires`` into it (with uv when it is on PATH, pip otherwise) and calls
the hooks through ``pyproject-hooks``. The wheel is then installed like any other, so the
image never holds an editable install or a link back to the build host.
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


def build_project_wheel(project_dir: Path, out_dir: Path, *, source_date_epoch: int) -> Path:
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
        with DefaultIsolatedEnv(installer=installer) as env:
            builder = ProjectBuilder.from_isolated_env(env, project_dir, runner=runner)
            env.install(builder.build_system_requires)
            env.install(builder.get_requires_for_build("wheel"))
            return Path(builder.build("wheel", out_dir))
    except BuildError:
        raise
    except (BuildException, BuildBackendException, subprocess.CalledProcessError) as exc:
        raise BuildError(
            f"{project_dir / 'pyproject.toml'}: cannot build the project into a wheel ({exc})",
            hint="check [build-system] in pyproject.toml",
        ) from exc

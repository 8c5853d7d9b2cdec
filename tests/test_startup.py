"""What a build imports before its first step: only the code every build runs.

Each ``imgbuild build`` starts a new interpreter (scripts and CI runners have no server), and
the modules it imports are most of a code change's CPU on a CI runner. Code for what only
some builds meet (git sources, sdists, a pylock.toml, a base published for several
platforms, the lock writer's tomlkit) is imported where it is used.
"""

from __future__ import annotations

import subprocess
import sys

# What ``cli.build`` imports, then ``run_build`` on its way to the base and the layers.
_BUILD_PATH = (
    "imagebuild.cli",
    "imagebuild.net.http",
    "imagebuild.pipeline.build",
    "imagebuild.pipeline.platform",
    "imagebuild.pipeline.local",
    "imagebuild.pipeline.layers",
    "imagebuild.sinks.remote",
    "imagebuild.sinks.layout",
)

_NOT_ON_IT = (
    "imagebuild.pipeline.direct",
    "imagebuild.build.git",
    "imagebuild.build.direct",
    "imagebuild.build.sdist",
    "imagebuild.lock.pylock",
    "imagebuild.pipeline.published",
    "imagebuild.debian.libdirs",
    "imagebuild.install.scripts",
    "imagebuild.pipeline.lock",
    "packaging.pylock",
    "tomlkit",
)


def test_a_build_imports_no_code_for_sources_it_does_not_have() -> None:
    report = "import importlib, sys\n"
    report += "".join(f"importlib.import_module({name!r})\n" for name in _BUILD_PATH)
    report += "print('\\n'.join(sorted(sys.modules)))"
    imported = set(_python(report).split())
    assert set(_BUILD_PATH) <= imported  # (the probe ran)
    assert imported.isdisjoint(_NOT_ON_IT), sorted(imported & set(_NOT_ON_IT))


def test_the_installer_is_imported_while_the_project_wheel_builds() -> None:
    """``install_wheel``'s imports (12 ms) are not made at start (``imgbuild lock`` installs
    nothing); ``ready_installer``, called while the project's backend runs, makes them."""
    script = (
        "import sys\n"
        "import imagebuild.pipeline.platform\n"
        "print('installer' in sys.modules)\n"
        "from imagebuild.install.layers import ready_installer\n"
        "ready_installer()\n"
        "print(all(m in sys.modules for m in ('installer.destinations', 'installer.sources')))\n"
    )
    assert _python(script).split() == ["False", "True"]


def test_a_compile_server_started_by_the_build_process_stops_at_its_exit() -> None:
    """A code change's build makes its one layer itself: its compile server is stopped by
    ``atexit`` (which ``cli.main`` runs), without importing multiprocessing for it."""
    script = (
        "import atexit, os, sys\n"
        "from pathlib import Path\n"
        "from imagebuild.install.layers import HostCompiler\n"
        "from imagebuild.pipeline import layerwork\n"
        "server = layerwork._compile_server(HostCompiler(Path(sys.executable)))\n"
        "print('multiprocessing' in sys.modules, server._proc.poll(), flush=True)\n"
        "atexit._run_exitfuncs()\n"
        "print(server._proc.poll(), flush=True)\n"
        "os._exit(0)\n"
    )
    before, after = _python(script).splitlines()
    assert before == "False None"  # running, and multiprocessing not imported
    assert after == "0"  # stopped at exit, its input closed


def _python(script: str) -> str:
    """What ``script`` prints, run by a new interpreter of this one."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout

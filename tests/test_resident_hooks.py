"""PEP 517 hooks forked from a resident backend process (``build.resident``), as real
processes: a real environment, a real backend module in it, pypa/build calling the hooks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from build import BuildBackendException, ProjectBuilder

from imagebuild.build import resident
from imagebuild.build.runner import ProcessFailed, hook_runner

# The backend logs every import of itself and of its helper (by pid), and what each hook saw.
BACKEND = """
import json, os, zipfile

def _log(what):
    with open(os.environ["HOOK_LOG"], "a") as log:
        log.write(json.dumps([what, os.getpid(), os.getppid()]) + "\\n")

_log("import backend")
calls = 0

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    global calls
    calls += 1
    import tiny_backend_helper  # imported by the first hook only, then by the resident
    _log(["hook", calls, os.environ.get("LEFT_BY_A_HOOK"), os.getcwd()])
    os.environ["LEFT_BY_A_HOOK"] = "yes"
    if os.path.exists("fail"):
        raise ValueError("asked to fail")
    name = "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        wheel.writestr("tiny-1.0.dist-info/METADATA", "Metadata-Version: 2.1\\nName: tiny\\n")
    return name
"""
HELPER = """
import json, os
with open(os.environ["HOOK_LOG"], "a") as log:
    log.write(json.dumps(["import helper", os.getpid(), os.getppid()]) + "\\n")
"""


def _log(path: Path) -> list[list[object]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path, Path]]:
    """A kept-style environment holding the backend, a project using it, a private home."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python3.*/site-packages"))
    (site / "tiny_backend.py").write_text(BACKEND)
    (site / "tiny_backend_helper.py").write_text(HELPER)
    (env / ".imgbuild-ready").write_text("")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "tiny_backend"\n'
    )
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hooks.log"))
    monkeypatch.setattr(resident, "IDLE_SECONDS", 60)
    yield env / "bin" / "python", project, home
    for what, pid, _ in _log(tmp_path / "hooks.log"):
        if what == "import backend":
            try:
                os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
            except ProcessLookupError:
                pass


def _build(python: Path, project: Path, home: Path | None, out: Path) -> Path:
    builder = ProjectBuilder(
        project, python_executable=str(python), runner=hook_runner(resident=home)
    )
    return Path(builder.build("wheel", out))


def _wait_for_socket(home: Path) -> None:
    deadline = time.monotonic() + 30
    while not list(home.glob("hooks-*.sock")):
        assert time.monotonic() < deadline, "no resident backend process came up"
        time.sleep(0.02)


def test_hooks_fork_from_a_resident_process_each_in_a_fresh_one(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    python, project, home = setup
    log = tmp_path / "hooks.log"
    # No resident process yet: the hook runs in a new process, and one is started.
    assert _build(python, project, home, tmp_path / "a").name == "tiny-1.0-py3-none-any.whl"
    _wait_for_socket(home)
    for _ in range(50):  # the resident process logs its own import of the backend
        if sum(1 for entry in _log(log) if entry[0] == "import backend") == 2:
            break
        time.sleep(0.05)
    imports = [pid for what, pid, _ in _log(log) if what == "import backend"]
    assert len(imports) == 2
    first = next(pid for what, pid, _ in _log(log) if what[0] == "hook")
    (resident_pid,) = set(imports) - {first}  # they start side by side, in either order
    for run in ("b", "c", "d"):
        assert _build(python, project, home, tmp_path / run).is_file()
    entries = _log(log)
    hooks = [entry for entry in entries if entry[0][0] == "hook"]  # type: ignore[index]
    # Four hooks: the first in its own process, the next three forked from the resident one.
    assert len(hooks) == 4
    assert all(parent == resident_pid for _, _, parent in hooks[1:]), entries
    assert len({pid for _, pid, _ in hooks}) == 4
    # Each began as a fresh process would: the backend's globals and environment as imported,
    # whatever the hook before it changed; in the project directory.
    for what, _, _ in hooks:
        assert what == ["hook", 1, None, str(project)]  # type: ignore[comparison-overlap]
    # The backend was imported twice in all (first hook, resident); its helper, imported by
    # the hooks, was learned by the resident process after the first forked hook.
    helpers = [(pid, parent) for what, pid, parent in entries if what == "import helper"]
    assert [pid for pid, _ in helpers] == [hooks[0][1], hooks[1][1], resident_pid]


def test_a_failing_hook_fails_as_in_a_process_of_its_own(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    python, project, home = setup
    _build(python, project, home, tmp_path / "a")
    _wait_for_socket(home)
    (project / "fail").write_text("")
    failures = []
    for where in (home, None):  # forked from the resident process, then in a new one
        with pytest.raises(BuildBackendException) as info:
            _build(python, project, where, tmp_path / "b")
        cause = info.value.exception  # pypa/build wraps what the runner raised
        assert isinstance(cause, ProcessFailed)
        failures.append((cause.returncode, cause.last_line()))
    assert failures[0] == failures[1] == (1, "ValueError: asked to fail")


def test_what_names_a_resident_process(tmp_path: Path) -> None:
    python = tmp_path / "env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    cmd = [str(python), "/x/_in_process.py", "build_wheel", "/tmp/control"]
    env = {"_PYPROJECT_HOOKS_BUILD_BACKEND": "hatchling.build", "PATH": "/bin"}
    assert resident.resident_name(cmd, str(tmp_path), env) is None  # not a kept environment
    (tmp_path / "env" / ".imgbuild-ready").write_text("")
    name = resident.resident_name(cmd, str(tmp_path), env)
    assert name is not None
    # Another control directory (each hook has its own) or hook: the same process.
    assert (
        resident.resident_name([*cmd[:2], "get_requires_for_build_wheel", "/t"], str(tmp_path), env)
        == name
    )
    # Anything the process would be started with: another one.
    assert resident.resident_name(cmd, str(tmp_path / "other"), env) != name
    assert resident.resident_name(cmd, str(tmp_path), {**env, "PATH": "/usr/bin"}) != name
    # An in-tree backend is the project's code: never resident.
    in_tree = {**env, "_PYPROJECT_HOOKS_BACKEND_PATH_JSON": '["."]'}
    assert resident.resident_name(cmd, str(tmp_path), in_tree) is None


def test_without_a_home_every_hook_gets_a_new_process(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    python, project, home = setup
    for run in ("a", "b"):
        _build(python, project, None, tmp_path / run)
    assert not list(home.iterdir())
    hooks = [entry for entry in _log(tmp_path / "hooks.log") if entry[0][0] == "hook"]  # type: ignore[index]
    assert [parent for _, _, parent in hooks] == [os.getpid(), os.getpid()]

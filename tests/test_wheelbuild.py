"""Build environments: the backend's requirements come from the project's indexes only.

The backend here is a wheel that only the local index serves (``ib-local-backend``), so a
build succeeds only if its environment was installed from that index, with real uv.
"""

from __future__ import annotations

import json
import json.decoder
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from importlib.util import cache_from_source
from pathlib import Path

import pytest
from uv import find_uv_bin

from imagebuild.build.pep517 import BuildEnvironments, build_project_wheel, find_uv
from imagebuild.build.runner import seed_standard_bytecode
from imagebuild.build.stdlib_pycs import link_all
from imagebuild.errors import BuildError
from tests.fixtures.index_server import LocalIndex

# A PEP 517 backend in one module: the wheel holds the project's `<dist>.py` and a
# `<dist>_backend.txt` naming the backend release that built it.
_BACKEND = """\
import base64, hashlib, os, time, tomllib, zipfile

RELEASE = {release!r}


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    dist = project["name"].replace("-", "_")
    version = project["version"]
    info = f"{{dist}}-{{version}}.dist-info"
    with open(f"{{dist}}.py", "rb") as f:
        files = {{f"{{dist}}.py": f.read()}}
    files[f"{{dist}}_backend.txt"] = RELEASE.encode()
    files[f"{{info}}/METADATA"] = (
        f"Metadata-Version: 2.1\\nName: {{project['name']}}\\nVersion: {{version}}\\n"
    ).encode()
    files[f"{{info}}/WHEEL"] = b"Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{{path}},sha256={{digest}},{{len(data)}}\\n")
    files[f"{{info}}/RECORD"] = ("".join(lines) + f"{{info}}/RECORD,,\\n").encode()
    name = f"{{dist}}-{{version}}-py3-none-any.whl"
    # Dated by SOURCE_DATE_EPOCH, as real backends do (zip times start in 1980): the same
    # sources give the same bytes, whenever they are built.
    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), 315532800)
    stamp = time.gmtime(epoch)[:6]
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, date_time=stamp), data)
    return name
"""


def serve_backend(index: LocalIndex, version: str) -> None:
    index.add_wheel(
        "ib-local-backend",
        version,
        files={"ib_local_backend.py": _BACKEND.format(release=f"{version} from {index.url}")},
    )


def make_project(root: Path, requires: str = '"ib-local-backend"') -> Path:
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [project]
        name = "uses-local-backend"
        version = "1.0"

        [build-system]
        requires = [{requires}]
        build-backend = "ib_local_backend"
        """)
    )
    (root / "uses_local_backend.py").write_text("VALUE = 1\n")
    return root


def built_by(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read("uses_local_backend_backend.txt").decode()


@pytest.fixture
def other_index(tmp_path: Path) -> LocalIndex:
    with LocalIndex(tmp_path / "other-index") as index:
        yield index


def test_backend_comes_from_the_project_index_and_the_environment_is_kept(
    fresh_index: LocalIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_backend(fresh_index, "1.0")
    # Index settings of the user's shell must not redirect the build requirements.
    monkeypatch.setenv("UV_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    envs = BuildEnvironments(indexes=(fresh_index.url,), root=tmp_path / "envs")
    project = make_project(tmp_path / "project")

    wheel = build_project_wheel(project, tmp_path / "out", source_date_epoch=0, envs=envs)
    assert wheel.name == "uses_local_backend-1.0-py3-none-any.whl"
    assert built_by(wheel) == f"1.0 from {fresh_index.url}"
    wheel_gets = fresh_index.count("/files/ib_local_backend-1.0-py3-none-any.whl")
    assert wheel_gets >= 1

    # The next build reuses the kept environment: nothing is installed again.
    again = build_project_wheel(project, tmp_path / "out2", source_date_epoch=0, envs=envs)
    assert built_by(again) == built_by(wheel)
    assert fresh_index.count("/files/ib_local_backend-1.0-py3-none-any.whl") == wheel_gets
    assert len([p for p in (tmp_path / "envs").iterdir() if p.is_dir()]) == 1


# The same backend with a get_requires_for_build_wheel that logs each call in the source.
_ASKING = """
def get_requires_for_build_wheel(config_settings=None):
    with open("requires-asked.log", "a") as f:
        f.write("asked\\n")
    return []
"""


def test_dynamic_requirements_are_asked_again_only_when_the_build_config_changes(
    fresh_index: LocalIndex, tmp_path: Path
) -> None:
    """A code change skips the backend's get_requires process; a pyproject change does not."""
    fresh_index.add_wheel(
        "ib-local-backend",
        "1.1",
        files={"ib_local_backend.py": _BACKEND.format(release="1.1") + _ASKING},
    )
    envs = BuildEnvironments(indexes=(fresh_index.url,), root=tmp_path / "envs")
    project = make_project(tmp_path / "project")
    log = project / "requires-asked.log"

    def build(n: int) -> str:
        wheel = build_project_wheel(project, tmp_path / f"out{n}", source_date_epoch=0, envs=envs)
        with zipfile.ZipFile(wheel) as zf:
            return zf.read("uses_local_backend.py").decode()

    assert build(1) == "VALUE = 1\n"
    assert log.read_text() == "asked\n"
    (project / "uses_local_backend.py").write_text("VALUE = 2\n")
    assert build(2) == "VALUE = 2\n"
    assert log.read_text() == "asked\n"
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n[tool.other]\nx = 1\n")
    assert build(3) == "VALUE = 2\n"
    assert log.read_text() == "asked\nasked\n"
    # A throwaway environment has nowhere to keep the answer: it asks every time.
    build_project_wheel(
        project,
        tmp_path / "out4",
        source_date_epoch=0,
        envs=BuildEnvironments(indexes=(fresh_index.url,)),
    )
    assert log.read_text() == "asked\nasked\nasked\n"


def test_the_backends_bytecode_is_kept_in_its_environment_not_in_the_project(
    fresh_index: LocalIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the shell says not to write bytecode (CI often does), the kept environment
    still gets its backend's pycs, under the environment: none land in the source tree."""
    serve_backend(fresh_index, "1.0")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    envs = BuildEnvironments(indexes=(fresh_index.url,), root=tmp_path / "envs")
    project = make_project(tmp_path / "project")
    build_project_wheel(project, tmp_path / "out", source_date_epoch=0, envs=envs)
    (env,) = [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
    kept = sorted(p.name for p in (env / ".pycache").rglob("*.pyc"))
    assert any(name.startswith("ib_local_backend.") for name in kept)
    assert not list(project.rglob("__pycache__")) and not list(project.rglob("*.pyc"))


def test_first_index_that_has_the_backend_wins(
    fresh_index: LocalIndex, other_index: LocalIndex, tmp_path: Path
) -> None:
    """uv's first-index rule: a newer release on a later index is not taken."""
    serve_backend(fresh_index, "1.0")
    serve_backend(other_index, "2.0")
    project = make_project(tmp_path / "project")
    first = BuildEnvironments(indexes=(fresh_index.url, other_index.url), root=tmp_path / "a")
    wheel = build_project_wheel(project, tmp_path / "out-a", source_date_epoch=0, envs=first)
    assert built_by(wheel) == f"1.0 from {fresh_index.url}"
    # The other order gives the other index's release (and another kept environment).
    second = BuildEnvironments(indexes=(other_index.url, fresh_index.url), root=tmp_path / "a")
    wheel = build_project_wheel(project, tmp_path / "out-b", source_date_epoch=0, envs=second)
    assert built_by(wheel) == f"2.0 from {other_index.url}"


def test_backend_missing_from_the_indexes_is_one_line_and_keeps_no_environment(
    fresh_index: LocalIndex, other_index: LocalIndex, tmp_path: Path
) -> None:
    serve_backend(other_index, "1.0")  # served, but not by the index the project names
    envs = BuildEnvironments(indexes=(fresh_index.url,), root=tmp_path / "envs")
    project = make_project(tmp_path / "project")
    with pytest.raises(BuildError) as caught:
        build_project_wheel(project, tmp_path / "out", source_date_epoch=0, envs=envs)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"{project / 'pyproject.toml'}: installing the build requirements failed: uv: "
    )
    assert "ib-local-backend" in message
    assert other_index.count("/") == 0
    # Nothing half-made is kept: the next build tries again from scratch.
    assert not [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]


def test_throwaway_environment_without_a_cache(fresh_index: LocalIndex, tmp_path: Path) -> None:
    serve_backend(fresh_index, "1.0")
    envs = BuildEnvironments(indexes=(fresh_index.url,))
    project = make_project(tmp_path / "project", requires='"ib-local-backend>=1"')
    wheel = build_project_wheel(project, tmp_path / "out", source_date_epoch=0, envs=envs)
    assert built_by(wheel) == f"1.0 from {fresh_index.url}"


def test_environments_are_made_by_the_uv_package_without_uv_on_path(
    fresh_index: LocalIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pip-installed imgbuild has no uv on PATH: the `uv` package's binary installs the
    environment's requirements all the same (uv names itself their installer; pip names pip)."""
    serve_backend(fresh_index, "1.0")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert shutil.which("uv") is None
    assert find_uv() == find_uv_bin()
    envs = BuildEnvironments(indexes=(fresh_index.url,), root=tmp_path / "envs")
    project = make_project(tmp_path / "project")
    wheel = build_project_wheel(project, tmp_path / "out", source_date_epoch=0, envs=envs)
    assert built_by(wheel) == f"1.0 from {fresh_index.url}"
    (kept,) = [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
    records = kept.glob("lib/python3*/site-packages/*.dist-info/INSTALLER")
    installers = {record.read_text().strip() for record in records}
    assert installers == {"uv"}


def test_processes_started_at_background_priority_run_nicer_and_the_rest_does_not() -> None:
    """The project's backend yields the CPUs to what a cold build waits for: a process
    started from a thread at background priority has its niceness; the caller's does not."""
    import os
    import subprocess
    import sys
    import threading

    from imagebuild.build.runner import BACKGROUND_NICENESS, background_priority

    probe = [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"]
    seen: list[int] = []

    def in_background() -> None:
        background_priority()
        seen.append(int(subprocess.run(probe, capture_output=True, check=True).stdout))

    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=in_background)
    thread.start()
    thread.join()
    assert seen == [max(before, BACKGROUND_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    assert int(subprocess.run(probe, capture_output=True, check=True).stdout) == before


def test_the_standard_librarys_bytecode_is_linked_for_the_hooks(tmp_path: Path) -> None:
    env = tmp_path / "env"
    seed_standard_bytecode(env)()  # in a process of its own, waited for
    prefix = env / ".pycache" / str(Path(json.__file__).parent).lstrip("/")
    names = sorted(p.name for p in prefix.iterdir())
    assert "__init__.cpython-311.pyc" in names and "decoder.cpython-311.pyc" in names
    assert not [n for n in names if ".opt-" in n]
    assert (prefix / "decoder.cpython-311.pyc").samefile(cache_from_source(json.decoder.__file__))
    # A hook's interpreter with that prefix takes them: it writes nothing there.
    before = {p: p.stat().st_ino for p in (env / ".pycache").rglob("*")}
    subprocess.run(
        [sys.executable, "-c", "import json.decoder"],
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(env / ".pycache")},
        check=True,
    )
    assert {p: p.stat().st_ino for p in (env / ".pycache").rglob("*")} == before
    # Where nothing can be linked (the prefix is a file), nothing is, and no error.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / ".pycache").write_text("")
    seed_standard_bytecode(blocked)()
    assert (blocked / ".pycache").is_file()


def test_where_no_hard_link_can_be_made_the_standard_bytecode_is_linked_symbolically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for an environment in memory: the standard library's pycs are on another
    # filesystem, where the kernel refuses a hard link (EXDEV).
    tried: list[str] = []

    def cross_device(source: str, dest: object) -> None:
        tried.append(source)
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("imagebuild.build.stdlib_pycs.os.link", cross_device)
    env = tmp_path / "env"
    # (in this process, where the refusal is staged: the script seed_standard_bytecode runs)
    paths = sysconfig.get_paths()
    link_all(str(env / ".pycache"), ".cpython-311.pyc", [paths["stdlib"], paths["platstdlib"]])
    assert len(tried) == 1  # one refusal, then symbolic links only
    pyc = env / ".pycache" / str(Path(json.__file__).parent).lstrip("/") / "decoder.cpython-311.pyc"
    assert pyc.is_symlink() and pyc.samefile(cache_from_source(json.decoder.__file__))
    # A hook's interpreter with that prefix takes them through the links: it writes nothing.
    before = {p: (p.is_symlink(), p.lstat().st_ino) for p in (env / ".pycache").rglob("*")}
    subprocess.run(
        [sys.executable, "-c", "import json.decoder"],
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(env / ".pycache")},
        check=True,
    )
    after = {p: (p.is_symlink(), p.lstat().st_ino) for p in (env / ".pycache").rglob("*")}
    assert after == before


def test_new_environments_are_made_in_memory_and_ones_kept_on_disk_stay_there(
    fresh_index: LocalIndex, tmp_path: Path
) -> None:
    serve_backend(fresh_index, "1.0")
    project = make_project(tmp_path / "project")
    disk, memory = tmp_path / "envs", tmp_path / "memory"
    # Kept on disk by a build without a place in memory...
    on_disk = BuildEnvironments(indexes=(fresh_index.url,), root=disk)
    build_project_wheel(project, tmp_path / "out1", source_date_epoch=0, envs=on_disk)
    (kept,) = [p for p in disk.iterdir() if p.is_dir()]
    # ...it is used where it is by one that has a place there: nothing is made in memory.
    both = BuildEnvironments(indexes=(fresh_index.url,), root=disk, memory=memory)
    build_project_wheel(project, tmp_path / "out2", source_date_epoch=0, envs=both)
    assert both.used == {kept.name: kept} and not memory.exists()
    # A new one (another backend release, so other requirements) is made in memory.
    serve_backend(fresh_index, "2.0")
    newer = make_project(tmp_path / "newer", requires='"ib-local-backend==2.0"')
    wheel = build_project_wheel(newer, tmp_path / "out3", source_date_epoch=0, envs=both)
    assert built_by(wheel) == f"2.0 from {fresh_index.url}"
    (made,) = [p for p in memory.iterdir() if p.is_dir()]
    assert both.used[made.name] == made and [p for p in disk.iterdir() if p.is_dir()] == [kept]

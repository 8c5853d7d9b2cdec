from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.version import Version

from imagebuild.errors import LockError
from imagebuild.lock.load import find_lock, load_lock
from imagebuild.lock.model import Lock, LockedPackage
from imagebuild.lock.select import select_packages
from imagebuild.lock.staleness import check_locked
from imagebuild.project.spec import load_project
from imagebuild.target.platform import TargetPlatform
from tests.fixtures.index_server import LocalIndex

CASES = Path(__file__).parent / "cases" / "lock"
UV = shutil.which("uv")
# uv is part of the test environment (dev/test installs it): its absence is a failure.
needs_uv = pytest.mark.usefixtures("uv_installed")


@pytest.fixture
def uv_installed() -> None:
    """Fail, never skip, when uv is missing."""
    assert UV is not None, "uv is not installed: run the tests through 'bash dev/test'"


def py(minor: int, arch: str = "x86_64") -> TargetPlatform:
    return TargetPlatform(
        python_version=(3, minor),
        libc_version=(2, 36),
        arch=arch,  # type: ignore[arg-type]
    )


def pins(packages: tuple[LockedPackage, ...]) -> list[str]:
    return [p.describe() for p in packages]


# -- uv against the local index ---------------------------------------------------------


def run_uv(project: Path, index_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run uv offline against the local index only, with no cache or user config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    assert UV is not None
    return subprocess.run(
        [
            UV,
            *args,
            "--index-url",
            index_url,
            "--no-cache",
            "--no-config",
            "--python",
            sys.executable,
            "--no-python-downloads",
            "--quiet",
        ],
        cwd=project,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def populate(index: LocalIndex) -> None:
    """The lk-* packages every uv-locked test project uses (added once per session)."""
    if index.files_for("lk-alpha"):
        return
    index.add_wheel("lk-alpha", "1.0", requires=["lk-beta>=1"])
    index.add_wheel(
        "lk-alpha", "2.0", requires=["lk-beta>=2", "lk-gamma; extra == 'fast'"], extras=["slow"]
    )
    index.add_wheel("lk-beta", "1.0")
    index.add_wheel("lk-beta", "2.0")
    index.add_wheel("lk-beta", "2.1", tags="cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64")
    for name in ("lk-gamma", "lk-delta", "lk-eps", "lk-zeta", "lk-win"):
        index.add_wheel(name, "1.0")
    index.add_wheel("lk-forky", "1.0", requires_python=">=3.8")
    index.add_wheel("lk-forky", "2.0", requires_python=">=3.11")


@pytest.fixture(scope="module")
def locked_base(
    package_index: LocalIndex, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """base-pyproject.toml locked by uv against the local index (once per module)."""
    assert UV is not None, "uv is not installed: run the tests through 'bash dev/test'"
    populate(package_index)
    project = tmp_path_factory.mktemp("base")
    shutil.copy(CASES / "base-pyproject.toml", project / "pyproject.toml")
    result = run_uv(project, package_index.url, "lock")
    assert result.returncode == 0, result.stderr
    yield project


@needs_uv
def test_uv_skips_yanked_files(package_index: LocalIndex, tmp_path: Path) -> None:
    """The fixture's yanked flag is honoured by uv (so lock tests can rely on it)."""
    package_index.add_wheel("lk-yank", "1.0")
    package_index.add_wheel("lk-yank", "1.1", yanked="broken")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "y"\nversion = "1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["lk-yank"]\n'
    )
    result = run_uv(tmp_path, package_index.url, "lock")
    assert result.returncode == 0, result.stderr
    lock = load_lock(tmp_path / "uv.lock")
    assert pins(select_packages(lock, target=py(11))) == ["lk-yank 1.0"]


# -- staleness, judged by uv itself -----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    expect: str
    replace: list[list[str]]
    append: str
    message: str | None


def staleness_cases() -> list[Case]:
    data = tomllib.loads((CASES / "staleness.toml").read_text())
    return [
        Case(
            name=c["name"],
            expect=c["expect"],
            replace=c.get("replace", []),
            append=c.get("append", ""),
            message=c.get("message"),
        )
        for c in data["case"]
    ]


@needs_uv
@pytest.mark.parametrize("case", staleness_cases(), ids=lambda c: c.name)
def test_staleness_matches_uv(
    case: Case, locked_base: Path, package_index: LocalIndex, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(locked_base, project)
    text = (project / "pyproject.toml").read_text()
    for old, new in case.replace:
        assert old in text, f"case {case.name!r}: {old!r} not in the base pyproject"
        text = text.replace(old, new.replace("@INDEX@", package_index.url))
    text += case.append.replace("@INDEX@", package_index.url)
    (project / "pyproject.toml").write_text(text)

    uv = run_uv(project, package_index.url, "lock", "--locked")
    uv_says = "fresh" if uv.returncode == 0 else "stale"
    assert uv_says == case.expect, f"uv disagrees with the case file: {uv.stderr}"

    lock = load_lock(project / "uv.lock")
    spec = load_project(project)
    if case.expect == "fresh":
        check_locked(lock, spec)
        return
    with pytest.raises(LockError) as info:
        check_locked(lock, spec)
    message = str(info.value)
    assert message.startswith("uv.lock is out of date with pyproject.toml: ")
    assert message.endswith("; run 'uv lock' (or drop --locked)")
    assert "\n" not in message
    if case.message:
        assert case.message in message


# -- selection over a real forked uv.lock -----------------------------------------------------


@needs_uv
def test_lock_values(locked_base: Path) -> None:
    lock = load_lock(locked_base / "uv.lock")
    assert lock.kind == "uv"
    assert lock.root == "lock-app"
    assert lock.revision is not None and lock.revision >= 1
    assert str(lock.requires_python) == ">=3.9"
    names = [(p.name, str(p.version)) for p in lock.packages]
    assert names == sorted(names, key=lambda n: (n[0], Version(n[1])))
    assert ("lk-forky", "1.0") in names and ("lk-forky", "2.0") in names
    beta = next(p for p in lock.packages if p.describe() == "lk-beta 2.1")
    assert beta.source.kind == "registry"
    assert beta.resolution_markers
    (wheel,) = beta.wheels
    assert (
        wheel.filename == "lk_beta-2.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    )
    assert wheel.url.startswith("http://127.0.0.1:") and wheel.url.endswith(wheel.filename)
    assert wheel.sha256.startswith("sha256:") and len(wheel.sha256) == 71
    assert wheel.size and wheel.size > 0
    assert wheel.upload_time and wheel.upload_time.startswith("2024-01-01")
    assert lock.root_metadata is not None
    assert lock.root_metadata.provides_extras == ("extra-one",)
    assert set(lock.root_metadata.requires_dev) == {"dev", "lint"}


@needs_uv
@pytest.mark.parametrize(
    ("minor", "extras", "groups", "expected"),
    [
        (11, (), (), ["lk-alpha 2.0", "lk-beta 2.1", "lk-forky 2.0", "lk-gamma 1.0"]),
        (12, (), (), ["lk-alpha 2.0", "lk-beta 2.1", "lk-forky 2.0", "lk-gamma 1.0"]),
        (10, (), (), ["lk-alpha 2.0", "lk-beta 2.0", "lk-forky 1.0", "lk-gamma 1.0"]),
        # lk-beta is not a direct dependency on 3.9, but lk-alpha still needs it.
        (9, (), (), ["lk-alpha 2.0", "lk-beta 2.0", "lk-forky 1.0", "lk-gamma 1.0"]),
        (
            11,
            ("Extra_One",),
            ("lint",),
            [
                "lk-alpha 2.0",
                "lk-beta 2.1",
                "lk-eps 1.0",
                "lk-forky 2.0",
                "lk-gamma 1.0",
                "lk-zeta 1.0",
            ],
        ),
        (
            10,
            (),
            ("dev",),
            ["lk-alpha 2.0", "lk-beta 2.0", "lk-forky 1.0", "lk-gamma 1.0", "lk-zeta 1.0"],
        ),
    ],
)
def test_select_uv_forks(
    locked_base: Path,
    minor: int,
    extras: tuple[str, ...],
    groups: tuple[str, ...],
    expected: list[str],
) -> None:
    lock = load_lock(locked_base / "uv.lock")
    chosen = select_packages(
        lock, root="Lock_App", target=py(minor), extras=set(extras), groups=set(groups)
    )
    assert pins(chosen) == expected


@needs_uv
def test_select_uv_errors(locked_base: Path) -> None:
    lock = load_lock(locked_base / "uv.lock")
    with pytest.raises(LockError, match="has no extra 'nope' \\(extras: extra-one\\)"):
        select_packages(lock, target=py(11), extras={"nope"})
    with pytest.raises(LockError, match="has no dependency group 'docs' \\(groups: dev, lint\\)"):
        select_packages(lock, target=py(11), groups={"docs"})
    with pytest.raises(LockError, match="requires Python >=3.9 but the target is 3.8.0"):
        select_packages(lock, target=py(8))
    with pytest.raises(LockError, match="no package 'other'"):
        select_packages(lock, root="other", target=py(11))


@needs_uv
def test_pylock_export_selects_the_same(
    locked_base: Path, package_index: LocalIndex, tmp_path: Path
) -> None:
    project = tmp_path / "p"
    shutil.copytree(locked_base, project)
    result = run_uv(
        project,
        package_index.url,
        "export",
        "--format",
        "pylock.toml",
        "--no-default-groups",
        "-o",
        "pylock.toml",
    )
    assert result.returncode == 0, result.stderr
    assert find_lock(project) == project / "pylock.toml"
    pylock = load_lock(project / "pylock.toml")
    uvlock = load_lock(project / "uv.lock")
    assert pylock.kind == "pylock"
    assert pylock.root == "lock-app"
    for minor in (10, 11):
        assert pins(select_packages(pylock, target=py(minor))) == pins(
            select_packages(uvlock, target=py(minor))
        )
    # Wheel values read from either file agree.
    beta_py = next(p for p in pylock.packages if p.describe() == "lk-beta 2.1")
    beta_uv = next(p for p in uvlock.packages if p.describe() == "lk-beta 2.1")
    assert beta_py.wheels == beta_uv.wheels


# -- hand-written lock files ----------------------------------------------------------------

HEX = "ab" * 32
UV_HEADER = 'version = 1\nrevision = 5\nrequires-python = ">=3.11"\n\n'
ROOT = """
[[package]]
name = "app"
version = "1.0"
source = { editable = "." }
dependencies = [{ name = "dep" }]
"""


def write_uv(tmp_path: Path, body: str) -> Lock:
    (tmp_path / "uv.lock").write_text(UV_HEADER + textwrap.dedent(body))
    return load_lock(tmp_path / "uv.lock")


def test_uv_version_2_rejected(tmp_path: Path) -> None:
    (tmp_path / "uv.lock").write_text("version = 2\n")
    with pytest.raises(
        LockError, match=r"uv.lock: version: lock format version 2 is not supported"
    ):
        load_lock(tmp_path / "uv.lock")


def test_uv_wheel_paths_and_sdist(tmp_path: Path) -> None:
    lock = write_uv(
        tmp_path,
        ROOT
        + f"""
        [[package]]
        name = "dep"
        version = "1.0"
        source = {{ path = "wheels/dep-1.0-py3-none-any.whl" }}
        wheels = [{{ filename = "dep-1.0-py3-none-any.whl", hash = "sha256:{HEX}" }}]
        """,
    )
    (dep,) = select_packages(lock, target=py(11))
    (wheel,) = dep.wheels
    assert wheel.url == (tmp_path / "wheels/dep-1.0-py3-none-any.whl").resolve().as_uri()
    assert wheel.sha256 == f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("package", "message"),
    [
        (
            'source = { registry = "https://pypi.org/simple" }',
            "(index https://pypi.org/simple) lists no wheel to install; re-lock",
        ),
    ],
)
def test_uv_uninstallable(tmp_path: Path, package: str, message: str) -> None:
    body = ROOT + '\n[[package]]\nname = "dep"\nversion = "1.0"\n' + textwrap.dedent(package) + "\n"
    lock = write_uv(tmp_path, body)
    with pytest.raises(LockError) as info:
        select_packages(lock, target=py(11))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_uv_git_source_is_built_from_its_commit(tmp_path: Path) -> None:
    """A git source is no longer refused: the build makes its wheel at the locked commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    source = f'source = {{ git = "https://github.com/o/dep?rev=main#{commit}" }}'
    lock = write_uv(tmp_path, ROOT + f'\n[[package]]\nname = "dep"\nversion = "1.0"\n{source}\n')
    (dep,) = select_packages(lock, target=py(11))
    assert dep.source.kind == "git"
    assert dep.source.location == f"https://github.com/o/dep?rev=main#{commit}"


@pytest.mark.parametrize(
    ("wheels", "message"),
    [
        (
            '[{ url = "https://x/dep-1.0-py3-none-any.whl" }]',
            "package[1].wheels[0].hash: package dep 1.0: wheel has no hash",
        ),
        (
            '[{ url = "https://x/dep-1.0-py3-none-any.whl", hash = "md5:abc" }]',
            "package[1].wheels[0].hash: package dep 1.0: unsupported hash 'md5:abc'",
        ),
        (
            f'[{{ url = "https://x/other-1.0-py3-none-any.whl", hash = "sha256:{HEX}" }}]',
            "package[1].wheels[0]: wheel other-1.0-py3-none-any.whl does not belong to package dep",
        ),
        (
            f'[{{ url = "https://x/dep-2.0-py3-none-any.whl", hash = "sha256:{HEX}" }}]',
            "package[1].wheels[0]: wheel dep-2.0-py3-none-any.whl does not match version 1.0",
        ),
    ],
)
def test_uv_invalid_wheels(tmp_path: Path, wheels: str, message: str) -> None:
    body = (
        ROOT
        + '\n[[package]]\nname = "dep"\nversion = "1.0"\n'
        + 'source = { registry = "https://pypi.org/simple" }\n'
        + f"wheels = {wheels}\n"
    )
    with pytest.raises(LockError) as info:
        write_uv(tmp_path, body)
    assert f"uv.lock: {message}" in str(info.value)


def test_uv_supported_environments(tmp_path: Path) -> None:
    text = UV_HEADER.replace("\n\n", "\nsupported-markers = [\"sys_platform == 'darwin'\"]\n\n")
    (tmp_path / "uv.lock").write_text(text + textwrap.dedent(ROOT))
    lock = load_lock(tmp_path / "uv.lock")
    with pytest.raises(LockError, match="outside the lock's supported environments"):
        select_packages(lock, target=py(11))


def test_uv_ambiguous_dependency(tmp_path: Path) -> None:
    two = "".join(
        f"""
        [[package]]
        name = "dep"
        version = "{v}"
        source = {{ registry = "https://pypi.org/simple" }}
        wheels = [{{ url = "https://x/dep-{v}-py3-none-any.whl", hash = "sha256:{HEX}" }}]
        """
        for v in ("1.0", "2.0")
    )
    lock = write_uv(tmp_path, ROOT + two)
    with pytest.raises(LockError, match="app 1.0 depends on dep, but the lock has several entries"):
        select_packages(lock, target=py(11))


PYLOCK = f"""
lock-version = "1.0"
created-by = "test"
requires-python = ">=3.10"
environments = ["sys_platform == 'linux'"]
extras = ["fast"]
dependency-groups = ["dev"]
default-groups = []

[[packages]]
name = "app"
directory = {{ path = ".", editable = true }}

[[packages]]
name = "always"
version = "1.0"
wheels = [{{ url = "https://x/always-1.0-py3-none-any.whl", hashes = {{ sha256 = "{HEX}" }}, upload-time = 2024-05-01T10:00:00Z, size = 10 }}]

[[packages]]
name = "fast-only"
version = "1.0"
marker = "'fast' in extras"
wheels = [{{ url = "https://x/fast_only-1.0-py3-none-any.whl", hashes = {{ sha256 = "{HEX}" }} }}]

[[packages]]
name = "dev-only"
version = "1.0"
marker = "'dev' in dependency_groups"
wheels = [{{ path = "wheels/dev_only-1.0-py3-none-any.whl", hashes = {{ sha256 = "{HEX}" }} }}]

[[packages]]
name = "old"
version = "1.0"
marker = "python_version < '3.11'"
wheels = [{{ url = "https://x/old-1.0-py3-none-any.whl", hashes = {{ sha256 = "{HEX}" }} }}]

[[packages]]
name = "new"
version = "1.0"
marker = "python_version >= '3.12'"
requires-python = ">=3.12"
wheels = [{{ url = "https://x/new-1.0-py3-none-any.whl", hashes = {{ sha256 = "{HEX}" }} }}]
"""


def write_pylock(tmp_path: Path, text: str = PYLOCK, name: str = "pylock.toml") -> Lock:
    (tmp_path / name).write_text(text)
    return load_lock(tmp_path / name)


def test_pylock_select(tmp_path: Path) -> None:
    lock = write_pylock(tmp_path)
    assert lock.root == "app"
    assert pins(select_packages(lock, target=py(11))) == ["always 1.0"]
    assert pins(select_packages(lock, target=py(10), extras={"fast"}, groups={"dev"})) == [
        "always 1.0",
        "dev-only 1.0",
        "fast-only 1.0",
        "old 1.0",
    ]
    assert pins(select_packages(lock, target=py(12))) == ["always 1.0", "new 1.0"]
    always = next(p for p in lock.packages if p.name == "always")
    assert always.wheels[0].upload_time == "2024-05-01T10:00:00Z"
    dev = next(p for p in lock.packages if p.name == "dev-only")
    assert (
        dev.wheels[0].url == (tmp_path / "wheels/dev_only-1.0-py3-none-any.whl").resolve().as_uri()
    )


def test_pylock_named_file(tmp_path: Path) -> None:
    assert write_pylock(tmp_path, name="pylock.web.toml").kind == "pylock"


@pytest.mark.parametrize(
    ("edit", "target", "message"),
    [
        (("", ""), py(9), "requires Python >=3.10 but the target is 3.9.0"),
        (
            ("sys_platform == 'linux'", "sys_platform == 'win32'"),
            py(11),
            "the target matches none of the lock's environments",
        ),
        (
            ("marker = \"python_version >= '3.12'\"\n", ""),
            py(11),
            "package new 1.0 requires Python >=3.12 but the target is 3.11.0",
        ),
        (
            ("marker = \"python_version < '3.11'\"", "marker = \"os_name == 'posix'\""),
            py(10),
            "",  # no error: only one entry named 'old'
        ),
    ],
)
def test_pylock_select_errors(
    tmp_path: Path, edit: tuple[str, str], target: TargetPlatform, message: str
) -> None:
    lock = write_pylock(tmp_path, PYLOCK.replace(*edit) if edit[0] else PYLOCK)
    if not message:
        select_packages(lock, target=target)
        return
    with pytest.raises(LockError) as info:
        select_packages(lock, target=target)
    assert message in str(info.value)


def test_pylock_duplicate_selection(tmp_path: Path) -> None:
    text = PYLOCK + PYLOCK[PYLOCK.index('[[packages]]\nname = "always"') :].split("\n\n")[
        0
    ].replace('"1.0"', '"1.1"').replace("always-1.0", "always-1.1")
    lock = write_pylock(tmp_path, text)
    with pytest.raises(LockError, match="two entries for always apply to the target"):
        select_packages(lock, target=py(11))


def test_pylock_errors_have_field_paths(tmp_path: Path) -> None:
    bad = PYLOCK.replace("always-1.0-py3", "other-1.0-py3", 1)
    with pytest.raises(LockError, match=r"^pylock.toml: packages\[1\].wheels\[0\]: name in"):
        write_pylock(tmp_path, bad)
    sha512 = PYLOCK.replace(
        f'hashes = {{ sha256 = "{HEX}" }}, upload', 'hashes = { sha512 = "00" }, upload'
    )
    with pytest.raises(
        LockError, match=r"packages\[1\].wheels\[0\].hashes: package always 1.0: no sha256"
    ):
        write_pylock(tmp_path, sha512)
    with pytest.raises(LockError, match="lock-version|not supported"):
        write_pylock(tmp_path, PYLOCK.replace('lock-version = "1.0"', 'lock-version = "2.0"'))


@pytest.mark.parametrize(
    "package",
    [
        f"""source = {{ registry = "https://pypi.org/simple" }}
        sdist = {{ url = "https://x/dep-1.0.tar.gz", hash = "sha256:{HEX}", size = 1 }}""",
        'source = { directory = "libs/dep" }',
    ],
    ids=["sdist-only", "local-directory"],
)
def test_uv_sdists_and_local_directories_are_selected(tmp_path: Path, package: str) -> None:
    """They are built into wheels at image build time (pure-Python sdists, local projects)."""
    body = ROOT + '\n[[package]]\nname = "dep"\nversion = "1.0"\n' + textwrap.dedent(package) + "\n"
    lock = write_uv(tmp_path, body)
    (dep,) = select_packages(lock, target=py(11))
    assert dep.name == "dep" and not dep.wheels


def test_pylock_local_directory_is_selected(tmp_path: Path) -> None:
    text = PYLOCK + '\n[[packages]]\nname = "vendored"\ndirectory = { path = "vendor/x" }\n'
    lock = write_pylock(tmp_path, text)
    vendored = [p for p in select_packages(lock, target=py(11)) if p.name == "vendored"]
    assert vendored[0].source.kind == "directory"
    assert vendored[0].source.location == "vendor/x"


def test_pylock_check_locked(tmp_path: Path) -> None:
    lock = write_pylock(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "1"\n'
        "[project.optional-dependencies]\nfast = []\n[dependency-groups]\ndev = []\n"
    )
    check_locked(lock, load_project(tmp_path))
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "1"\n'
        "[project.optional-dependencies]\nfast = []\nslow = []\n[dependency-groups]\ndev = []\n"
    )
    with pytest.raises(
        LockError, match="pylock.toml is out of date with pyproject.toml: extra 'slow' was added"
    ):
        check_locked(lock, load_project(tmp_path))


def test_find_lock_prefers_pylock(tmp_path: Path) -> None:
    assert find_lock(tmp_path) is None
    (tmp_path / "uv.lock").write_text("version = 1\n")
    assert find_lock(tmp_path) == tmp_path / "uv.lock"
    (tmp_path / "pylock.toml").write_text("")
    assert find_lock(tmp_path) == tmp_path / "pylock.toml"


def test_load_lock_errors(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="no such lock file; run 'uv lock'"):
        load_lock(tmp_path / "uv.lock")
    (tmp_path / "uv.lock").write_text("version = [\n")
    with pytest.raises(LockError, match="invalid TOML"):
        load_lock(tmp_path / "uv.lock")
    (tmp_path / "other.toml").write_text("x = 1\n")
    with pytest.raises(LockError, match="not a lock file imgbuild knows"):
        load_lock(tmp_path / "other.toml")

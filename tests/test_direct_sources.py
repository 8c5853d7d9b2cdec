"""Git sources and direct archives: locked against a git server and an index on 127.0.0.1,
then turned into wheels from the lock as a build does (at the locked commit, hash-checked).
"""

from __future__ import annotations

import hashlib
import tomllib
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebuild.build.pep517 import BuildEnvironments
from imagebuild.cache import CacheLayout
from imagebuild.cli import app
from imagebuild.errors import BuildError
from imagebuild.lock.load import load_lock
from imagebuild.lock.model import LockedPackage
from imagebuild.lock.select import select_packages, sort_sources
from imagebuild.pipeline.direct import git_package_wheel
from imagebuild.report import NullReporter
from imagebuild.target.platform import TargetPlatform
from tests.fixtures.git_server import GitDaemon, GitProject, git
from tests.fixtures.index_server import LocalIndex, make_sdist, make_wheel
from tests.fixtures.registry_server import LocalRegistry

AMD64 = TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch="x86_64")


@pytest.fixture
def offline_bases(local_registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog base's digest is asked of the test registry: nothing leaves the machine."""
    hosts = ("docker.io", "gcr.io")
    monkeypatch.setenv(
        "IMGBUILD_REGISTRY_MIRRORS", ",".join(f"{h}={local_registry.host}" for h in hosts)
    )


def _project(root: Path, index: LocalIndex, deps: list[str], sources: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "app"\nversion = "1.0"\nrequires-python = ">=3.11"\n'
        f"dependencies = {deps!r}\n"
        f"[tool.uv.sources]\n{sources}\n"
        f'[tool.imgbuild]\nindex-url = "{index.url}"\n'
    )
    return root


def _lock(project: Path, cache: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["lock", str(project), "--python", "3.11", "--cache-dir", str(cache), *args]
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


def _entries(project: Path) -> dict[str, dict[str, object]]:
    lock = tomllib.loads((project / "pylock.toml").read_text())
    return {p["name"]: p for p in lock["packages"]}


def _selected(project: Path) -> dict[str, LockedPackage]:
    lock = load_lock(project / "pylock.toml")
    return {p.name: p for p in select_packages(lock, target=AMD64)}


def _git_wheel(pkg: LockedPackage, cache: Path) -> Path:
    envs = BuildEnvironments(indexes=("http://127.0.0.1:9/simple/",), root=cache / "envs")
    return git_package_wheel(
        pkg, bucket=CacheLayout(cache).git, epoch=0, envs=envs, reporter=NullReporter()
    )


def _module(wheel: Path, path: str = "tool/__init__.py") -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(path).decode()


# -- git -------------------------------------------------------------------------------------


def test_tag_over_a_git_server_locks_and_builds_at_the_commit(
    tmp_path: Path, git_daemon: GitDaemon, fresh_index: LocalIndex, offline_bases: None
) -> None:
    fresh_index.add_wheel("leaf", "1.0")
    fresh_index.add_wheel("leaf", "2.1")
    repo = GitProject(git_daemon.base / "tool", "tool")
    tagged = repo.commit("0.1", requires=["leaf>=2"])
    repo.tag("v1")
    repo.commit("0.2")  # the branch moves on; the tag does not
    url = f"{git_daemon.url}/tool"
    project = _project(
        tmp_path / "p", fresh_index, ["tool"], f'tool = {{ git = "{url}", tag = "v1" }}'
    )
    cache = tmp_path / "cache"
    code, err = _lock(project, cache)
    assert code == 0, err
    entries = _entries(project)
    assert entries["tool"]["version"] == "0.1"
    assert entries["tool"]["vcs"] == {
        "type": "git",
        "url": url,
        "requested-revision": "v1",
        "commit-id": tagged,
    }
    assert entries["leaf"]["version"] == "2.1"  # the dependency came from its own metadata

    pkg = _selected(project)["tool"]
    assert pkg.source.kind == "git"
    wheel = _git_wheel(pkg, tmp_path / "build-cache")
    assert wheel.name == "tool-0.1-py3-none-any.whl"
    assert _module(wheel) == '__version__ = "0.1"\n'
    # Cached by commit: the server going away costs nothing.
    git_daemon.close()
    assert _git_wheel(pkg, tmp_path / "build-cache") == wheel


def test_branch_is_recorded_as_its_commit_and_kept(
    tmp_path: Path, fresh_index: LocalIndex, offline_bases: None
) -> None:
    repo = GitProject(tmp_path / "repos" / "tool", "tool")
    first = repo.commit("0.1")
    project = _project(
        tmp_path / "p", fresh_index, ["tool"], f'tool = {{ git = "{repo.url}", branch = "main" }}'
    )
    cache = tmp_path / "cache"
    assert _lock(project, cache)[0] == 0
    assert _entries(project)["tool"]["vcs"]["commit-id"] == first  # type: ignore[index]
    repo.commit("0.2")
    # The lock still fits its inputs: the branch moving does not move the lock (as uv).
    code, err = _lock(project, cache)
    assert code == 0 and "up to date" in err
    pkg = _selected(project)["tool"]
    assert _module(_git_wheel(pkg, tmp_path / "bc")) == '__version__ = "0.1"\n'
    # --upgrade re-resolves the branch.
    code, err = _lock(project, cache, "--upgrade")
    assert code == 0, err
    assert _entries(project)["tool"]["version"] == "0.2"


def test_rev_and_subdirectory_from_a_pep508_reference(
    tmp_path: Path, fresh_index: LocalIndex, offline_bases: None
) -> None:
    repo = GitProject(tmp_path / "repos" / "mono", "tool")
    commit = repo.commit("0.3", subdirectory="pkgs/tool")
    repo.commit("0.4", subdirectory="pkgs/tool")
    ref = f"tool @ git+{repo.url}@{commit[:10]}#subdirectory=pkgs/tool"
    project = _project(tmp_path / "p", fresh_index, [ref])
    assert _lock(project, tmp_path / "cache")[0] == 0
    vcs = _entries(project)["tool"]["vcs"]
    assert vcs["commit-id"] == commit and vcs["subdirectory"] == "pkgs/tool"  # type: ignore[index]
    wheel = _git_wheel(_selected(project)["tool"], tmp_path / "bc")
    assert _module(wheel) == '__version__ = "0.3"\n'


def _pylock_with_commit(project: Path, url: str, commit: str) -> Path:
    project.mkdir(parents=True)
    (project / "pylock.toml").write_text(
        'lock-version = "1.0"\ncreated-by = "test"\n'
        f'[[packages]]\nname = "tool"\nversion = "0.1"\n'
        f'vcs = {{ type = "git", url = "{url}", commit-id = "{commit}" }}\n'
    )
    return project


def test_a_commit_that_no_longer_exists_fails_in_one_line(tmp_path: Path) -> None:
    repo = GitProject(tmp_path / "repos" / "tool", "tool")
    repo.commit("0.1")
    gone = "0123456789abcdef0123456789abcdef01234567"
    project = _pylock_with_commit(tmp_path / "p", repo.url, gone)
    with pytest.raises(BuildError) as info:
        _git_wheel(_selected(project)["tool"], tmp_path / "bc")
    assert info.value.message == (
        f"package tool 0.1 (git {repo.url}): commit {gone} is no longer in {repo.url}"
    )


def test_a_commit_id_that_is_not_the_commit_is_refused(tmp_path: Path) -> None:
    repo = GitProject(tmp_path / "repos" / "tool", "tool")
    commit = repo.commit("0.1")
    repo.tag("v1", annotated=True)
    tag_object = git(repo.repo, "rev-parse", "v1")
    assert tag_object != commit
    project = _pylock_with_commit(tmp_path / "p", repo.url, tag_object)
    with pytest.raises(BuildError, match=f"{tag_object} names commit {commit}, not itself"):
        _git_wheel(_selected(project)["tool"], tmp_path / "bc")
    short = _pylock_with_commit(tmp_path / "q", repo.url, commit[:12])
    with pytest.raises(BuildError, match="is not a full commit id"):
        _git_wheel(_selected(short)["tool"], tmp_path / "bc")


def test_credentials_in_a_git_url_are_not_recorded(
    tmp_path: Path,
    fresh_index: LocalIndex,
    offline_bases: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """git's own configuration (here ``insteadOf``) takes the URL where it must go; the
    user and password written into it are neither recorded nor printed."""
    repo = GitProject(tmp_path / "repos" / "tool", "tool")
    repo.commit("0.1")
    secret_url = "https://user:s3cret@git.example.invalid/tool"
    config = tmp_path / "gitconfig"
    config.write_text(f'[url "{repo.url}"]\n\tinsteadOf = {secret_url}\n')
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    project = _project(tmp_path / "p", fresh_index, ["tool"], f'tool = {{ git = "{secret_url}" }}')
    code, err = _lock(project, tmp_path / "cache")
    assert code == 0, err
    text = (project / "pylock.toml").read_text()
    assert "s3cret" not in text and "s3cret" not in err
    assert 'url = "https://git.example.invalid/tool"' in text


def test_unknown_tag_is_one_line(
    tmp_path: Path, fresh_index: LocalIndex, offline_bases: None
) -> None:
    repo = GitProject(tmp_path / "repos" / "tool", "tool")
    repo.commit("0.1")
    project = _project(
        tmp_path / "p", fresh_index, ["tool"], f'tool = {{ git = "{repo.url}", tag = "v9" }}'
    )
    code, err = _lock(project, tmp_path / "cache")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: git {repo.url} (tag v9): no such tag in the repository; "
        "check the tag, branch or revision in tool.uv.sources"
    ]


# -- direct archives -------------------------------------------------------------------------


def test_url_wheel_and_sdist_are_locked_with_their_hashes(
    tmp_path: Path, fresh_index: LocalIndex, offline_bases: None
) -> None:
    fresh_index.add_wheel("leaf", "2.1")
    wheel = make_wheel(tmp_path / "dist", "whl-dep", "1.0", requires=["leaf"])
    sdist = make_sdist(tmp_path / "dist", "src-dep", "2.0")
    wheel_url = fresh_index.serve_raw(
        f"/direct/{wheel.name}", wheel.read_bytes(), content_type="application/octet-stream"
    )
    sdist_url = fresh_index.serve_raw(
        f"/direct/{sdist.name}", sdist.read_bytes(), content_type="application/octet-stream"
    )
    wheel_hash = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = _project(
        tmp_path / "p",
        fresh_index,
        [f"whl-dep @ {wheel_url}#sha256={wheel_hash}", f"src-dep @ {sdist_url}"],
    )
    code, err = _lock(project, tmp_path / "cache")
    assert code == 0, err
    entries = _entries(project)
    assert entries["whl-dep"]["archive"] == {
        "url": wheel_url,
        "size": wheel.stat().st_size,
        "hashes": {"sha256": wheel_hash},
    }
    assert entries["src-dep"]["archive"]["hashes"] == {  # type: ignore[index]
        "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()
    }
    assert entries["leaf"]["version"] == "2.1"
    # The build takes the wheel as a wheel, the sdist as an sdist to build.
    chosen, sdists, local = sort_sources(list(_selected(project).values()), AMD64)
    assert [(p.name, w.url) for p, w in chosen] == [
        ("leaf", chosen[0][1].url),
        ("whl-dep", wheel_url),
    ]
    assert [p.name for p in sdists] == ["src-dep"] and not local


def test_a_url_archive_with_another_hash_is_refused(
    tmp_path: Path, fresh_index: LocalIndex, offline_bases: None
) -> None:
    wheel = make_wheel(tmp_path / "dist", "whl-dep", "1.0")
    url = fresh_index.serve_raw(
        f"/direct/{wheel.name}", wheel.read_bytes(), content_type="application/octet-stream"
    )
    wrong = "0" * 64
    project = _project(tmp_path / "p", fresh_index, [f"whl-dep @ {url}#sha256={wrong}"])
    code, err = _lock(project, tmp_path / "cache")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sha256 mismatch (asked: " + wrong in errors[0]
    assert not (project / "pylock.toml").exists()


def test_path_sources_lock_relative_to_the_lock(
    tmp_path: Path, fresh_index: LocalIndex, offline_bases: None
) -> None:
    project = tmp_path / "p"
    wheel = make_wheel(project / "dist", "whl-dep", "1.0")
    sdist = make_sdist(tmp_path / "elsewhere", "src-dep", "2.0")
    project = _project(
        project,
        fresh_index,
        ["whl-dep", f"src-dep @ {sdist.as_uri()}"],
        f'whl-dep = {{ path = "dist/{wheel.name}" }}',
    )
    code, err = _lock(project, tmp_path / "cache")
    assert code == 0, err
    entries = _entries(project)
    assert entries["whl-dep"]["archive"]["path"] == f"dist/{wheel.name}"  # type: ignore[index]
    assert entries["src-dep"]["archive"]["path"] == f"../elsewhere/{sdist.name}"  # type: ignore[index]
    selected = _selected(project)
    assert selected["whl-dep"].wheels[0].url == wheel.resolve().as_uri()
    assert selected["src-dep"].sdist is not None
    assert selected["src-dep"].sdist.url == sdist.resolve().as_uri()

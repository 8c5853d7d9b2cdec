"""``imgbuild cache``: dir, size, clean and prune, and the lock that keeps them off running builds.

The lock is taken by real processes here (``flock`` is between open files, so a thread of
this process would not show what another process sees).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebuild.cache import CacheLayout, build_envs_memory, scratch_tree
from imagebuild.cli import app
from imagebuild.pipeline.cachelock import LOCK_NAME, cache_in_use

ROOT = Path(__file__).resolve().parent.parent

_HOLD = textwrap.dedent(
    """\
    import sys, time
    from pathlib import Path
    from imagebuild.pipeline.cachelock import cache_in_use, cache_to_yourself

    root, mode, signal_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    held = cache_in_use(root) if mode == "shared" else cache_to_yourself(root)
    with held:
        signal_file.write_text("held")
        while signal_file.read_text() != "release":
            time.sleep(0.01)
    """
)


def _cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _fill(root: Path) -> None:
    """A cache as builds leave it: a wheel, a blob, a layer record, pages, a base's tree."""
    for name, data in {
        "wheels/ab/cd.whl": b"w" * 3000,
        "blobs/sha256/0123": b"b" * 5000,
        "layers/key.json": b"{}",
        "http/pages/x.json": b"p" * 10,
        "metadata/m.metadata": b"m",
        "rootfs/094e/usr/bin/python3": b"#!",
        "debian/Release": b"r",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A cache as builds leave it (``_fill``), at ``tmp_path / "cache"``."""
    root = tmp_path / "cache"
    _fill(root)
    return root


class _Holder:
    """Another process holding the cache's lock, shared (a build) or alone (a clean)."""

    def __init__(self, root: Path, mode: str, tmp: Path) -> None:
        self.signal = tmp / f"hold-{mode}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLD, str(root), mode, str(self.signal)], cwd=ROOT
        )
        deadline = time.monotonic() + 30
        while not (self.signal.is_file() and self.signal.read_text() == "held"):
            assert self.process.poll() is None, "the holder died"
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.01)

    def release(self) -> None:
        self.signal.write_text("release")
        assert self.process.wait(timeout=30) == 0


def _imgbuild(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagebuild", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "IMGBUILD_SERVER": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_line(stream: object, text: str) -> str:
    line = stream.readline()  # type: ignore[attr-defined]
    assert text in line, line
    return str(line)


def test_dir_names_the_option_else_the_variable_else_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cli("cache", "dir")[1].strip() == str(tmp_path / "xdg" / "imgbuild")
    monkeypatch.setenv("IMGBUILD_CACHE_DIR", str(tmp_path / "env"))
    assert _cli("cache", "dir")[1].strip() == str(tmp_path / "env")
    assert _cli("cache", "dir", "--cache-dir", tmp_path / "opt")[1].strip() == str(tmp_path / "opt")


def test_size_counts_each_bucket_and_a_file_linked_twice_once(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMGBUILD_DEBIAN_CACHE")
    root = filled
    os.link(root / "blobs/sha256/0123", root / "blobs/sha256/linked")
    code, out, _ = _cli("cache", "size", "--cache-dir", root)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "2.9 KiB" in lines["wheels"] and " 1 files" in lines["wheels"]
    assert "4.9 KiB" in lines["blobs"] and " 1 files" in lines["blobs"]
    assert "total" in lines and "7 files" in lines["total"]


def test_clean_removes_everything_but_the_lock_and_leaves_a_shared_debian_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared-debian"
    (shared / "pool").mkdir(parents=True)
    (shared / "pool" / "x.deb").write_bytes(b"deb")
    monkeypatch.setenv("IMGBUILD_DEBIAN_CACHE", str(shared))
    root = tmp_path / "cache"
    _fill(root)
    memory = build_envs_memory(CacheLayout(root).build_envs)
    if memory is not None:  # this cache's build environments in memory go too
        (memory / "env").mkdir(parents=True)
        (memory / "env" / "python").write_bytes(b"x")
    code, _, err = _cli("cache", "clean", "--cache-dir", root)
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]
    assert "removed 7 files" in err if memory is None else "removed 8 files" in err
    assert memory is None or not memory.exists()
    assert (shared / "pool" / "x.deb").read_bytes() == b"deb"


def test_clean_and_prune_refuse_a_directory_that_is_not_a_cache(tmp_path: Path) -> None:
    project = tmp_path / "project"
    _fill(project)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for command in ("clean", "prune"):
        code, _, err = _cli("cache", command, "--cache-dir", project)
        assert code == 1
        assert len(err.strip().splitlines()) == 1
        assert "is not an imgbuild cache" in err and "'pyproject.toml'" in err
    assert (project / "wheels/ab/cd.whl").is_file() and (project / "pyproject.toml").is_file()


def test_prune_takes_leftovers_and_unpacked_trees_and_keeps_what_builds_need(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cache"
    _fill(root)
    layout = CacheLayout(root)
    dead = layout.tmp / "imgbuild-dead"  # a killed build's tree: no owner holds it
    (dead / "stage").mkdir(parents=True)
    (dead / "stage" / "f").write_bytes(b"x" * 100)
    (layout.wheels / "ab" / ".tmp-0011.part").write_bytes(b"half")
    with scratch_tree(layout.tmp) as live:  # a running build's tree (--force: kept)
        (live / "f").write_bytes(b"y")
        code, _, err = _cli("cache", "prune", "--force", "--cache-dir", root)
        assert code == 0, err
        assert (live / "f").is_file()
    assert not dead.exists() and not (layout.wheels / "ab" / ".tmp-0011.part").exists()
    assert not layout.rootfs.exists()
    for kept in ("wheels/ab/cd.whl", "blobs/sha256/0123", "layers/key.json", "http/pages/x.json"):
        assert (root / kept).is_file(), kept
    assert "removed 3 files" in err  # the dead tree's file, the part, the base's tree


def test_prune_for_ci_drops_downloads_and_keeps_what_was_built(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMGBUILD_DEBIAN_CACHE")
    code, _, err = _cli("cache", "prune", "--ci", "--cache-dir", filled)
    assert code == 0, err
    assert sorted(p.name for p in filled.iterdir()) == [LOCK_NAME, "blobs", "layers"]


def test_clean_waits_for_a_running_build_and_force_does_not(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _fill(root)
    build = _Holder(root, "shared", tmp_path)
    clean = _imgbuild("cache", "clean", "--cache-dir", root)
    assert clean.stderr is not None
    _wait_for_line(clean.stderr, "in use by a running build; waiting")
    time.sleep(0.3)
    assert clean.poll() is None and (root / "wheels/ab/cd.whl").is_file()
    forced = subprocess.run(
        [sys.executable, "-m", "imagebuild", "cache", "prune", "--force", "--cache-dir", root],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert forced.returncode == 0 and "waiting" not in forced.stderr
    assert not (root / "rootfs").exists()  # pruned without waiting
    build.release()
    _, err = clean.communicate(timeout=60)
    assert clean.returncode == 0 and "removed" in err
    # The build marked the cache as it left (``MARKERS``): the clean keeps those.
    assert sorted(p.name for p in root.iterdir()) == [".gitignore", LOCK_NAME, "CACHEDIR.TAG"]


def test_a_killed_build_leaves_the_cache_unlocked(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _fill(root)
    build = _Holder(root, "shared", tmp_path)
    build.process.send_signal(signal.SIGKILL)
    build.process.wait(timeout=30)
    done = subprocess.run(
        [sys.executable, "-m", "imagebuild", "cache", "clean", "--cache-dir", root],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "waiting" not in done.stderr


def test_a_build_waits_for_a_clean_to_end(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    clean = _Holder(root, "alone", tmp_path)
    waited = threading.Event()
    entered = threading.Event()

    def build() -> None:
        with cache_in_use(root, waiting=waited.set):
            entered.set()

    thread = threading.Thread(target=build)
    thread.start()
    assert waited.wait(timeout=30)
    time.sleep(0.2)
    assert not entered.is_set()
    clean.release()
    thread.join(timeout=30)
    assert entered.is_set()


def _record(path: Path, *digests: str, days_old: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"digests": [f"sha256:{d}" for d in digests]}))
    when = time.time() - days_old * 86400
    os.utime(path, (when, when))


def test_prune_unused_for_takes_old_layers_and_only_the_blobs_they_alone_name(
    filled: Path,
) -> None:
    old, shared, fresh, base_layer = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    blobs = filled / "blobs" / "sha256"
    for name in (old, shared, fresh, base_layer):
        (blobs / name).write_bytes(name.encode())
    _record(filled / "layers" / "old.json", old, shared, base_layer, days_old=40)
    _record(filled / "layers" / "sbom-old.json", old, days_old=31)
    _record(filled / "layers" / "fresh.json", shared, fresh, days_old=29)
    # A base the cache keeps facts of: its manifest names its layer, which stays.
    manifest = "e" * 64
    (blobs / manifest).write_text(json.dumps({"layers": [{"digest": f"sha256:{base_layer}"}]}))
    (filled / "bases" / f"{manifest}.json").parent.mkdir()
    (filled / "bases" / f"{manifest}.json").write_text("{}")

    code, _, err = _cli("cache", "prune", "--unused-for", "30", "--cache-dir", filled)
    assert code == 0, err
    assert sorted(p.name for p in (filled / "layers").iterdir()) == ["fresh.json", "key.json"]
    assert not (blobs / old).exists()
    for kept in (shared, fresh, base_layer, manifest, "0123"):
        assert (blobs / kept).is_file(), kept


def test_prune_unused_for_refuses_a_negative_number_of_days(filled: Path) -> None:
    code, _, err = _cli("cache", "prune", "--unused-for", "-1", "--cache-dir", filled)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--unused-for -1.0: not a number of days" in err
    assert (filled / "rootfs").is_dir()  # nothing pruned


def test_a_file_that_cannot_be_removed_stops_the_clean_in_one_line(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another user's file in a shared cache, as root cannot be made to see it here.
    def refuse(path: str, onerror: object = None) -> None:
        raise PermissionError(13, "Permission denied", f"{path}/theirs.whl")

    monkeypatch.setattr("imagebuild.pipeline.cacheadmin.shutil.rmtree", refuse)
    code, _, err = _cli("cache", "clean", "--cache-dir", filled)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"cannot remove {filled / 'blobs'}/theirs.whl: Permission denied" in err
    assert "run as the cache's owner" in err


def test_a_cache_a_command_made_is_tagged_and_ignored_by_git(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    root = repo / ".imgbuild-cache"  # a cache kept in a checkout, as CI caches often are
    with cache_in_use(root):  # a first build: the cache is made while it runs
        _fill(root)
    tag = (root / "CACHEDIR.TAG").read_bytes()
    assert tag.startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout == ""
    code, _, err = _cli("cache", "clean", "--cache-dir", root)
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == [".gitignore", LOCK_NAME, "CACHEDIR.TAG"]
    with cache_in_use(tmp_path / "never"):  # a command that failed before making one
        pass
    assert not (tmp_path / "never").exists()


def test_a_directory_that_is_not_only_a_cache_gets_no_markers(tmp_path: Path) -> None:
    home = tmp_path / "home"  # --cache-dir ~ by mistake: it holds the user's own files
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with cache_in_use(home):
        _fill(home)
    assert not (home / ".gitignore").exists() and not (home / "CACHEDIR.TAG").exists()


def test_prune_unused_for_takes_the_wheels_no_build_chose_since(filled: Path) -> None:
    entries = filled / "wheels" / "sha256" / "ab"
    for name, days in (("ab" + "1" * 62, 40), ("ab" + "2" * 62, 29)):
        wheel = entries / name / f"{name[:6]}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(parents=True)
        wheel.write_bytes(b"PK")
        (entries / f"{name}.lock").write_text("")
        when = time.time() - days * 86400
        os.utime(wheel, (when, when))
    code, _, err = _cli("cache", "prune", "--unused-for", "30", "--cache-dir", filled)
    assert code == 0, err
    assert sorted(p.name for p in entries.iterdir()) == ["ab" + "2" * 62, "ab" + "2" * 62 + ".lock"]
    assert (filled / "wheels" / "ab" / "cd.whl").is_file()  # not an entry: left alone

"""Scratch trees: locked while their process lives, swept once it is gone; SIGTERM unwinds.

The owner is a real second process (a build on the same cache), killed with SIGKILL as a
crashed build would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagebuild import cache as cache_module
from imagebuild.cache import memory_scratch_root, scratch_tree, sweep_scratch, write_atomic
from imagebuild.commands.signals import Terminated, sigterm_as_interrupt

HOLDER = """
import sys, time
from pathlib import Path
from imagebuild.cache import scratch_tree
with scratch_tree(Path(sys.argv[1])) as tree:
    (tree / "layer.tar").write_bytes(b"x" * 1000)
    print(tree, flush=True)
    time.sleep(600)
"""


def test_a_live_build_keeps_its_tree_and_a_killed_one_loses_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        tree = Path(holder.stdout.readline().strip())
        assert tree.name.startswith("imgbuild-") and tree.is_dir()
        assert sweep_scratch(tmp_path) == 0 and tree.is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert tree.is_dir()  # kill -9 ran no clean-up
    assert sweep_scratch(tmp_path) == 1
    assert not tree.exists()


def test_trees_without_an_owner_and_stuck_new_trees_are_swept(tmp_path: Path) -> None:
    legacy = tmp_path / "imgbuild-abc123"  # from before trees had an owner file
    (legacy / "layers").mkdir(parents=True)
    young = tmp_path / ".new-imgbuild-young"
    young.mkdir()
    old = tmp_path / ".new-imgbuild-old"
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    other = tmp_path / "something-else"
    other.mkdir()
    assert sweep_scratch(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new-imgbuild-young", "something-else"]


def test_own_tree_is_kept_by_a_sweep_and_removed_on_the_way_out(tmp_path: Path) -> None:
    with scratch_tree(tmp_path) as tree:
        (tree / "f").write_text("x")
        assert sweep_scratch(tmp_path) == 0
    assert not tree.exists()
    with pytest.raises(KeyboardInterrupt), scratch_tree(tmp_path) as tree:
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_sigterm_raises_terminated_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_layers_are_staged_in_memory_when_it_has_room_and_on_disk_when_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mounts = Path("/proc/self/mounts").read_text()
    shm_is_tmpfs = any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts.splitlines())
    root = memory_scratch_root()
    if shm_is_tmpfs and os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize > 2 << 30:
        assert root == Path(f"/dev/shm/imgbuild-{os.getuid()}") and root.is_dir()
        # A tree there is swept like the cache's own once its build is gone.
        with scratch_tree(root) as tree:
            assert tree.parent == root and sweep_scratch(root) == 0
        assert not tree.exists()
    else:
        assert root is None
    monkeypatch.setenv("IMGBUILD_MEMORY_STAGING", "0")
    assert memory_scratch_root() is None


def test_an_interruption_just_after_the_temporary_file_is_made_leaves_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM is raised as an exception wherever the main thread is: also between the
    temporary file's creation and the first line that knows its name."""
    real_open = os.open

    def interrupted(path: object, flags: int, mode: int = 0o777) -> int:
        real_open(path, flags, mode)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "entry", b"data")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []

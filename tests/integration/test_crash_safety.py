"""Crash safety: killed, terminated and concurrent builds on one cache, as real processes.

``imgbuild build`` runs as a subprocess against the local index, the test registry and the
test engine. Twenty ``kill -9`` at seeded random moments on one cache, then a build that
succeeds with the digest of a fresh cache and leaves no scratch tree and no compile
container; SIGTERM unwinds (no tree, no ``.part``, no container); four builds at once on
one cache agree on the digest and do not sweep each other's trees.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagebuild.sinks.engine import COMPILE_LABEL
from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject

pytestmark = pytest.mark.docker

KILLS = 20
SEED = 12
_DIGEST = re.compile(r"^digest: (sha256:[0-9a-f]{64})$", re.M)


def _env(infra: TestInfra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGBUILD_", "DOCKER_"))}
    env.update(
        DOCKER_HOST=infra.docker_host,
        IMGBUILD_REGISTRY_MIRRORS=infra.mirrors,
        SOURCE_DATE_EPOCH="0",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def _start(project: Path, cache: Path, infra: TestInfra, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagebuild", "build", str(project), "--cache-dir", str(cache)]
        + list(args),
        env=_env(infra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    match = _DIGEST.search(out)
    assert match, out
    return match[1]


def _trees(cache: Path) -> list[str]:
    tmp = cache / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def _parts(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*.part")]


def _containers_of(infra: TestInfra, pids: set[int]) -> list[str]:
    """Labelled compile containers made by one of ``pids`` (other runs may share the engine)."""
    found = infra.client.api.containers(all=True, filters={"label": f"{COMPILE_LABEL}=1"})
    return [
        c["Id"][:12]
        for c in found
        if (c.get("Labels") or {}).get(f"{COMPILE_LABEL}.pid", "") in {str(p) for p in pids}
    ]


def _wait_for_new_tree(proc: subprocess.Popen[str], cache: Path, before: set[str]) -> None:
    deadline = time.monotonic() + 120
    while proc.poll() is None and not set(_trees(cache)) - before:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def project(make_project: MakeProject) -> Path:
    return make_project()


def test_kill_9_twenty_times_then_the_same_image_and_nothing_left(
    docker_env: TestInfra,
    project: Path,
    tmp_path: Path,
    image_cleanup: list[str],
) -> None:
    tag = "imgbuild-test/crash:kill"
    image_cleanup.append(tag)
    fresh = _finish(_start(project, tmp_path / "fresh", docker_env, "-o", f"oci:{tmp_path}/f"))
    cache = tmp_path / "cache"
    rng = random.Random(SEED)
    killed: set[int] = set()
    finished = left_trees = left_containers = 0
    for _ in range(KILLS):
        before = set(_trees(cache))
        proc = _start(project, cache, docker_env, "--tag", tag)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.05, 1.5))  # while starting, locking, pulling
        else:
            # Once its scratch tree exists: fetching, installing, compiling, writing.
            _wait_for_new_tree(proc, cache, before)
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.kill()
            killed.add(proc.pid)
        else:
            finished += 1
        proc.communicate(timeout=60)
        # What this kill left (the next build's start sweeps it).
        left_trees += len(_trees(cache))
        left_containers += len(_containers_of(docker_env, {proc.pid}))
    assert len(killed) >= KILLS // 2, f"only {len(killed)} builds were killed mid-way"
    assert left_trees, "no kill came after a scratch tree was made: the sweep went untested"
    # The next build sweeps what the killed ones left and builds the same image.
    after = _start(project, cache, docker_env, "--tag", tag)
    assert _finish(after) == fresh
    assert _trees(cache) == []
    assert _containers_of(docker_env, killed | {after.pid}) == []
    print(
        f"\nkill -9: {len(killed)} builds killed, {finished} finished first (seed {SEED}); "
        f"they left {left_trees} scratch trees and {left_containers} compile containers"
    )


def test_sigterm_unwinds_without_leftovers(
    docker_env: TestInfra, project: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    proc = _start(project, cache, docker_env, "-o", f"oci:{tmp_path}/image")
    # Wait until the build is under way: its scratch tree exists.
    _wait_for_new_tree(proc, cache, set())
    assert proc.poll() is None, proc.communicate()[1]
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)"), err
    assert "Traceback" not in err
    assert _trees(cache) == []
    assert _parts(cache) == []
    assert _containers_of(docker_env, {proc.pid}) == []


def test_four_builds_at_once_on_one_cache_agree(
    docker_env: TestInfra, project: Path, tmp_path: Path
) -> None:
    fresh = _finish(_start(project, tmp_path / "fresh", docker_env, "-o", f"oci:{tmp_path}/f"))
    cache = tmp_path / "cache"
    procs = [
        _start(project, cache, docker_env, "-o", f"oci:{tmp_path}/image-{i}") for i in range(4)
    ]
    digests = {_finish(proc) for proc in procs}
    assert digests == {fresh}
    assert _trees(cache) == []
    assert _containers_of(docker_env, {p.pid for p in procs}) == []

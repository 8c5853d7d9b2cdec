"""Real builds through the resident server (``IMGBUILD_SERVER=1``): the image is the one a
build in its own process makes, and a build stopped through the server leaves nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject

pytestmark = pytest.mark.docker

_DIGEST = re.compile(r"^digest: (sha256:[0-9a-f]{64})$", re.M)


def _env(infra: TestInfra, where: Path, *, served: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGBUILD_", "DOCKER_"))}
    env.update(
        DOCKER_HOST=infra.docker_host,
        IMGBUILD_REGISTRY_MIRRORS=infra.mirrors,
        IMGBUILD_SERVER="1" if served else "0",
        IMGBUILD_SERVER_DIR=str(where),
        SOURCE_DATE_EPOCH="0",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def _imgbuild(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagebuild", *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def _builds(env: dict[str, str]) -> int:
    status = _imgbuild(env, "server", "status")
    assert status.returncode == 0, status.stdout
    return int(status.stdout.split()[4])


def test_a_build_through_the_server_makes_the_same_image(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    where = tmp_path / "srv"
    alone = _env(docker_env, where, served=False)
    served = _env(docker_env, where, served=True)
    try:
        assert _imgbuild(served, "server", "start").returncode == 0
        digests = []
        for env, name in ((alone, "alone"), (served, "served"), (served, "again")):
            cache = tmp_path / ("cache-alone" if name == "alone" else "cache-served")
            result = _imgbuild(
                env, "build", str(project), "--cache-dir", str(cache),
                "-o", f"oci:{tmp_path / name}",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            match = _DIGEST.search(result.stdout)
            assert match, result.stdout
            digests.append(match[1])
        assert _builds(served) == 2
        assert digests[0] == digests[1] == digests[2]
        # The served builds' project wheel: the second was forked from the resident backend
        # process the first started (one process: same environment, directory and backend);
        # stopping the server stops it too.
        assert len(list(where.glob("hooks-*.sock"))) == 1
        # Nothing the server keeps running (it, its resident backend) holds the cache: a
        # clean does not wait for them.
        cleaned = subprocess.run(
            [sys.executable, "-m", "imagebuild", "cache", "clean", "--cache-dir",
             str(tmp_path / "cache-served")],
            env=served, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert cleaned.returncode == 0 and "waiting" not in cleaned.stderr, cleaned.stderr
        left = sorted(p.name for p in (tmp_path / "cache-served").iterdir())
        assert left == [".gitignore", ".lock", "CACHEDIR.TAG"]  # its markers stay
    finally:
        _imgbuild(served, "server", "stop")
    deadline = time.monotonic() + 30
    while list(where.glob("hooks-*.sock")):
        assert time.monotonic() < deadline, "a resident backend process outlived the server"
        time.sleep(0.05)


def test_sigterm_to_the_caller_unwinds_the_build_in_the_server(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    served = _env(docker_env, tmp_path / "srv", served=True)
    cache = tmp_path / "cache"
    try:
        assert _imgbuild(served, "server", "start").returncode == 0
        caller = subprocess.Popen(
            [sys.executable, "-m", "imagebuild", "build", str(project), "--cache-dir", str(cache),
             "-o", f"oci:{tmp_path / 'image'}"],
            env=served, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while caller.poll() is None and not list((cache / "tmp").glob("*")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert caller.poll() is None, caller.communicate()[1]
        time.sleep(0.3)
        caller.send_signal(signal.SIGTERM)
        _, err = caller.communicate(timeout=120)
        assert caller.returncode == 143, err
        assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)"), err
        assert list((cache / "tmp").iterdir()) == []
        assert list(cache.rglob("*.part")) == []
        assert _builds(served) == 1
    finally:
        _imgbuild(served, "server", "stop")

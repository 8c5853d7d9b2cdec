"""Progress as users see it: live bars in a real terminal (tmux), plain lines in a pipe.

The build is a real one (local index, test registry, test engine) run as a subprocess of
``.venv/bin/imgbuild``: once in a tmux pane, whose screen must show the finished bars and
end with the summary line, once with stderr a pipe, which must hold no escape code.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject

pytestmark = pytest.mark.docker

IMGBUILD = Path(sys.executable).parent / "imgbuild"
TMUX = shutil.which("tmux")
SUMMARY = re.compile(
    r"^built \S+ sha256:[0-9a-f]{64} \([\d.]+ [kMG]?B, \d+ layers: \d+ new, \d+ reused\) "
    r"in [\d.]+s$"
)


def _env(infra: TestInfra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DOCKER_HOST=infra.docker_host,
        IMGBUILD_REGISTRY_MIRRORS=infra.mirrors,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def _build_args(project: Path, infra: TestInfra, cache: Path, name: str) -> list[str]:
    ref = f"{infra.registry}/imgbuild-test/{name}:1"
    return [str(IMGBUILD), "build", str(project), "--python", "3.11", "--tag", ref, "--push",
            "--cache-dir", str(cache)]  # fmt: skip


def test_a_terminal_gets_bars_and_ends_with_the_summary(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    assert TMUX is not None, "tmux is required (dev/infra.sh installs it)"
    project = make_project()
    session = f"imgbuild-progress-{os.getpid()}"
    done = tmp_path / "done"
    env = _env(docker_env)
    # The pane runs the build itself (no shell prompt); a tmux server that is already up
    # keeps its own environment, so the variables go on the command line. A terminal's
    # build would start the resident server: this one runs on its own and leaves nothing.
    variables = [f"{k}={env[k]}" for k in ("DOCKER_HOST", "IMGBUILD_REGISTRY_MIRRORS", "NO_PROXY")]
    variables.append("IMGBUILD_SERVER=0")
    build = _build_args(project, docker_env, tmp_path / "cache", "progress-tty")
    command = (
        shlex.join(["env", "TERM=xterm-256color", *variables, *build])
        + f" > {tmp_path / 'stdout'}; echo $? > {done}; sleep 600"
    )
    subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "120", "-y", "40", command],
                   check=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        screen = subprocess.run(
            [TMUX, "capture-pane", "-p", "-J", "-t", session],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], check=False)
    print(screen)
    assert done.read_text().strip() == "0", screen
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    assert SUMMARY.match(lines[-1]), lines[-1]
    bars = [line for line in lines if "━" in line]
    # Bytes downloaded of the total, and the rate.
    assert any(re.search(r"download .* [\d.]+ [kMG]?B/[\d.]+ [kMG]?B [\d.]+ [kMG]?B/s", line)
               for line in bars), screen  # fmt: skip
    for phase, unit in (("install", "layers"), ("compile", "modules"), ("compress", "layers"),
                        ("push", "blobs")):  # fmt: skip
        assert any(phase in line and re.search(rf"(\d+)/\1 {unit}", line) for line in bars), screen


def test_a_pipe_gets_plain_lines_and_the_summary(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    args = _build_args(project, docker_env, tmp_path / "cache", "progress-pipe")
    run = subprocess.run(args, capture_output=True, text=True, env=_env(docker_env), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stderr and "\x1b" not in run.stdout
    lines = run.stderr.splitlines()
    assert all(line.startswith(("· ", "warning: ", "built ")) for line in lines), run.stderr
    assert "· install: " in run.stderr and "· push: " in run.stderr
    assert SUMMARY.match(lines[-1]), lines[-1]
    assert re.search(r"^pushed \S+@sha256:[0-9a-f]{64}$", run.stdout, re.M)

    quiet = subprocess.run([*args, "-q"], capture_output=True, text=True,
                           env=_env(docker_env), timeout=300)  # fmt: skip
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    assert quiet.stdout == run.stdout  # the same image, pushed to the same tag

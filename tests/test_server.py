"""The resident server, as real processes: what a build handed to it keeps of its caller
(directory, environment, streams, signals, exit status), who uses it by default, how it
starts, when it leaves, and where it refuses to live."""

from __future__ import annotations

import marshal
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import client

_WAIT = 60.0


def _env(where: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGBUILD_")}
    env.update(IMGBUILD_SERVER="1", IMGBUILD_SERVER_DIR=str(where), **extra)
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def _imgbuild(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagebuild", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=_WAIT, check=False,
    )  # fmt: skip


def _status(env: dict[str, str]) -> dict[str, int] | None:
    """The server's own answer to ``status`` (pid, builds taken), None if none answers."""
    result = _imgbuild(env, "server", "status")
    if result.returncode != 0:
        return None
    words = result.stdout.split()  # server running: pid N, M builds taken
    return {"pid": int(words[3].rstrip(",")), "builds": int(words[4])}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _until(check: object, what: str) -> None:
    deadline = time.monotonic() + _WAIT
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    """A private server directory; the server it ends up with is stopped after the test."""
    home = tmp_path / "srv"
    yield home
    status = _status(_env(home))
    _imgbuild(_env(home), "server", "stop")
    if status is not None and _alive(status["pid"]):
        os.kill(status["pid"], signal.SIGKILL)


@pytest.fixture
def serving(where: Path) -> dict[str, str]:
    """The environment of builds that go to a running server."""
    env = _env(where)
    started = _imgbuild(env, "server", "start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("server running: pid ")
    return env


def test_a_build_runs_in_the_server_with_the_callers_directory_and_environment(
    serving: dict[str, str], tmp_path: Path
) -> None:
    assert _status(serving) == {"pid": _status(serving)["pid"], "builds": 0}  # type: ignore[index]
    empty = tmp_path / "empty"
    empty.mkdir()
    # Its working directory is the caller's: "." is resolved there.
    result = _imgbuild(serving, "build", ".", cwd=empty)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: no pyproject.toml in {empty}; run imgbuild in a directory with a pyproject.toml"
    ]
    # Its environment is the caller's, not the server's (started without this variable).
    result = _imgbuild({**serving, "SOURCE_DATE_EPOCH": "soon"}, "build", ".", cwd=empty)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: SOURCE_DATE_EPOCH='soon' is not a number of seconds; "
        "set it to an integer, e.g. $(git log -1 --format=%ct)"
    ]
    assert _status(serving)["builds"] == 2  # type: ignore[index]


def test_without_a_server_the_build_runs_itself_then_starts_one(
    where: Path, tmp_path: Path
) -> None:
    env = _env(where)
    assert _status(env) is None
    result = _imgbuild(env, "build", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: no pyproject.toml in ")
    _until(lambda: _status(env) is not None, "the build left no server behind")
    assert _status(env)["builds"] == 0  # type: ignore[index]
    # Other commands never start one.
    _imgbuild(env, "server", "stop")
    assert _imgbuild(env, "bases").returncode == 0
    time.sleep(0.5)
    assert _status(env) is None


def test_a_build_not_asked_to_use_the_server_does_not(
    serving: dict[str, str], tmp_path: Path
) -> None:
    for value in ("0", ""):
        _imgbuild({**serving, "IMGBUILD_SERVER": value}, "build", str(tmp_path / "missing"))
    assert _status(serving)["builds"] == 0  # type: ignore[index]


def _hanging_project(tmp_path: Path) -> tuple[socket.socket, list[str]]:
    """A listener that never answers, and build arguments whose first request goes to it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(_WAIT)
    port = listener.getsockname()[1]
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "hang"\nversion = "1"\nrequires-python = ">=3.11"\n'
        'dependencies = ["colours"]\n\n[build-system]\nrequires = []\n'
        'build-backend = "backend"\nbackend-path = ["."]\n'
    )
    args = [
        "build", str(project), "--base", f"127.0.0.1:{port}/base:1",
        "--index-url", f"http://127.0.0.1:{port}/simple/",
        "--cache-dir", str(tmp_path / "cache"), "-o", f"oci:{tmp_path / 'out'}",
    ]  # fmt: skip
    return listener, args


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_callers_signal_reaches_the_build(
    serving: dict[str, str], tmp_path: Path, signum: int, status: int
) -> None:
    listener, args = _hanging_project(tmp_path)
    caller = subprocess.Popen(
        [sys.executable, "-m", "imagebuild", *args],
        env=serving, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with listener:
        waiting, _ = listener.accept()  # the build is under way, in the server's process
        with waiting:
            assert _status(serving)["builds"] == 1  # type: ignore[index]
            caller.send_signal(signum)
            _, err = caller.communicate(timeout=_WAIT)
    assert caller.returncode == status, err
    assert err.splitlines()[-1].startswith("error: "), err
    assert "interrupted" in err or "terminated" in err
    assert "Traceback" not in err


def test_a_caller_that_is_killed_ends_its_build(serving: dict[str, str], tmp_path: Path) -> None:
    pid = _status(serving)["pid"]  # type: ignore[index]
    listener, args = _hanging_project(tmp_path)
    caller = subprocess.Popen(
        [sys.executable, "-m", "imagebuild", *args],
        env=serving, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with listener:
        waiting, _ = listener.accept()
        with waiting:
            builds = _children(pid)
            assert len(builds) == 1
            caller.kill()
            caller.wait(timeout=_WAIT)
            _until(lambda: not _alive(builds[0]), "the build outlived its caller")
    assert _alive(pid)  # the server itself stays


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A pseudo-terminal: (its controlling side, the side a program sees as its terminal)."""
    controller, program = os.openpty()
    yield controller, program
    for fd in (controller, program):
        try:
            os.close(fd)
        except OSError:
            pass


def test_by_default_only_an_interactive_terminal_outside_ci_uses_the_server(
    terminal: tuple[int, int],
) -> None:
    tty = terminal[1]
    read, write = os.pipe()
    try:
        at_terminal, piped, stdin_only = (tty, tty), (read, write), (tty, write)
        cases = [
            ({}, at_terminal, True),
            ({"CI": "true"}, at_terminal, False),
            ({"CI": "1"}, at_terminal, False),
            ({"CI": "false"}, at_terminal, True),
            ({"IMGBUILD_SERVER": "  "}, at_terminal, True),
            ({}, piped, False),
            ({}, stdin_only, False),  # the error stream captured: a script or a test
            ({"IMGBUILD_SERVER": "0"}, at_terminal, False),
            ({"IMGBUILD_SERVER": "no"}, at_terminal, False),
            ({"IMGBUILD_SERVER": "1"}, piped, True),
            ({"IMGBUILD_SERVER": "1", "CI": "true"}, piped, True),
        ]
        for environ, streams, expected in cases:
            assert client.wanted(environ, streams) is expected, (environ, streams)
    finally:
        os.close(read)
        os.close(write)


def _at_terminal(env: dict[str, str], terminal: tuple[int, int], *args: str) -> tuple[int, str]:
    """``imgbuild *args`` with its standard input and error on ``terminal``: status, error text."""
    controller, program = terminal
    result = subprocess.run(
        [sys.executable, "-m", "imagebuild", *args],
        env=env, stdin=program, stdout=subprocess.PIPE, stderr=program, timeout=_WAIT,
        check=False,
    )  # fmt: skip
    os.close(program)
    text = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: nothing more, the other side is closed
            break
        if not chunk:
            break
        text += chunk
    return result.returncode, text.decode().replace("\r\n", "\n")


def _plain(text: str) -> str:
    """Terminal output without its control sequences, and with the lines they left empty."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", text.replace("\r", "\n"))
    return "\n".join(line for line in text.splitlines() if line.strip())


def test_a_build_at_a_terminal_starts_the_server_and_says_so(
    where: Path, tmp_path: Path, terminal: tuple[int, int]
) -> None:
    env = {k: v for k, v in _env(where).items() if k not in ("IMGBUILD_SERVER", "CI")}
    status, text = _at_terminal(env, terminal, "build", str(tmp_path / "missing"))
    assert status == 1
    # At a terminal the progress display draws first; the last lines are what is said.
    assert _plain(text).splitlines()[-2:] == [
        f"error: no pyproject.toml in {tmp_path / 'missing'}; run imgbuild in a directory "
        "with a pyproject.toml",
        "imgbuild: started a build server for the builds after this one "
        "(IMGBUILD_SERVER=0 turns it off; 'imgbuild server stop' ends it)",
    ]
    _until(lambda: _status(_env(where)) is not None, "the terminal's build left no server")


def test_a_build_at_a_terminal_in_ci_starts_no_server(
    where: Path, tmp_path: Path, terminal: tuple[int, int]
) -> None:
    env = {k: v for k, v in _env(where).items() if k != "IMGBUILD_SERVER"}
    status, text = _at_terminal({**env, "CI": "true"}, terminal, "build", str(tmp_path / "m"))
    assert status == 1
    assert _plain(text).splitlines()[-1] == (
        f"error: no pyproject.toml in {tmp_path / 'm'}; run imgbuild in a directory "
        "with a pyproject.toml"
    )
    assert "build server" not in text
    time.sleep(0.5)
    assert _status(_env(where)) is None


def test_an_idle_server_leaves_and_removes_its_socket(where: Path) -> None:
    env = _env(where, IMGBUILD_SERVER_IDLE="0.5")
    assert _imgbuild(env, "server", "start").returncode == 0
    _until(lambda: _status(env) is None, "the idle server stayed")
    assert not list(where.glob("*.sock"))
    assert not list(where.glob("*.lock"))


def test_stop_ends_the_server(serving: dict[str, str], where: Path) -> None:
    pid = _status(serving)["pid"]  # type: ignore[index]
    stopped = _imgbuild(serving, "server", "stop")
    assert stopped.stdout.strip() == f"server stopped: pid {pid}"
    _until(lambda: not _alive(pid), "the server outlived stop")
    assert not list(where.glob("*.sock"))
    assert _imgbuild(serving, "server", "stop").stdout.strip() == "server not running"


def test_a_directory_others_may_enter_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    env = _env(shared)
    result = _imgbuild(env, "server", "status")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: no server here: {shared}: other users may enter it (chmod 700 it); "
        "set IMGBUILD_SERVER_DIR to a private directory"
    ]
    # A build asked to use it runs in its own process, as without a server.
    built = _imgbuild(env, "build", str(tmp_path / "missing"))
    assert built.returncode == 1
    assert built.stderr.startswith("error: no pyproject.toml in ")
    assert not list(shared.iterdir())


def test_a_request_that_is_not_one_leaves_the_server_serving(serving: dict[str, str]) -> None:
    path = client.socket_path(serving["IMGBUILD_SERVER_DIR"], _identity(serving))
    junks = [
        b"not a message at all",
        (5).to_bytes(4, "big") + b"12",  # cut short
        _message([1, 2]),  # not a mapping
        _message({"op": "run"}),  # no streams passed with it
        b"",
    ]
    for junk in junks:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall(junk)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(_WAIT)
            assert conn.recv(100) == b""  # dropped, no build forked
    assert _status(serving)["builds"] == 0  # type: ignore[index]


def _message(value: object) -> bytes:
    data = marshal.dumps(value)
    return len(data).to_bytes(4, "big") + data


def _identity(env: dict[str, str]) -> str:
    """The server's name as the console script computes it."""
    found = list(Path(env["IMGBUILD_SERVER_DIR"]).glob("server-*.sock"))
    assert len(found) == 1
    return found[0].name.removeprefix("server-").removesuffix(".sock")


def test_the_name_follows_the_package_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    package = tmp_path / "imagebuild"
    package.mkdir()
    module = package / "cli.py"
    module.write_text("x = 1\n")
    (package / "notes.txt").write_text("not a module")
    monkeypatch.setattr(client, "__file__", str(package / "client.py"))
    first = client.identity()
    assert client.identity() == first
    (package / "notes.txt").write_text("still not a module")
    assert client.identity() == first
    module.write_text("x = 2\n")
    os.utime(module, ns=(1, 1))
    assert client.identity() != first

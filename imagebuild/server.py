"""A resident imgbuild that builds start from: imports done once, a process forked per build.

Asked for with ``IMGBUILD_SERVER=1``. A build then goes to a server of the user's that has
imported imgbuild and its dependencies once: starting Python and importing them is about
half of a small project's rebuild after a code change. Where none runs yet, the build runs
in its own process as always, and starts one as it leaves, for the builds after it.

Each build runs in a process forked from the server, so builds share nothing but the
imports (``fork`` copies the server; no build runs in it). That process takes the caller's
standard streams (passed over the socket: a terminal stays a terminal), environment,
working directory, umask and arguments before imgbuild's command line runs. The caller
forwards its signals (Ctrl-C, SIGTERM) to it and leaves with its exit status; a caller that
goes away (killed, its terminal closed) ends the build as SIGTERM does.

A server serves the imgbuild it was started from: its socket is named by the interpreter,
``sys.path``, the site directories' times and every module file of the package (size and
time), so an upgraded or edited imgbuild starts a new one, and the old one leaves within a
minute. A server leaves after ``IDLE_SECONDS`` without a build, on ``imgbuild server stop``,
or on SIGTERM. Sockets live in ``$XDG_RUNTIME_DIR/imgbuild``, else in
``<tmp>/imgbuild-<uid>``; a directory another user owns, or others may enter, is not used
(``IMGBUILD_SERVER_DIR`` names another).

Only the standard library is imported here: the console script (``imagebuild.launch``)
hands a build over without importing imgbuild's command line.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import importlib
import json
import os
import pkgutil
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SERVER_ENV = "IMGBUILD_SERVER"
"""``1``: builds go through the server (and start it); anything else: they do not."""
DIR_ENV = "IMGBUILD_SERVER_DIR"
"""Where sockets go, instead of the runtime directory."""
IDLE_ENV = "IMGBUILD_SERVER_IDLE"
"""Seconds without a build before the server leaves (default ``IDLE_SECONDS``)."""
IDLE_SECONDS = 3 * 3600
"""As Gradle's daemon: a working day's pauses, not a machine's uptime."""
SERVED = ("build",)
"""The commands a server runs: those that never read the terminal."""
SERVE_ARG = "--serve-builds"
"""What ``python -m imagebuild.launch`` is given to become a server."""
_RECHECK_SECONDS = 60.0
"""How often an idle server checks whether the imgbuild it serves was changed or upgraded."""
_REQUEST_SECONDS = 5.0
"""How long the server waits for a connection's request before dropping it."""


_serving: list[Path] = []
"""In a build a server forked: the server's directory (the list is empty elsewhere)."""


class ServerUnavailable(Exception):
    """No server can be used here (the reason is the message)."""


def wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether ``IMGBUILD_SERVER`` asks for the server."""
    return environ.get(SERVER_ENV, "").strip() == "1"


def served(argv: list[str]) -> bool:
    """Whether the command in ``argv`` (``sys.argv``) is one a server runs."""
    return len(argv) > 1 and argv[1] in SERVED


def home() -> Path:
    """The user's server directory, made private if new; ``ServerUnavailable`` if unsafe."""
    given = os.environ.get(DIR_ENV, "").strip()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if given:
        where = Path(given)
    elif runtime and os.path.isdir(runtime):
        where = Path(runtime) / "imgbuild"
    else:
        where = Path(tempfile.gettempdir()) / f"imgbuild-{os.getuid()}"
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(where)
    except OSError as exc:
        raise ServerUnavailable(f"{where}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ServerUnavailable(f"{where}: not a directory of this user's")
    if info.st_mode & 0o077:
        raise ServerUnavailable(f"{where}: other users may enter it (chmod 700 it)")
    return where


def identity() -> str:
    """What names this imgbuild's server: interpreter, import path, the package's modules."""
    digest = hashlib.sha256()
    # sys.path[0] is the script's directory, or the working directory under ``-m``: not ours.
    path = sys.path[1:]
    digest.update(f"{sys.executable}\0{sys.version}\0{path!r}\0".encode())
    package = Path(__file__).parent
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                info = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), package)
                digest.update(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    for entry in path:
        if os.path.basename(entry) not in ("site-packages", "dist-packages"):
            continue
        try:  # a distribution installed or removed there changes the directory's time
            digest.update(f"{entry}\0{os.stat(entry).st_mtime_ns}\0".encode())
        except OSError:
            continue
    return digest.hexdigest()[:16]


def serving_home() -> Path | None:
    """The server's directory in a build it runs (resident hook processes live there)."""
    return _serving[0] if _serving else None


def socket_path(where: Path, ident: str) -> Path:
    """The socket of the server named ``ident``."""
    return where / f"server-{ident}.sock"


# -- the caller --------------------------------------------------------------------------


def run_through(argv: list[str]) -> int | None:
    """Run ``argv`` in the server and return its exit status; None: no server took it.

    None means the command did not start (no server listens, or the streams cannot be
    passed), so the caller runs it itself.
    """
    try:
        path = socket_path(home(), identity())
    except ServerUnavailable:
        return None
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return None  # a closed standard stream cannot be handed over
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        umask = os.umask(0o022)
        os.umask(umask)
        request = {
            "op": "run",
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": umask,
            "streams": [[s.encoding, s.errors] for s in (sys.stdin, sys.stdout, sys.stderr)],
        }
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        answers = conn.makefile("rb")
        started = _answer(answers)
    except (OSError, ValueError):
        conn.close()
        return None
    if started is None or not isinstance(started.get("pid"), int):
        conn.close()
        return None
    pid = started["pid"]
    forward = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
    for signum in forward:
        signal.signal(signum, lambda signum, frame: _send(pid, signum))
    try:
        ended = _answer(answers)
    except (OSError, ValueError):
        ended = None
    conn.close()
    if ended is None or not isinstance(ended.get("status"), int):
        print(
            f"error: imgbuild's server: the build (pid {pid}) ended without an exit status; "
            f"run it again with {SERVER_ENV}=0 to build without the server",
            file=sys.stderr,
        )
        return 1
    return int(ended["status"])


def _answer(answers: Any) -> dict[str, Any] | None:
    line = answers.readline()
    if not line:
        return None
    value = json.loads(line)
    return value if isinstance(value, dict) else None


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def start_in_background() -> None:
    """Start this imgbuild's server, detached, unless one already listens."""
    try:
        where = home()
        path = socket_path(where, identity())
    except ServerUnavailable:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return  # one runs
    except OSError:
        pass
    finally:
        probe.close()
    log = open(where / "server.log", "ab")  # noqa: SIM115  # handed to the server
    with log:
        subprocess.Popen(
            # From "/": never import a module of the caller's project by its name.
            [sys.executable, "-m", "imagebuild.launch", SERVE_ARG],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def control(op: str) -> dict[str, Any] | None:
    """Ask this imgbuild's server ``status`` or ``stop``; its answer, None if none runs."""
    path = socket_path(home(), identity())
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(_REQUEST_SECONDS)
    try:
        conn.connect(str(path))
        conn.sendall(json.dumps({"op": op}).encode() + b"\n")
        return _answer(conn.makefile("rb"))
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


# -- the server --------------------------------------------------------------------------


def serve(idle: float, run: Callable[[], int]) -> None:
    """Serve builds until ``idle`` seconds pass without one, or a stop; one server a name.

    ``run`` runs the command ``sys.argv`` names and returns its exit status (``cli``'s
    ``run_command``), in each forked process.
    """
    where = home()
    ident = identity()
    _serving[:] = [where]  # what the forked builds see; no build runs in the server itself
    lock = open(where / f"server-{ident}.lock", "w")  # noqa: SIM115  # held for life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server of this name runs
    _preload()
    path = socket_path(where, ident)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(64)
    bound = os.stat(path).st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # builds are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"imgbuild server {ident}: pid {os.getpid()}, {path}", flush=True)
    last = time.monotonic()
    state = {"pid": os.getpid(), "identity": ident, "builds": 0}
    try:
        while (left := idle - (time.monotonic() - last)) > 0:
            if not select.select([server], [], [], min(left, _RECHECK_SECONDS))[0]:
                # No request for a while: leave if the imgbuild it serves changed (nobody
                # will ask for this name again).
                if identity() != ident:
                    break
                continue
            conn, _ = server.accept()
            builds = state["builds"]
            if not _take(conn, server, lock, state, run):
                break
            if state["builds"] != builds:  # asking for the status is no use
                last = time.monotonic()
    finally:
        try:
            if os.stat(path).st_ino == bound:
                path.unlink()
        except OSError:
            pass
        Path(lock.name).unlink(missing_ok=True)
        _stop_resident_hooks(where)


def _stop_resident_hooks(where: Path) -> None:
    """Ask the resident backend processes builds started here to leave (``build.resident``)."""
    for path in sorted(where.glob("hooks-*.sock")):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(1.0)
        try:
            conn.connect(str(path))
            conn.sendall(json.dumps({"op": "stop"}).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()


def _preload() -> None:
    """Import every module of imgbuild, and so what they import.

    A build forked from here imports nothing again. Importing runs no build and reads
    nothing of a caller's (environment, directory).
    """
    import imagebuild

    for module in pkgutil.walk_packages(imagebuild.__path__, "imagebuild."):
        if module.name != "imagebuild.__main__":
            importlib.import_module(module.name)


def _take(
    conn: socket.socket,
    server: socket.socket,
    lock: Any,
    state: dict[str, Any],
    run: Callable[[], int],
) -> bool:
    """Answer one connection; False when it asked the server to stop.

    ``state`` is what ``status`` answers: the server's pid, its name, the builds it took.
    """
    fds: list[int] = []
    try:
        conn.settimeout(_REQUEST_SECONDS)
        request, fds = _receive(conn)
        op = request.get("op")
        if op in ("status", "stop"):
            conn.sendall(json.dumps(state).encode() + b"\n")
            return bool(op != "stop")
        if op != "run" or len(fds) != 3:
            return True
        state["builds"] += 1
        if os.fork() == 0:
            server.close()
            lock.close()
            _build(conn, request, fds, run)  # never returns
        return True
    except (OSError, ValueError):
        return True
    finally:
        conn.close()
        for fd in fds:
            os.close(fd)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request line and the descriptors sent with it."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise ValueError("request cut short")
        data += more
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("request is not an object")
    return request, list(fds)


def _build(
    conn: socket.socket, request: dict[str, Any], fds: list[int], run: Callable[[], int]
) -> None:
    """In the forked process: become the caller's command, run it, answer its status.

    Until the process has answered its pid, nothing of the command has run: a failure then
    goes to the server's log, and the caller, answered nothing, runs the command itself.
    """
    log = os.dup(2)
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        conn.settimeout(None)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        fds.clear()
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # read again from TMPDIR
        os.umask(int(request["umask"]))
        _streams(request["streams"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    except BaseException as exc:  # noqa: BLE001  # nothing may leave this process alive
        os.write(log, f"imgbuild server: cannot take a build: {exc!r}\n".encode())
        os._exit(1)
    os.close(log)
    status = 1
    try:
        threading.Thread(target=_end_with_caller, args=(conn,), daemon=True).start()
        status = run()
        atexit._run_exitfuncs()
    except BaseException as exc:  # noqa: BLE001  # nothing may leave this process alive
        print(f"error: imgbuild's server: the build failed: {exc!r}", file=sys.stderr)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(json.dumps({"status": status}).encode() + b"\n")
        finally:
            os._exit(status)


def _streams(streams: list[list[str]]) -> None:
    """Text streams over the caller's descriptors, with its encodings, as Python makes them.

    stdout is line-buffered on a terminal, stderr always.
    """
    (in_enc, in_err), (out_enc, out_err), (err_enc, err_err) = streams
    sys.stdin = open(0, encoding=in_enc, errors=in_err, closefd=False)  # noqa: SIM115
    sys.stdout = open(  # noqa: SIM115
        1, "w", encoding=out_enc, errors=out_err, closefd=False, buffering=1 if os.isatty(1) else -1
    )
    sys.stderr = open(2, "w", encoding=err_enc, errors=err_err, closefd=False, buffering=1)  # noqa: SIM115


def _end_with_caller(conn: socket.socket) -> None:
    """The caller gone (killed, or its terminal closed), end the build as SIGTERM does."""
    try:
        while conn.recv(64):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)

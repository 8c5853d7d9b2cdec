"""A resident imgbuild that builds start from: imports done once, a process forked per build.

Used at an interactive terminal, or with ``IMGBUILD_SERVER=1`` (``client.wanted``). A build
then goes to a server of the user's that has imported imgbuild and its dependencies once:
starting Python and importing them is about half of a small project's rebuild after a code
change. Where none runs yet, the build runs
in its own process as always, and starts one as it leaves, for the builds after it.

Each build runs in a process forked from the server, so builds share nothing but the
imports (``fork`` copies the server; no build runs in it). That process takes the caller's
standard streams (passed over the socket: a terminal stays a terminal), environment,
working directory, umask and arguments before imgbuild's command line runs. The caller
(``client.run_through``) forwards its signals (Ctrl-C, SIGTERM) to it and leaves with its
exit status; a caller that goes away (killed, its terminal closed) ends the build as
SIGTERM does.

A server leaves after ``IDLE_SECONDS`` without a build, on ``imgbuild server stop``, on
SIGTERM, or within a minute of the imgbuild it serves being changed (``client.identity``).
As it leaves it stops the resident backend processes its builds started
(``build.resident``).
"""

from __future__ import annotations

import atexit
import fcntl
import importlib
import marshal
import os
import pkgutil
import select
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from imagebuild.build.resident import stop_residents
from imagebuild.client import CONTROL_SECONDS, home, identity, send, serving_in, socket_path

IDLE_SECONDS = 3 * 3600
"""As Gradle's daemon: a working day's pauses, not a machine's uptime."""
_RECHECK_SECONDS = 60.0
"""How often an idle server checks whether the imgbuild it serves was changed or upgraded."""


def serve(idle: float, run: Callable[[], int]) -> None:
    """Serve builds until ``idle`` seconds pass without one, or a stop; one server a name.

    ``run`` runs the command ``sys.argv`` names and returns its exit status (``cli``'s
    ``run_command``), in each forked process. ``client.ServerUnavailable`` when the
    directory cannot be used.
    """
    where = Path(home())
    ident = identity()
    serving_in(str(where))  # what the forked builds see; no build runs in the server itself
    lock = open(where / f"server-{ident}.lock", "w")  # noqa: SIM115  # held for life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server of this name runs
    _preload()
    path = Path(socket_path(str(where), ident))
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    bound = os.stat(path).st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # builds are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"imgbuild server {ident}: pid {os.getpid()}, {path}", flush=True)
    try:
        _loop(listener, lock, idle, ident, run)
    finally:
        try:
            if os.stat(path).st_ino == bound:
                path.unlink()
        except OSError:
            pass
        Path(lock.name).unlink(missing_ok=True)
        stop_residents(where)  # the backend processes its builds started


def _loop(
    listener: socket.socket, lock: IO[str], idle: float, ident: str, run: Callable[[], int]
) -> None:
    last = time.monotonic()
    state = {"pid": os.getpid(), "identity": ident, "builds": 0}
    while (left := idle - (time.monotonic() - last)) > 0:
        if not select.select([listener], [], [], min(left, _RECHECK_SECONDS))[0]:
            # No request for a while: leave if the imgbuild it serves changed (nobody will
            # ask for this name again).
            if identity() != ident:
                return
            continue
        conn, _ = listener.accept()
        builds = state["builds"]
        if not _take(conn, listener, lock, state, run):
            return
        if state["builds"] != builds:  # asking for the status is no use
            last = time.monotonic()


def _preload() -> None:
    """Import every module of imgbuild, and so what they import.

    A build forked from here imports nothing again. Importing runs no build and reads
    nothing of a caller's (environment, directory).
    """
    import imagebuild

    for module in pkgutil.walk_packages(imagebuild.__path__, "imagebuild."):
        if module.name != "imagebuild.__main__":
            importlib.import_module(module.name)
    import httpx

    from imagebuild.errors import ImagebuildError
    from imagebuild.net.http import trusted_context
    from imagebuild.target.base import load_catalog

    try:
        load_catalog()  # kept: every build reads it
    except ImagebuildError:
        pass  # a build reports it

    try:  # for builds whose certificates are the server's (``trusted_context``)
        context = trusted_context()
    except (OSError, ValueError):
        return  # a build that needs them reports it
    # httpx imports its connection pool (httpcore, h11) when it makes its first transport.
    httpx.HTTPTransport(verify=context).close()


def _take(
    conn: socket.socket,
    listener: socket.socket,
    lock: IO[str],
    state: dict[str, Any],
    run: Callable[[], int],
) -> bool:
    """Answer one connection; False when it asked the server to stop.

    ``state`` is what ``status`` answers: the server's pid, its name, the builds it took.
    """
    fds: list[int] = []
    try:
        conn.settimeout(CONTROL_SECONDS)
        request, fds = _receive(conn)
        op = request.get("op")
        if op in ("status", "stop"):
            send(conn, state)
            return bool(op != "stop")
        if op != "run" or len(fds) != 3:
            return True
        state["builds"] += 1
        if os.fork() == 0:
            listener.close()
            lock.close()
            _build(conn, request, fds, run)  # never returns
        return True
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return True
    finally:
        conn.close()
        for fd in fds:
            os.close(fd)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request and the descriptors sent with it (at most three)."""
    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    fds = list(fds)
    try:
        if len(head) < 4:
            head += conn.recv(4 - len(head), socket.MSG_WAITALL)
        size = int.from_bytes(head, "big")
        body = conn.recv(size, socket.MSG_WAITALL) if size else b""
        if len(head) != 4 or len(body) != size:
            raise ValueError("request cut short")
        request = marshal.loads(body)
        if not isinstance(request, dict):
            raise ValueError("request is not a mapping")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


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
        send(conn, {"pid": os.getpid()})
    except BaseException as exc:  # noqa: BLE001  # nothing may leave this process alive
        os.write(log, f"imgbuild server: cannot take a build: {exc!r}\n".encode())
        os._exit(1)
    os.close(log)
    _run_and_answer(conn, run)


def _run_and_answer(conn: socket.socket, run: Callable[[], int]) -> None:
    """Run the command, answer its status, then clean up after it, and leave.

    The caller has its answer once the command's output is out: the exit handlers (a
    compile server waited for, temporary files) run after it, no longer holding a code
    change's rebuild about 15 ms. A caller gone before the answer ends the build as SIGTERM
    does; once answered, its going away ends nothing.
    """
    status = 1
    answered = threading.Event()
    try:
        threading.Thread(target=_end_with_caller, args=(conn, answered), daemon=True).start()
        status = run()
    except BaseException as exc:  # noqa: BLE001  # nothing may leave this process alive
        print(f"error: imgbuild's server: the build failed: {exc!r}", file=sys.stderr)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        answered.set()
        send(conn, {"status": status})
    except BaseException:  # noqa: BLE001, S110  # a caller gone: nobody to tell
        pass
    try:
        atexit._run_exitfuncs()
    finally:
        os._exit(status)


def _streams(streams: list[tuple[str, str]]) -> None:
    """Text streams over the caller's descriptors, with its encodings, as Python makes them.

    stdout is line-buffered on a terminal, stderr always.
    """
    (in_enc, in_err), (out_enc, out_err), (err_enc, err_err) = streams
    sys.stdin = open(0, encoding=in_enc, errors=in_err, closefd=False)  # noqa: SIM115
    sys.stdout = open(  # noqa: SIM115
        1, "w", encoding=out_enc, errors=out_err, closefd=False, buffering=1 if os.isatty(1) else -1
    )
    sys.stderr = open(2, "w", encoding=err_enc, errors=err_err, closefd=False, buffering=1)  # noqa: SIM115


def _end_with_caller(conn: socket.socket, answered: threading.Event) -> None:
    """End the build as SIGTERM does when its caller goes (killed, terminal closed).

    Once answered, the caller's going away ends nothing.
    """
    try:
        while conn.recv(64):
            pass
    except OSError:
        pass
    if not answered.is_set():
        os.kill(os.getpid(), signal.SIGTERM)

"""The resident server's caller side: find this imgbuild's server, hand it a build, wait.

The console script imports this module first, on every run, so it imports as little as it
can: CPython's own ``_socket`` and ``_signal``, ``marshal``, ``zlib``; no ``socket``,
``json`` or ``hashlib`` (their imports alone cost a served build about 20 ms, a tenth of
it). Messages are ``marshal``-ed values behind a 4-byte length: both ends are the same
interpreter (its version names the server). What the server does is in ``server``.

A server serves the imgbuild it was started from: its socket is named by the interpreter,
``sys.path``, the site directories' times and every module file of the package (size and
time), so an upgraded or edited imgbuild gets a new one. Sockets live in
``$XDG_RUNTIME_DIR/imgbuild``, else in ``<tmp>/imgbuild-<uid>``; a directory another user
owns, or others may enter, is not used (``IMGBUILD_SERVER_DIR`` names another).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.py imports enum: 5 ms
import _socket
import marshal
import os
import stat
import sys
import zlib

TYPE_CHECKING = False  # typing and collections.abc cost this module 9 ms more than it has
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

SERVER_ENV = "IMGBUILD_SERVER"
"""``1``: builds go through the server (and start it); ``0`` (anything else): they do not;
unset or empty: they do at an interactive terminal outside CI (``wanted``)."""
DIR_ENV = "IMGBUILD_SERVER_DIR"
"""Where sockets go, instead of the runtime directory."""
IDLE_ENV = "IMGBUILD_SERVER_IDLE"
"""Seconds without a build before the server leaves (default ``server.IDLE_SECONDS``)."""
SERVE_ARG = "--serve-builds"
"""What ``python -m imagebuild.launch`` is given to become a server."""
SERVED = ("build",)
"""The commands a server runs: those that never read the terminal."""
CONTROL_SECONDS = 5.0
"""How long a control request (status, stop) or a request to the server may take."""
_FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


class ServerUnavailable(Exception):
    """No server can be used here (the reason is the message)."""


_serving: list[str] = []
"""In a build a server forked: the server's directory (the list is empty elsewhere). Kept
here, imported by every run, so a build asks it without importing the server's module."""


def serving_in(where: str) -> None:
    """In the server: the builds it forks run for ``where`` (``serving_home``)."""
    _serving[:] = [where]


def serving_home() -> str | None:
    """The server's directory in a build it runs (resident hook processes live there)."""
    return _serving[0] if _serving else None


def wanted(environ: Mapping[str, str] = os.environ, streams: tuple[int, ...] = (0, 2)) -> bool:
    """Whether builds go through the server: as ``IMGBUILD_SERVER`` says, else by default.

    By default only a developer's builds do, as a build tool's daemon is on for them and
    off for machines: the standard input and the error stream (``streams``) are terminals,
    and ``CI`` is not set (CI services set it; a runner's builds would only pay for a
    server that its next job never meets). Scripts, pipes and tests get no server unasked.
    """
    value = environ.get(SERVER_ENV, "").strip()
    if value:
        return value == "1"
    if environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return all(os.isatty(fd) for fd in streams)


def served(argv: list[str]) -> bool:
    """Whether the command in ``argv`` (``sys.argv``) is one a server runs."""
    return len(argv) > 1 and argv[1] in SERVED


def home() -> str:
    """The user's server directory, made private if new; ``ServerUnavailable`` if unsafe."""
    given = os.environ.get(DIR_ENV, "").strip()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if given:
        where = given
    elif runtime and os.path.isdir(runtime):
        where = os.path.join(runtime, "imgbuild")
    else:
        where = os.path.join(_temporary(), f"imgbuild-{os.getuid()}")
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        info = os.lstat(where)
    except OSError as exc:
        raise ServerUnavailable(f"{where}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ServerUnavailable(f"{where}: not a directory of this user's")
    if info.st_mode & 0o077:
        raise ServerUnavailable(f"{where}: other users may enter it (chmod 700 it)")
    return where


def _temporary() -> str:
    """The temporary directory as ``tempfile`` picks it, for the usual cases."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name, "")
        if value and os.path.isdir(value):
            return value
    return "/tmp"


def identity() -> str:
    """What names this imgbuild's server: interpreter, import path, the package's modules."""
    # sys.path[0] is the script's directory, or the working directory under ``-m``: not ours.
    path = sys.path[1:]
    parts = [sys.executable, sys.version, repr(path)]
    package = os.path.dirname(os.path.abspath(__file__))
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                info = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), package)
                parts.append(f"{rel}:{info.st_size}:{info.st_mtime_ns}")
    for entry in path:
        if os.path.basename(entry) in ("site-packages", "dist-packages"):
            try:  # a distribution installed or removed there changes the directory's time
                parts.append(f"{entry}:{os.stat(entry).st_mtime_ns}")
            except OSError:
                continue
    data = "\0".join(parts).encode()
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def socket_path(where: str, ident: str) -> str:
    """The socket of the server named ``ident``."""
    return os.path.join(where, f"server-{ident}.sock")


def send(conn: _socket.socket, value: Any, fds: list[int] | None = None) -> None:
    """One message: ``value`` marshalled, behind its length; ``fds`` passed along with it."""
    data = marshal.dumps(value)
    data = len(data).to_bytes(4, "big") + data
    if fds:
        import array

        rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = conn.sendmsg([data], rights)
    else:
        sent = conn.send(data)
    if sent < len(data):
        conn.sendall(data[sent:])


def receive(conn: _socket.socket) -> Any:
    """One message's value; None when the other end closed first."""
    head = _exactly(conn, 4)
    if head is None:
        return None
    body = _exactly(conn, int.from_bytes(head, "big"))
    return None if body is None else marshal.loads(body)


def _exactly(conn: _socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            return None
        data += more
    return data


def connect(path: str, timeout: float | None) -> _socket.socket:
    """A connection to the socket at ``path``; ``OSError`` when nobody listens."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except BaseException:
        conn.close()
        raise
    return conn


def run_through(argv: list[str]) -> int | None:
    """Run ``argv`` in the server and return its exit status; None: no server took it.

    None means the command did not start (no server listens, or the streams cannot be
    passed), so the caller runs it itself.
    """
    try:
        path = socket_path(home(), identity())
        for fd in (0, 1, 2):
            os.fstat(fd)  # a closed standard stream cannot be handed over
        conn = connect(path, CONTROL_SECONDS)
    except (ServerUnavailable, OSError):
        return None
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        request = {
            "op": "run",
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": umask,
            "streams": [(s.encoding, s.errors) for s in (sys.stdin, sys.stdout, sys.stderr)],
        }
        try:
            send(conn, request, [0, 1, 2])
            started = receive(conn)
        except (OSError, ValueError, EOFError):
            return None
        if not isinstance(started, dict) or not isinstance(started.get("pid"), int):
            return None  # the server did not start it: nothing of it ran
        pid = started["pid"]
        for signum in _FORWARDED:
            _signal.signal(signum, lambda signum, frame: _forward(pid, signum))
        conn.settimeout(None)
        try:
            ended = receive(conn)
        except (OSError, ValueError, EOFError):
            ended = None
    finally:
        conn.close()
    if not isinstance(ended, dict) or not isinstance(ended.get("status"), int):
        print(
            f"error: imgbuild's server: the build (pid {pid}) ended without an exit status; "
            f"run it again with {SERVER_ENV}=0 to build without the server",
            file=sys.stderr,
        )
        return 1
    return int(ended["status"])


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def control(op: str) -> dict[str, Any] | None:
    """Ask this imgbuild's server ``status`` or ``stop``; its answer, None if none runs."""
    path = socket_path(home(), identity())
    try:
        conn = connect(path, CONTROL_SECONDS)
    except OSError:
        return None
    try:
        send(conn, {"op": op})
        answer = receive(conn)
    except (OSError, ValueError, EOFError):
        return None
    finally:
        conn.close()
    return answer if isinstance(answer, dict) else None


def start_for_next_builds() -> None:
    """At the exit of a build that ran itself: start the server for the builds after it.

    Starting one is said in a line of its own, since a process is left running.
    """
    try:
        started = start_in_background()
    except OSError as exc:
        sys.stderr.write(f"imgbuild: could not start the build server: {exc}\n")
        return
    if started:
        sys.stderr.write(
            "imgbuild: started a build server for the builds after this one "
            "(IMGBUILD_SERVER=0 turns it off; 'imgbuild server stop' ends it)\n"
        )


def start_in_background() -> bool:
    """Start this imgbuild's server, detached, unless one already listens (then False)."""
    import subprocess

    try:
        where = home()
        connect(socket_path(where, identity()), CONTROL_SECONDS).close()
        return False  # one runs
    except ServerUnavailable:
        return False
    except OSError:
        pass
    with open(os.path.join(where, "server.log"), "ab") as log:
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
    return True

"""PEP 517 hooks forked from a resident process that has imported the backend already.

Only under imgbuild's resident server (``imagebuild.server``), where builds follow each
other in the same terminal: a code change's wheel otherwise pays for a new interpreter
and the backend's imports (hatchling: about 0.1 s, most of a small project's wheel).

A resident backend process is started with exactly what a hook's process gets: the build
environment's interpreter, the project directory, the whole environment. It imports the
backend, then forks once per hook: each hook still runs in a process of its own, that
no other hook ran in (PEP 517 asks for a fresh process so that backends may change global
state). After a hook, the modules it imported from the build environment or the standard
library (never the project's) are imported by the resident process too, for the next fork.

A resident process is named by all of that (interpreter, environment, directory, backend,
the environment's making), so anything that differs gets another one; an in-tree backend
(``backend-path``), whose code is the project's and changes with it, never gets one. While
none answers, the hook runs in a fresh process as everywhere else, and one is started for
the next hook. It leaves after ``IDLE_SECONDS`` without a hook, when another takes its
name, or when asked (``{"op": "stop"}``: the resident server asks as it leaves).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

READY_MARKER = ".imgbuild-ready"
"""The file a kept build environment gets once whole (``pep517``): when it was made."""
IDLE_SECONDS = 1800
"""How long a resident backend process waits for a hook before it leaves."""

_BACKEND_VARIABLE = "_PYPROJECT_HOOKS_BUILD_BACKEND"
_BACKEND_PATH_VARIABLE = "_PYPROJECT_HOOKS_BACKEND_PATH_JSON"
_CONNECT_SECONDS = 5.0

# Run by the build environment's interpreter (``python -c``): it has only the standard
# library and the backend's requirements, not imgbuild.
_RESIDENT = r"""
import importlib, json, os, select, signal, socket, sys, threading, time, traceback, types

path, script, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
roots = tuple(
    os.path.realpath(p) + os.sep
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
)
sys.path[:] = [p for p in sys.path if p]  # -c put the working directory first; a script does not
backend = os.environ["_PYPROJECT_HOOKS_BUILD_BACKEND"].partition(":")[0]
importlib.import_module(backend)
# The hook script, compiled once (6 ms a hook): each fork runs it as runpy.run_path would.
with open(script, "rb") as source:
    code = compile(source.read(), script, "exec", dont_inherit=True)


def ours(module):
    where = getattr(module, "__file__", None)
    return bool(where) and os.path.realpath(where).startswith(roots)


def hook(conn, argv, fds):
    server.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in ((1, fds[0]), (2, fds[1])):
        os.dup2(fd, target)
        os.close(fd)
    before = set(sys.modules)
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    status = 0
    try:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(script))  # as for a script; the hook removes it
        main = types.ModuleType("__main__")
        main.__dict__.update(__file__=script, __cached__=None, __package__="")
        sys.modules["__main__"] = main
        exec(code, main.__dict__)
    except SystemExit as exc:
        if isinstance(exc.code, int):
            status = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    learned = sorted(n for n, m in list(sys.modules.items()) if n not in before and ours(m))
    conn.sendall(json.dumps({"status": status, "modules": learned}).encode() + b"\n")
    os._exit(status)


server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server.bind(path)
server.listen(16)
bound = os.stat(path).st_ino
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
last = time.monotonic()
try:
    while (left := idle - (time.monotonic() - last)) > 0:
        if not select.select([server], [], [], min(left, 60))[0]:
            if os.stat(path).st_ino != bound:
                break  # another took the name: nobody will reach this one
            continue
        conn, _ = server.accept()
        fds = []
        try:
            conn.settimeout(5)
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            request = json.loads(data)
            if request.get("op") == "stop":
                break
            if request.get("op") == "learn":
                for name in request["modules"]:
                    try:
                        importlib.import_module(name)
                    except Exception:
                        pass
                if threading.active_count() > 1:
                    break  # a module started a thread: forking from here is no longer safe
                continue
            if len(fds) != 2:
                continue
            last = time.monotonic()
            if os.fork() == 0:
                conn.settimeout(None)
                hook(conn, request["argv"], fds)
        except (OSError, ValueError, KeyError):
            pass
        finally:
            conn.close()
            for fd in fds:
                os.close(fd)
finally:
    try:
        if os.stat(path).st_ino == bound:
            os.unlink(path)
    except OSError:
        pass
"""


class NotServed(Exception):
    """No resident process ran the hook (none answers, or it could not start it)."""


def resident_name(cmd: Sequence[str], cwd: str | None, env: Mapping[str, str]) -> str | None:
    """What names the resident process for a hook; None: this hook gets none."""
    if cwd is None or env.get(_BACKEND_PATH_VARIABLE) or not env.get(_BACKEND_VARIABLE):
        return None
    python = Path(cmd[0])
    try:
        made = (python.parent.parent / READY_MARKER).stat().st_mtime_ns
    except OSError:
        return None  # not a kept environment: a throwaway one is gone after this build
    digest = hashlib.sha256()
    for part in (str(python), cmd[1], cwd, str(made), json.dumps(sorted(env.items()))):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def run_resident(
    home: Path, cmd: Sequence[str], cwd: str, env: Mapping[str, str]
) -> tuple[int, str, str]:
    """Run the hook ``cmd`` forked from its resident process: its status, stdout, stderr.

    ``NotServed`` when none took it; then the hook has not run, and a resident process is
    started for the next one.
    """
    name = resident_name(cmd, cwd, env)
    if name is None:
        raise NotServed("no resident process for this hook")
    where = home / f"hooks-{name}.sock"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            answer = _fork_hook(where, cmd, out, err)
        except NotServed:
            _start(where, cmd, cwd, env)
            raise
        status = answer.get("status")
        status = status if isinstance(status, int) else 1
        out.seek(0)
        err.seek(0)
        said = (out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))
    modules = answer.get("modules")
    if status == 0 and isinstance(modules, list) and modules:
        _send(where, {"op": "learn", "modules": modules})
    return status, *said


def _fork_hook(where: Path, cmd: Sequence[str], out: IO[bytes], err: IO[bytes]) -> dict[str, Any]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with conn:
        conn.settimeout(_CONNECT_SECONDS)
        try:
            conn.connect(str(where))
            request = json.dumps({"op": "hook", "argv": list(cmd[1:])}).encode()
            socket.send_fds(conn, [request], [out.fileno(), err.fileno()])
            conn.shutdown(socket.SHUT_WR)
            answers = conn.makefile("rb")
            started = json.loads(answers.readline() or b"null")
        except (OSError, ValueError) as exc:
            raise NotServed(str(exc)) from None
        if not isinstance(started, dict) or not isinstance(started.get("pid"), int):
            raise NotServed("the resident process did not start the hook")
        conn.settimeout(None)  # a hook takes as long as it takes, as a process would
        try:
            ended = json.loads(answers.readline() or b"null")
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): the hook goes with the build, as a subprocess.
            _kill(started["pid"])
            raise
    if not isinstance(ended, dict):
        return {"status": 1}  # it died without a word (killed): a failed hook
    return ended


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _send(where: Path, message: dict[str, Any]) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with conn:
        conn.settimeout(_CONNECT_SECONDS)
        try:
            conn.connect(str(where))
            conn.sendall(json.dumps(message).encode())
        except OSError:
            pass


def stop_residents(home: Path) -> None:
    """Ask every resident backend process listening in ``home`` to leave."""
    for where in sorted(home.glob("hooks-*.sock")):
        _send(where, {"op": "stop"})


def _start(where: Path, cmd: Sequence[str], cwd: str, env: Mapping[str, str]) -> None:
    """Start the resident process for hooks like ``cmd``, detached; it binds ``where``."""
    try:
        subprocess.Popen(
            [cmd[0], "-c", _RESIDENT, str(where), cmd[1], str(IDLE_SECONDS)],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        pass  # the hook ran in a fresh process; the next one will too

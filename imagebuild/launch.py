"""The ``imgbuild`` console script: a build asked to use the server is handed to it first.

Only the standard library and ``imagebuild.server`` are imported before that, so a build the
server takes never imports imgbuild's command line in this process. Anything else, or a
build no server takes, runs here through ``imagebuild.cli.main``; such a build, asked to use
the server, leaves one behind as it exits, for the builds after it.

``python -m imagebuild.launch --serve-builds`` is the server itself (``imagebuild.server``).
"""

from __future__ import annotations

import atexit
import os
import sys


def main() -> None:
    """Run ``imgbuild`` with ``sys.argv``, through the server when asked and one listens."""
    from imagebuild import server

    if server.wanted() and server.served(sys.argv):
        status = server.run_through(sys.argv)
        if status is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        # cli.main runs the exit handlers before it leaves: the server starts after the build.
        atexit.register(server.start_in_background)
    from imagebuild.cli import main as run_here

    run_here()


def serve() -> None:
    """Be this imgbuild's server until it is idle, stopped or replaced."""
    from imagebuild import server
    from imagebuild.cli import run_command

    idle = float(os.environ.get(server.IDLE_ENV) or server.IDLE_SECONDS)
    try:
        server.serve(idle, run_command)
    except server.ServerUnavailable as exc:
        print(f"imgbuild server: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-builds"]:
        serve()
    else:
        main()

"""The ``imgbuild`` console script: a build meant for the server is handed to it first.

Only ``imagebuild.client`` (the standard library's cheapest parts) is imported before that,
so a build the server takes never imports imgbuild's command line in this process.
Anything else, or a build no server takes, runs here through ``imagebuild.cli.main``; such a
build, asked to use the server, leaves one behind as it exits, for the builds after it.

``python -m imagebuild.launch --serve-builds`` is the server itself (``imagebuild.server``).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Run ``imgbuild`` with ``sys.argv``, through the server when asked and one listens."""
    from imagebuild import client

    if client.wanted() and client.served(sys.argv):
        status = client.run_through(sys.argv)
        if status is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        import atexit

        # cli.main runs the exit handlers before it leaves: the server starts after the build.
        atexit.register(client.start_for_next_builds)
    from imagebuild.cli import main as run_here

    run_here()


def serve() -> None:
    """Be this imgbuild's server until it is idle, stopped or replaced."""
    from imagebuild import client, server
    from imagebuild.cli import click_command, run_command

    click_command()  # made here once, not in each build forked from here
    idle = float(os.environ.get(client.IDLE_ENV) or server.IDLE_SECONDS)
    try:
        server.serve(idle, run_command)
    except client.ServerUnavailable as exc:
        print(f"imgbuild server: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from imagebuild.client import SERVE_ARG

    if sys.argv[1:] == [SERVE_ARG]:
        serve()
    else:
        main()

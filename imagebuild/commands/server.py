"""``imgbuild server``: the resident process builds start from (``client.wanted``).

``start`` starts it (a build asked to use it starts it too), ``status`` says whether it
runs, ``stop`` ends it. Each speaks of the server of this imgbuild (interpreter and
package): another installation's server is its own.
"""

from __future__ import annotations

import time
from typing import NoReturn

import typer

from imagebuild import client
from imagebuild.commands.wiring import fail
from imagebuild.errors import ImagebuildError

server_app = typer.Typer(
    help=(
        "The resident process builds start from: at a terminal, or with IMGBUILD_SERVER=1 "
        "(IMGBUILD_SERVER=0: never)."
    ),
    no_args_is_help=True,
)

_START_SECONDS = 30.0
"""How long ``start`` waits for the server to answer (it imports imgbuild first)."""


@server_app.command("start")
def start() -> None:
    """Start the server, unless it runs; wait until it answers."""
    answer = _control("status")
    if answer is None:
        try:
            client.start_in_background()
        except OSError as exc:
            _refuse(f"cannot start the server: {exc}", f"see {_home()}/server.log")
        deadline = time.monotonic() + _START_SECONDS
        while answer is None and time.monotonic() < deadline:
            time.sleep(0.05)
            answer = _control("status")
        if answer is None:
            _refuse(
                f"the server did not answer within {_START_SECONDS:.0f} s",
                f"see {_home()}/server.log",
            )
    typer.echo(_running(answer))


@server_app.command("status")
def status() -> None:
    """Say whether the server runs (exit 1 if not)."""
    answer = _control("status")
    if answer is None:
        typer.echo("server not running")
        raise typer.Exit(1)
    typer.echo(_running(answer))


@server_app.command("stop")
def stop() -> None:
    """Stop the server; builds it has started finish first."""
    answer = _control("stop")
    typer.echo("server not running" if answer is None else f"server stopped: pid {answer['pid']}")


def _running(answer: dict[str, object]) -> str:
    return f"server running: pid {answer.get('pid')}, {answer.get('builds')} builds taken"


def _control(op: str) -> dict[str, object] | None:
    try:
        return client.control(op)
    except client.ServerUnavailable as exc:
        _refuse(f"no server here: {exc}", f"set {client.DIR_ENV} to a private directory")


def _home() -> str:
    try:
        return client.home()
    except client.ServerUnavailable:
        return "its directory"


def _refuse(message: str, hint: str) -> NoReturn:
    fail(ImagebuildError(message, hint=hint), verbose=False)

"""The FastAPI app and the `hello-api` console script (serve, or --self-test over loopback)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from typing import Any

import uvicorn
from fastapi import FastAPI

app = FastAPI(title="hello-api")


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/hello/{name}")
def hello(name: str) -> dict[str, str]:
    return {"message": f"Hello, {name}!"}


def _get_json(url: str) -> Any:
    # No proxy handler: the self-test talks to loopback only, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return json.load(response)


def self_test() -> dict[str, Any]:
    """Serve the app on a free loopback port in a thread, query it, stop it."""
    # Bind the socket ourselves and hand it to uvicorn, so there is no race for the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        responses = {path: _get_json(base + path) for path in ("/health", "/hello/world")}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    return {"responses": responses, "uid": os.getuid(), "python": sys.version}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hello-api", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="serve on a free loopback port, query /health and /hello/world, print JSON",
    )
    args = parser.parse_args(argv)
    if args.self_test:
        result = self_test()
        print(json.dumps(result, sort_keys=True))
        return 0 if result["responses"]["/health"] == {"status": "ok"} else 1
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(run())

"""A registry that trickles bytes cannot hang a pull: every registry request has a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imagebuild.errors import RegistryError
from imagebuild.image.name import ImageReference
from imagebuild.net.http import RetryPolicy, Timeouts, http_client
from imagebuild.sinks.remote import RegistryClient


class _Trickle(BaseHTTPRequestHandler):
    stop = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/v2/":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        # One byte well inside the read timeout, for ever (until the test is over).
        for _ in range(200):
            if self.stop.is_set():
                return
            try:
                self.wfile.write(b" ")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.1)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trickling_registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    _Trickle.stop.set()
    server.shutdown()
    server.server_close()


def test_a_trickling_manifest_fails_in_bounded_time(trickling_registry: str) -> None:
    timeouts = Timeouts(connect=1.0, read=1.0, deadline=1.0, min_rate=1e12)
    retry = RetryPolicy(attempts=2, backoff=0.01)
    started = time.monotonic()
    with (
        http_client(retry=retry, timeouts=timeouts) as http,
        pytest.raises(RegistryError) as caught,
    ):
        RegistryClient(http).fetch_manifest(ImageReference.parse(f"{trickling_registry}/app:1"))
    assert time.monotonic() - started < 8
    message = str(caught.value)
    assert "deadline" in message and "\n" not in message

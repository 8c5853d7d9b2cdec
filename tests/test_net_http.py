"""The retry transport against a real server on 127.0.0.1 that fails on purpose."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import certifi
import httpx
import pytest

from imagebuild.net.http import (
    RetryPolicy,
    attempts,
    http_client,
    is_replayable,
    retry_after,
    retrying_client,
    trusted_context,
)

# One scripted fault per request, in order; "ok" once the script runs out.
Fault = str


class FaultServer:
    """An HTTP server in a thread that answers each request with the next scripted fault."""

    def __init__(self, script: list[Fault]) -> None:
        self.script = list(script)
        self.seen: list[tuple[str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.seen.append((self.command, self.rfile.read(length)))
                fault = outer.script.pop(0) if outer.script else "ok"
                if fault == "reset":
                    # SO_LINGER 0: close() sends a TCP RST instead of a FIN.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                status, _, retry = fault.partition(":")
                code = 200 if status == "ok" else int(status)
                body = b"hello" if code == 200 else b"nope"
                self.send_response(code)
                if retry:
                    self.send_header("Retry-After", retry)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/thing"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[list[Fault]], FaultServer]]:
    made: list[FaultServer] = []

    def start(script: list[Fault]) -> FaultServer:
        made.append(FaultServer(script))
        return made[-1]

    yield start
    for server in made:
        server.close()


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def client(waits: list[float]) -> Iterator[httpx.Client]:
    with http_client(retry=RetryPolicy(attempts=3, backoff=0.5, sleep=waits.append)) as made:
        yield made


def test_a_503_then_a_200(
    serve: Callable[[list[Fault]], FaultServer], client: httpx.Client, waits: list[float]
) -> None:
    server = serve(["503"])
    response = client.get(server.url)
    assert (response.status_code, response.text) == (200, "hello")
    assert attempts(response) == 2
    assert waits == [0.5]


def test_429_waits_as_retry_after_asks_capped(
    serve: Callable[[list[Fault]], FaultServer], client: httpx.Client, waits: list[float]
) -> None:
    server = serve(["429:2", "429:3600"])
    response = client.get(server.url)
    assert response.status_code == 200
    assert waits == [2.0, 30.0]  # the second wait is capped at max_wait


def test_a_reset_connection_is_retried(
    serve: Callable[[list[Fault]], FaultServer], client: httpx.Client, waits: list[float]
) -> None:
    server = serve(["reset"])
    response = client.get(server.url)
    assert response.text == "hello"
    assert attempts(response) == 2
    assert len(server.seen) == 2


def test_always_500_gives_up_after_the_bound(
    serve: Callable[[list[Fault]], FaultServer], client: httpx.Client, waits: list[float]
) -> None:
    server = serve(["500"] * 10)
    response = client.get(server.url)
    assert response.status_code == 500
    assert attempts(response) == 3
    assert len(server.seen) == 3
    assert waits == [0.5, 1.0]


def test_always_reset_raises_the_last_error(
    serve: Callable[[list[Fault]], FaultServer], client: httpx.Client
) -> None:
    server = serve(["reset"] * 10)
    with pytest.raises(httpx.TransportError) as caught:
        client.get(server.url)
    assert attempts(caught.value) == 3
    assert len(server.seen) == 3


def test_a_404_is_not_retried(
    serve: Callable[[list[Fault]], FaultServer], client: httpx.Client, waits: list[float]
) -> None:
    server = serve(["404", "404"])
    assert client.get(server.url).status_code == 404
    assert len(server.seen) == 1
    assert waits == []


def test_only_replayable_bodies_are_retried(
    serve: Callable[[list[Fault]], FaultServer], client: httpx.Client
) -> None:
    server = serve(["503"])
    response = client.post(server.url, content=b"payload")
    assert response.status_code == 200
    assert server.seen == [("POST", b"payload"), ("POST", b"payload")]

    def chunks() -> Iterator[bytes]:
        yield b"once"

    server = serve(["503"])
    response = client.put(server.url, content=chunks())
    assert response.status_code == 503  # a consumed stream cannot be sent again
    assert attempts(response) == 1
    assert len(server.seen) == 1


def test_a_mock_transport_client_retries_too() -> None:
    answers = [httpx.Response(502), httpx.Response(200, text="fine")]
    waits: list[float] = []
    transport = httpx.MockTransport(lambda request: answers.pop(0))
    with retrying_client(transport, retry=RetryPolicy(sleep=waits.append)) as made:
        assert made.get("http://127.0.0.1:9/x").text == "fine"
    assert waits == [0.1]


def test_retry_after_forms() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after(httpx.Response(429, headers={"Retry-After": "7"})) == 7.0
    assert retry_after(httpx.Response(429, headers={"Retry-After": later}), now=now) == 90.0
    assert retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert retry_after(httpx.Response(429)) is None


def test_replayable_requests() -> None:
    assert is_replayable(httpx.Request("GET", "http://x/"))
    assert is_replayable(httpx.Request("PUT", "http://x/", content=b"abc"))
    assert not is_replayable(httpx.Request("PUT", "http://x/", content=iter([b"abc"])))


def test_the_client_honours_ssl_cert_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A proxy's CA comes from SSL_CERT_FILE: the run's client must read it (trust_env), when
    it first sends a request; a file that is missing fails that request in one line, at once."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing-ca.pem"))
    waits: list[float] = []
    with http_client(retry=RetryPolicy(attempts=3, sleep=waits.append)) as client:
        with pytest.raises(httpx.ConnectError) as info:
            client.get("https://127.0.0.1:9/")
    assert waits == []  # not retried: the file will not appear
    message = str(info.value)
    assert "\n" not in message
    assert "SSL_CERT_FILE" in message and "missing-ca.pem" in message


def test_a_run_that_sends_nothing_never_loads_the_certificates(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing-ca.pem"))
    with http_client():
        pass


def test_the_trusted_context_is_made_once_per_certificates(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The resident server makes it before forking builds: made again only when the
    variables name other files, or the files changed."""
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first = trusted_context()
    assert trusted_context() is first
    os.utime(bundle, ns=(1, 1))
    changed = trusted_context()
    assert changed is not first
    other = tmp_path / "other.pem"
    shutil.copy(bundle, other)
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    assert trusted_context() not in (first, changed)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert trusted_context() is changed


def test_plain_http_needs_no_certificates_and_a_redirect_to_tls_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A registry or index served over plain HTTP (a CI runner's loopback, a private
    mirror) is answered without loading the certificates; anything sent over TLS, a
    redirect from plain HTTP included, still goes through the verifying transport."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/away":
                self.send_response(307)
                self.send_header("Location", "https://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing-ca.pem"))
    try:
        with http_client(retry=RetryPolicy(attempts=1)) as client:
            assert client.get(f"{url}/here").content == b"ok"
            with pytest.raises(httpx.ConnectError, match="missing-ca.pem"):
                client.get(f"{url}/away", follow_redirects=True)
    finally:
        server.shutdown()
        server.server_close()

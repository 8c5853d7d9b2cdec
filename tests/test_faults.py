"""Network faults against a server of our own on 127.0.0.1: nothing hangs, broken bodies are
retried, no secret is printed.

Each case is a row: which transfer (a wheel download, an sdist download, an index page, a
metadata file), the faults the server plays for it, request by request, and what must come
of it. Timeouts are tiny and the server's slow shapes are bounded, so the file runs in a few
seconds; the list of fault shapes played is printed at the end of the module.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name

from imagebuild.build.sdist import build_sdist_wheel
from imagebuild.errors import ImagebuildError
from imagebuild.index.simple import SimpleIndex
from imagebuild.install.fetch import WheelCache, fetch_wheels
from imagebuild.lock.model import Digest, WheelFile
from imagebuild.net.http import RetryPolicy, Timeouts, http_client
from tests.fixtures.index_server import make_sdist, make_wheel, wheel_metadata

SECRET = "s3cret-pa55"
READ = 0.15  # seconds of silence that count as a stall
DEADLINE = 1.0  # seconds for one whole transfer
SLOW_LIMIT = 4.0  # the server's slow shapes give up after this long, whatever happens
TIMEOUTS = Timeouts(connect=1.0, read=READ, deadline=DEADLINE, min_rate=1e12)
NO_INDEX = ("http://127.0.0.1:9/simple/",)

SHAPES_PLAYED: list[str] = []


class FaultServer:
    """Serves ``content`` by path; each request of a path plays the next fault scripted for it."""

    def __init__(self) -> None:
        self.content: dict[str, tuple[bytes, str]] = {}
        self.script: dict[str, list[str]] = {}
        self.log: list[tuple[str, str]] = []
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def add(self, path: str, body: bytes, faults: list[str], content_type: str = "") -> str:
        self.content[path] = (body, content_type or "application/octet-stream")
        self.script[path] = list(faults)
        return self.base + path

    def requests(self, path: str) -> int:
        return sum(1 for seen, _ in self.log if seen == path)

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                script = outer.script.get(path, [])
                shape = script.pop(0) if script else "ok"
                outer.log.append((path, shape))
                SHAPES_PLAYED.append(shape)
                body, content_type = outer.content.get(path, (b"", ""))
                try:
                    outer.play(self, shape, body, content_type)
                except OSError:  # the client gave up first: that is the point
                    pass
                self.close_connection = True

        return Handler

    def play(self, h: BaseHTTPRequestHandler, shape: str, body: bytes, content_type: str) -> None:
        name, _, arg = shape.partition(":")
        if name == "stall-headers":
            self.stopping.wait(SLOW_LIMIT)
            return
        if name in ("404", "500", "429"):
            h.send_response(int(name))
            h.send_header("Connection", "close")
            if arg:
                h.send_header("Retry-After", arg)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        # Every answer ends its connection: a pooled one the server already closed would
        # cost the client an attempt the script did not play.
        h.send_header("Connection", "close")
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        half = max(1, len(body) // 2)
        if name == "ok":
            h.wfile.write(body)
        elif name == "reset-mid-body":
            h.wfile.write(body[:half])
            h.wfile.flush()
            # SO_LINGER 0: close() sends a TCP RST instead of a FIN.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        elif name == "truncate":
            h.wfile.write(body[:half])
        elif name == "stall-body":
            h.wfile.write(body[:half])
            h.wfile.flush()
            self.stopping.wait(SLOW_LIMIT)
        elif name == "trickle":  # one byte at a time, each well inside the read timeout
            end = time.monotonic() + SLOW_LIMIT
            for i in range(len(body)):
                if time.monotonic() > end or self.stopping.wait(READ / 4):
                    return
                h.wfile.write(body[i : i + 1])
                h.wfile.flush()
        else:
            raise AssertionError(f"unknown fault shape {shape!r}")


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    shapes = sorted(set(SHAPES_PLAYED) - {"ok"})
    line = f"fault shapes tried ({len(SHAPES_PLAYED)} requests): {', '.join(shapes)}"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    made = FaultServer()
    yield made
    made.close()


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def http(waits: list[float]) -> Iterator[httpx.Client]:
    policy = RetryPolicy(attempts=3, backoff=0.0, sleep=waits.append)
    with http_client(retry=policy, timeouts=TIMEOUTS) as client:
        yield client


# -- the four transfers ----------------------------------------------------------------------

Transfer = Callable[[httpx.Client, FaultServer, list[str], Path, str], object]


def _with_secret(url: str) -> str:
    return url.replace("http://", f"http://user:{SECRET}@", 1)


def wheel_download(
    http: httpx.Client, server: FaultServer, faults: list[str], tmp: Path, auth: str
) -> object:
    built = make_wheel(tmp / "src", "faulty", "1.0")
    data = built.read_bytes()
    url = server.add(f"/files/{built.name}", data, faults)
    wheel = WheelFile(
        filename=built.name,
        url=_with_secret(url) if auth else url,
        sha256=Digest("sha256:" + hashlib.sha256(data).hexdigest()),
        size=len(data),
    )
    path = fetch_wheels(http, [wheel], WheelCache(tmp / "cache" / "wheels"))[wheel]
    assert path.read_bytes() == data
    return path


def sdist_download(
    http: httpx.Client, server: FaultServer, faults: list[str], tmp: Path, auth: str
) -> object:
    built = make_sdist(tmp / "src", "faulty", "1.0")
    data = built.read_bytes()
    url = server.add(f"/files/{built.name}", data, faults)
    return build_sdist_wheel(
        http,
        _with_secret(url) if auth else url,
        hashlib.sha256(data).hexdigest(),
        built.name,
        tmp / "cache",
        indexes=NO_INDEX,
    )


def _index(server: FaultServer, tmp: Path, page_faults: list[str], meta_faults: list[str]) -> str:
    built = make_wheel(tmp / "src", "faulty", "1.0")
    meta = wheel_metadata(built)
    server.add(f"/files/{built.name}", built.read_bytes(), [])
    server.add(f"/files/{built.name}.metadata", meta, meta_faults)
    page = {
        "meta": {"api-version": "1.1"},
        "name": "faulty",
        "files": [
            {
                "filename": built.name,
                "url": f"../../files/{built.name}",
                "hashes": {"sha256": hashlib.sha256(built.read_bytes()).hexdigest()},
                "core-metadata": {"sha256": hashlib.sha256(meta).hexdigest()},
            }
        ],
    }
    body = json.dumps(page).encode()
    server.add("/simple/faulty/", body, page_faults, "application/vnd.pypi.simple.v1+json")
    return server.base + "/simple/"


def index_page(
    http: httpx.Client, server: FaultServer, faults: list[str], tmp: Path, auth: str
) -> object:
    url = _index(server, tmp, faults, [])
    with SimpleIndex(http, [_with_secret(url) if auth else url], cache_dir=tmp / "cache") as index:
        files = index.files(canonicalize_name("faulty"))
    assert [f.filename for f in files] == ["faulty-1.0-py3-none-any.whl"]
    return files


def metadata_file(
    http: httpx.Client, server: FaultServer, faults: list[str], tmp: Path, auth: str
) -> object:
    url = _index(server, tmp, [], faults)
    with SimpleIndex(http, [_with_secret(url) if auth else url], cache_dir=tmp / "cache") as index:
        (file,) = index.files(canonicalize_name("faulty"))
        meta = index.metadata(file)
    assert str(meta.version) == "1.0"
    return meta


TRANSFERS: dict[str, Transfer] = {
    "wheel": wheel_download,
    "sdist": sdist_download,
    "page": index_page,
    "metadata": metadata_file,
}


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    transfer: str
    faults: tuple[str, ...]
    expect: str | None  # None: the transfer succeeds; else a regex the one-line error matches
    requests: int  # requests the server saw for the faulty path


BROKEN_BODY = r"(peer closed connection|RemoteProtocolError|ReadError|reset)"
CASES: dict[str, Case] = {}
for _t in TRANSFERS:
    CASES[f"{_t}-reset-mid-body-once"] = Case(_t, ("reset-mid-body",), None, 2)
    CASES[f"{_t}-truncated-twice"] = Case(_t, ("truncate", "truncate"), None, 3)
    CASES[f"{_t}-truncated-always"] = Case(_t, ("truncate",) * 5, BROKEN_BODY, 3)
    CASES[f"{_t}-stall-body-always"] = Case(_t, ("stall-body",) * 5, r"read timeout", 3)
    CASES[f"{_t}-trickle"] = Case(_t, ("trickle",) * 5, r"deadline for one transfer", 1)
CASES["wheel-stall-headers-always"] = Case("wheel", ("stall-headers",) * 5, r"read timeout", 3)
CASES["wheel-429-retry-after-then-ok"] = Case("wheel", ("429:0",), None, 2)
CASES["page-500-once-then-ok"] = Case("page", ("500",), None, 2)
CASES["sdist-500-always"] = Case("sdist", ("500",) * 5, r"failed 3 times, last: HTTP 500", 3)


def _faulty_path(server: FaultServer, transfer: str) -> str:
    ends = {"page": ("/simple/faulty/",), "metadata": (".metadata",)}
    wanted = ends.get(transfer, (".whl", ".tar.gz"))
    (path,) = [p for p in server.script if p.endswith(wanted) and server.requests(p)]
    return path


@pytest.mark.parametrize("case_id", list(CASES))
def test_fault(
    case_id: str, http: httpx.Client, server: FaultServer, tmp_path: Path, waits: list[float]
) -> None:
    case = CASES[case_id]
    start = time.monotonic()
    run = TRANSFERS[case.transfer]
    if case.expect is None:
        run(http, server, list(case.faults), tmp_path, "")
    else:
        with pytest.raises(ImagebuildError) as caught:
            run(http, server, list(case.faults), tmp_path, "")
        message = str(caught.value)
        assert "\n" not in message
        assert re.search(case.expect, message), message
        assert server.base in message  # the line names the URL
        assert "; " in message  # and says what to do
    elapsed = time.monotonic() - start
    # Bounded: every attempt's read timeout, or the one deadline, plus the work around it.
    assert elapsed < 3 * READ + DEADLINE + 1.5, f"took {elapsed:.1f} s"
    assert server.requests(_faulty_path(server, case.transfer)) == case.requests
    assert not list(tmp_path.rglob("*.part")), "a partial download was left behind"
    if case.expect is not None and case.transfer == "wheel":
        assert not [p for p in (tmp_path / "cache").rglob("*.whl")], "a cache entry was written"


def test_retry_after_is_honoured_on_a_wheel_download(
    server: FaultServer, tmp_path: Path, waits: list[float]
) -> None:
    policy = RetryPolicy(attempts=3, backoff=0.0, sleep=waits.append)
    patient = Timeouts(connect=1.0, read=READ, deadline=30.0)
    with http_client(retry=policy, timeouts=patient) as http:
        wheel_download(http, server, ["429:7", "429:0"], tmp_path, "")
    assert waits == [7.0, 0.0]  # the recorded waits: the test itself does not sleep


def test_a_retry_after_past_the_deadline_gives_up_at_once(
    http: httpx.Client, server: FaultServer, tmp_path: Path, waits: list[float]
) -> None:
    with pytest.raises(ImagebuildError, match=r"answered 429"):
        wheel_download(http, server, ["429:3600"], tmp_path, "")
    assert waits == []


SECRET_CASES = {
    f"{transfer}-{shape}": (transfer, shape)
    for transfer in TRANSFERS
    for shape in ("truncate", "404", "500")
    # A missing page only means "no such project", a missing metadata file "read the wheel".
    if shape != "404" or transfer in ("wheel", "sdist")
}


@pytest.mark.parametrize("case_id", list(SECRET_CASES))
def test_credentials_in_a_failing_url_are_redacted(
    case_id: str, http: httpx.Client, server: FaultServer, tmp_path: Path
) -> None:
    transfer, shape = SECRET_CASES[case_id]
    with pytest.raises(ImagebuildError) as caught:
        TRANSFERS[transfer](http, server, [shape] * 5, tmp_path, "auth")
    message = str(caught.value)
    assert SECRET not in message
    assert "***@127.0.0.1" in message, message

"""Debian stage fixtures: a session cache, HTTP clients, the real archive, loopback mirrors.

- ``debian_cache``: the Debian bucket of a cache shared by the whole session, so the
  archive's indexes and .debs are downloaded (and parsed) once per run;
- ``debian_http``: one ``http_client`` for the session (it goes through the proxy);
- ``offline_http``: a client that fails every request, to show a call hits the cache;
- ``debian_release`` / ``debian_packages``: a suite's verified Release and its Packages
  index, fetched once per session (tests that use them are marked ``debian``);
- ``loopback_mirror``: a Debian mirror on 127.0.0.1 that passes requests through to
  deb.debian.org except for paths it was given bytes (or a 404) of its own, so a test can
  serve a tampered InRelease, index or .deb next to the real rest of the archive;
  ``static_mirror``: the same with no upstream, for synthetic archives;
- ``make_release``: a Release value over files a test serves (no signature involved).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from imagebuild.cache import CacheLayout
from imagebuild.debian.archive import Release, fetch_packages, fetch_release
from imagebuild.debian.model import ArchiveSource, IndexedPackage
from imagebuild.digest import digest_bytes
from imagebuild.net.http import NO_RETRY, http_client

DEBIAN_MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def source_for(suite: str, mirror: str | None = None) -> ArchiveSource:
    """The ArchiveSource of ``suite`` on deb.debian.org (security suites on their mirror)."""
    if mirror is None:
        mirror = SECURITY_MIRROR if suite.endswith("-security") else DEBIAN_MIRROR
    return ArchiveSource(mirror=mirror, suite=suite)


@pytest.fixture(scope="session")
def debian_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian bucket of a cache kept for the whole session."""
    return CacheLayout(tmp_path_factory.mktemp("debian-cache")).debian


@pytest.fixture(scope="session")
def debian_http() -> Iterator[httpx.Client]:
    """The session's HTTP client (retries, deadlines, the environment's proxy)."""
    with http_client() as client:
        yield client


@pytest.fixture
def offline_http() -> Iterator[httpx.Client]:
    """A client whose every request fails: a call that succeeds with it used the cache."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"no network in this test: {request.method} {request.url}")

    with http_client(transport=httpx.MockTransport(refuse), retry=NO_RETRY) as client:
        yield client


@pytest.fixture(scope="session")
def debian_release(debian_http: httpx.Client, debian_cache: Path) -> Callable[[str], Release]:
    """``get(suite)``: the suite's verified Release from deb.debian.org, once per session."""
    seen: dict[str, Release] = {}
    lock = threading.Lock()

    def get(suite: str) -> Release:
        with lock:
            if suite not in seen:
                seen[suite] = fetch_release(debian_http, source_for(suite), cache=debian_cache)
            return seen[suite]

    return get


@pytest.fixture(scope="session")
def debian_packages(
    debian_http: httpx.Client, debian_cache: Path, debian_release: Callable[[str], Release]
) -> Callable[[str, str], tuple[IndexedPackage, ...]]:
    """``get(suite, arch)``: the suite's main Packages index for ``arch``, once per session."""
    seen: dict[tuple[str, str], tuple[IndexedPackage, ...]] = {}
    lock = threading.Lock()

    def get(suite: str, arch: str) -> tuple[IndexedPackage, ...]:
        with lock:
            if (suite, arch) not in seen:
                release = debian_release(suite)
                seen[suite, arch] = fetch_packages(
                    debian_http, release, arch=arch, cache=debian_cache
                )
            return seen[suite, arch]

    return get


def make_release(mirror: str, files: dict[str, bytes], *, suite: str = "test") -> Release:
    """A Release of ``mirror`` whose SHA256 table lists ``files`` (path -> bytes)."""
    return Release(
        source=ArchiveSource(mirror=mirror, suite=suite),
        suite=suite,
        codename=suite,
        date=datetime(2026, 1, 1, tzinfo=UTC),
        valid_until=None,
        architectures=("amd64", "arm64"),
        components=("main",),
        acquire_by_hash=False,
        sha256={path: (digest_bytes(data), len(data)) for path, data in files.items()},
        inrelease=digest_bytes(b""),
        signers=(),
    )


class LoopbackMirror:
    """A mirror on 127.0.0.1: its own bytes for some paths, ``upstream``'s for the rest.

    ``serve(path, data)`` answers ``path`` (below the mirror root) with ``data``;
    ``hide(path)`` answers it 404; every other GET is fetched from ``upstream`` with
    ``http`` and passed on with its status (404 when there is no upstream).
    ``requests`` lists the paths asked, in order.
    """

    def __init__(self, upstream: str | None, http: httpx.Client) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.requests: list[str] = []
        self._http = http
        self._served: dict[str, bytes | None] = {}
        self._lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                status, body = mirror._answer(self.path.lstrip("/"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """The mirror root, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve(self, path: str, data: bytes) -> None:
        """Answer GET ``path`` with ``data`` instead of upstream's bytes."""
        with self._lock:
            self._served[path.lstrip("/")] = data

    def hide(self, path: str) -> None:
        """Answer GET ``path`` with 404 Not Found."""
        with self._lock:
            self._served[path.lstrip("/")] = None

    def count(self, path: str) -> int:
        """How many times ``path`` was asked for."""
        with self._lock:
            return self.requests.count(path.lstrip("/"))

    def upstream_bytes(self, path: str) -> bytes:
        """The bytes ``upstream`` serves at ``path`` (to tamper with)."""
        assert self.upstream is not None, "a mirror without upstream"
        response = self._http.get(f"{self.upstream}/{path.lstrip('/')}")
        response.raise_for_status()
        return response.content

    def _answer(self, path: str) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(path)
            known = path in self._served
            data = self._served.get(path)
        if known or self.upstream is None:
            return (404, b"not found") if data is None else (200, data)
        response = self._http.get(f"{self.upstream}/{path}")
        return response.status_code, response.content

    def start(self) -> None:
        """Start serving in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def loopback_mirror(debian_http: httpx.Client) -> Iterator[LoopbackMirror]:
    """A loopback mirror in front of deb.debian.org/debian, for this test only."""
    mirror = LoopbackMirror(DEBIAN_MIRROR, debian_http)
    mirror.start()
    try:
        yield mirror
    finally:
        mirror.stop()


@pytest.fixture
def static_mirror(debian_http: httpx.Client) -> Iterator[LoopbackMirror]:
    """A loopback mirror with no upstream: only what a test serves, 404 for the rest."""
    mirror = LoopbackMirror(None, debian_http)
    mirror.start()
    try:
        yield mirror
    finally:
        mirror.stop()

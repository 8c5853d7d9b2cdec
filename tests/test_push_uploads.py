"""Blob uploads (sinks.upload) against a registry of our own on loopback, for failure shapes.

The fake speaks enough of the distribution API to take a push (HEAD, POST with and without a
mount, PATCH chunks with their Content-Range, the status GET, PUT ``?digest=``, manifests) and
keeps what it was sent, so each test checks what the registry ends up holding. ``fault`` lets
a test make it answer 429 or 5xx, reset the connection half-way through a body, refuse
chunks, or drop an upload session, as real registries and proxies do. The real registry's
side (mount, chunks, parallel pushes) is in tests/integration/test_push_uploads.py.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from imagebuild.digest import digest_bytes
from imagebuild.errors import RegistryError
from imagebuild.image.model import Image, ImageConfig
from imagebuild.image.mutate import build_image
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
from imagebuild.net.http import RetryPolicy, retrying_client
from imagebuild.sinks import upload
from imagebuild.sinks.remote import RegistryClient
from imagebuild.sinks.upload import BlobOrigins
from tests.fixtures.replies import send_reply

CREATED = "2024-01-01T00:00:00Z"


def layered_image(store: BlobStore, tmp_path: Path, name: str, sizes: Sequence[int]) -> Image:
    """An image with one layer of ``size`` random bytes (about as big gzipped) per size."""
    layers = []
    for i, size in enumerate(sizes):
        staging = tmp_path / f"{name}-{i}"
        (staging / "data").mkdir(parents=True)
        (staging / "data" / f"{name}-{i}.bin").write_bytes(os.urandom(size))
        layers.append(build_layer(staging, store, mtime=0, created_by=f"imgbuild: {name} {i}"))
    return build_image(None, layers, config=ImageConfig(), created=CREATED, store=store)


# ---------------------------------------------------------------------------------------------
# The fake registry


@dataclass(frozen=True)
class Request:
    """One request as the fake saw it (before its body was read)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass(frozen=True)
class Fault:
    """What the fake does instead of answering normally.

    ``reply``: answer ``status`` without acting; ``after``: act, then answer ``status``
    instead (the answer to a request that got through was lost); ``reset``: read half the
    body and reset the connection (the upload session is then dropped, as distribution
    drops one whose body broke off); ``slow``: wait ``delay`` seconds, then act.
    """

    kind: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Reply = tuple[int, dict[str, str], bytes]


def _errors(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class FakeRegistry:
    """Repositories of blobs and manifests in memory, served on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}  # digest -> bytes
        self.repos: dict[str, set[str]] = {}  # repository -> digests linked there
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.sessions: dict[str, bytearray] = {}
        self.seen: list[tuple[Request, int]] = []
        self.fault: Callable[[Request], Fault | None] = lambda request: None
        self.chunks = True  # whether PATCH is taken
        self.mounts = True  # whether a mount is done (else declined with a session)
        self._lock = threading.Lock()
        self._next = 0
        self.host = ""

    def requests(self, method: str, part: str = "") -> list[tuple[Request, int]]:
        """What was asked with ``method`` on a path containing ``part``, with the status."""
        return [(r, s) for r, s in self.seen if r.method == method and part in r.path]

    def handle(self, request: Request, body: bytes) -> Reply:
        """Act on one request as distribution would."""
        parts = request.path.removeprefix("/v2/").split("/")
        if "blobs" in parts and parts[-1] != "" and parts[-2] == "blobs":
            return self._blob(request, "/".join(parts[:-2]), parts[-1])
        if "uploads" in parts:
            i = parts.index("blobs")
            return self._upload(request, "/".join(parts[:i]), parts[-1], body)
        if "manifests" in parts:
            name, tag = "/".join(parts[:-2]), parts[-1]
            self.manifests[(name, tag)] = body
            return 201, {"Docker-Content-Digest": digest_bytes(body)}, b""
        return 404, {}, _errors("NOT_FOUND", request.path)

    def _blob(self, request: Request, name: str, digest: str) -> Reply:
        if digest not in self.repos.get(name, set()):
            return 404, {}, _errors("BLOB_UNKNOWN", digest)
        return 200, {"Content-Type": "application/octet-stream"}, self.data[digest]

    def _upload(self, request: Request, name: str, session: str, body: bytes) -> Reply:
        if request.method == "POST":
            mount, source = request.query.get("mount"), request.query.get("from")
            if mount and source and self.mounts and mount in self.repos.get(source, set()):
                self.repos.setdefault(name, set()).add(mount)
                return 201, {"Location": f"/v2/{name}/blobs/{mount}"}, b""
            with self._lock:
                self._next += 1
                session = f"s{self._next}"
            self.sessions[session] = bytearray()
            return 202, self._where(name, session), b""
        held = self.sessions.get(session)
        if held is None:
            return 404, {}, _errors("BLOB_UPLOAD_UNKNOWN", session)
        if request.method == "GET":
            return 204, self._where(name, session), b""
        if request.method == "PATCH":
            if not self.chunks:
                return 405, {}, _errors("UNSUPPORTED", "PATCH")
            start = int(request.headers["content-range"].partition("-")[0])
            if start != len(held):
                return 416, self._where(name, session), _errors("RANGE_INVALID", "out of order")
            held.extend(body)
            return 202, self._where(name, session), b""
        held.extend(body)  # PUT
        digest = request.query["digest"]
        del self.sessions[session]
        if digest_bytes(bytes(held)) != digest:
            return 400, {}, _errors("DIGEST_INVALID", digest)
        self.data[digest] = bytes(held)
        self.repos.setdefault(name, set()).add(digest)
        return 201, {"Location": f"/v2/{name}/blobs/{digest}"}, b""

    def _where(self, name: str, session: str) -> dict[str, str]:
        held = len(self.sessions[session])
        return {
            "Location": f"/v2/{name}/blobs/uploads/{session}?_state={held}",
            "Range": f"0-{max(held - 1, 0)}",
        }


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    registry = FakeRegistry()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            split = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(split.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = Request(self.command, split.path, query, headers)
            fault = registry.fault(request)
            length = int(headers.get("content-length") or 0)
            if fault is not None and fault.kind == "reset":
                self.rfile.read(length // 2)
                session = split.path.rsplit("/", 1)[1]
                registry.sessions.pop(session, None)
                registry.seen.append((request, 0))
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            body = self.rfile.read(length) if length else b""
            if fault is not None and fault.kind == "reply":
                status, extra, payload = fault.status, fault.headers, b""
            else:
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay)
                status, extra, payload = registry.handle(request, body)
                if fault is not None and fault.kind == "after":
                    status, extra, payload = fault.status, fault.headers, b""
            registry.seen.append((request, status))
            send_reply(self, status, extra, payload)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _handle

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    registry.host = f"127.0.0.1:{server.server_address[1]}"
    yield registry
    server.shutdown()
    server.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps: list[float]) -> Iterator[RegistryClient]:
    """A client over the run's retrying HTTP client, whose waits are recorded, not slept."""
    with retrying_client(httpx.HTTPTransport(), retry=RetryPolicy(sleep=sleeps.append)) as http:
        yield RegistryClient(http)


def _chunked(monkeypatch: pytest.MonkeyPatch, *, threshold: int, chunk: int) -> None:
    monkeypatch.setattr(upload, "CHUNKED_THRESHOLD", threshold)
    monkeypatch.setattr(upload, "CHUNK_SIZE", chunk)


def _holds(fake: FakeRegistry, image: Image, name: str) -> None:
    """``name`` in ``fake`` holds every blob of ``image`` byte for byte, and its manifest."""
    for desc in (image.config, *image.layers):
        assert desc.digest in fake.repos[name]
        assert fake.data[desc.digest] == image.store.path(desc.digest).read_bytes()
    assert digest_bytes(fake.manifests[(name, "v1")]) == image.digest


# ---------------------------------------------------------------------------------------------
# Retries: 429, 5xx, resets


def test_429_is_waited_as_retry_after_asks_capped_and_retried(
    fake: FakeRegistry,
    client: RegistryClient,
    sleeps: list[float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _chunked(monkeypatch, threshold=64 << 10, chunk=32 << 10)
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "limited", [100 << 10, 10])
    small = image.layers[1]
    refused: set[str] = set()

    def limit(request: Request) -> Fault | None:
        # The big layer's second chunk and the small layer's PUT are each refused once.
        if request.method == "PATCH" and request.headers["content-range"].startswith("32768-"):
            key, wait = "chunk", "7"
        elif request.method == "PUT" and request.query.get("digest") == small.digest:
            key, wait = "put", "3600"
        else:
            return None
        if key in refused:
            return None
        refused.add(key)
        return Fault("reply", 429, {"Retry-After": wait})

    fake.fault = limit
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    assert client.push_image(image, ref) == image.digest
    _holds(fake, image, "acme/app")
    assert sorted(sleeps) == [7.0, 30.0]  # as asked, and an hour capped at the policy's 30 s
    assert [s for _, s in fake.requests("PATCH")].count(429) == 1
    assert [s for _, s in fake.requests("PATCH")].count(202) == 4  # 100 KiB in 32 KiB chunks


def test_a_chunk_taken_although_its_answer_was_lost_resumes_where_the_registry_is(
    fake: FakeRegistry, client: RegistryClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _chunked(monkeypatch, threshold=64 << 10, chunk=32 << 10)
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "resume", [100 << 10])
    first = {"left": 1}

    def lose_answer(request: Request) -> Fault | None:
        if request.method == "PATCH" and request.headers["content-range"].startswith("32768-"):
            if first["left"]:
                first["left"] -= 1
                return Fault("after", 503)  # stored, but the client hears a 503
        return None

    fake.fault = lose_answer
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    assert client.push_image(image, ref) == image.digest
    _holds(fake, image, "acme/app")
    statuses = [s for _, s in fake.requests("PATCH")]
    assert statuses == [202, 503, 416, 202, 202]  # sent again by the transport: out of order
    assert [s for _, s in fake.requests("GET", "/uploads/")] == [204]  # where it stands
    assert len(fake.requests("POST")) == 2  # one session for the layer, one for the config


@pytest.mark.parametrize("chunked", [False, True])
def test_a_connection_reset_mid_body_starts_the_upload_afresh(
    fake: FakeRegistry,
    client: RegistryClient,
    sleeps: list[float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunked: bool,
) -> None:
    if chunked:
        _chunked(monkeypatch, threshold=64 << 10, chunk=256 << 10)
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "reset", [1 << 20])
    (layer,) = image.layers
    resets = {"left": 1}

    def reset(request: Request) -> Fault | None:
        if chunked:  # the second chunk, so the session has something to lose
            hit = request.headers.get("content-range", "").startswith(f"{256 << 10}-")
        else:
            hit = request.method == "PUT" and request.query.get("digest") == layer.digest
        if hit and resets["left"]:
            resets["left"] -= 1
            return Fault("reset")
        return None

    fake.fault = reset
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    assert client.push_image(image, ref) == image.digest
    _holds(fake, image, "acme/app")
    method = "PATCH" if chunked else "PUT"
    sent = [s for r, s in fake.requests(method, "/uploads/")]
    # Reset (0), sent again by the transport to a session now gone (404), then a new session.
    first = 1 if chunked else 0
    assert sent[first : first + 2] == [0, 404]
    assert sent[first + 2 :] == ([202] * 5 if chunked else [201, 201])  # 1 MiB in 256 KiB
    assert len(fake.requests("POST")) == 3  # the layer twice, the config once
    assert len(sleeps) == 2  # the transport's backoff, then the restart's


def test_a_registry_error_that_persists_is_one_line_and_nothing_is_tagged(
    fake: FakeRegistry, client: RegistryClient, sleeps: list[float], tmp_path: Path
) -> None:
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "broken", [10, 20, 30])
    bad = image.layers[1].digest
    fake.fault = lambda r: Fault("reply", 502) if r.query.get("digest") == bad else None
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    with pytest.raises(RegistryError) as info:
        client.push_image(image, ref)
    assert str(info.value) == (
        f"registry error pushing {ref}: HTTP 502 on upload of blob {bad}: Bad Gateway; "
        "the registry failed; retry later"
    )
    assert len([1 for r, _ in fake.requests("PUT") if r.query.get("digest") == bad]) == 3
    assert fake.manifests == {}
    assert bad not in fake.repos["acme/app"]


# ---------------------------------------------------------------------------------------------
# Chunks refused, mounts declined


@pytest.mark.parametrize("refusal", ["405", "416"])
def test_a_registry_refusing_chunks_gets_the_blob_whole(
    fake: FakeRegistry,
    client: RegistryClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refusal: str,
) -> None:
    _chunked(monkeypatch, threshold=64 << 10, chunk=32 << 10)
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "whole", [100 << 10])
    if refusal == "405":
        fake.chunks = False
    else:  # a registry answering 416 to any Content-Range, its status saying nothing arrived
        fake.fault = lambda r: Fault("reply", 416) if r.method in ("PATCH", "GET") else None
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    assert client.push_image(image, ref) == image.digest
    _holds(fake, image, "acme/app")
    assert [s for _, s in fake.requests("PATCH")] == [int(refusal)]  # the first chunk only
    assert len(fake.requests("POST")) == 3  # the refused session, the whole layer, the config
    (layer,) = image.layers
    (put,) = [r for r, _ in fake.requests("PUT") if r.query.get("digest") == layer.digest]
    assert put.headers["content-length"] == str(layer.size)


def test_a_declined_or_refused_mount_uploads_the_blob(
    fake: FakeRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "mount", [10, 20])
    client.push_image(image, ImageReference.parse(f"{fake.host}/acme/base:v1"))

    # Mounted: the layers are linked, not sent (the config too: the same image).
    fake.seen.clear()
    assert client.push_image(image, ImageReference.parse(f"{fake.host}/acme/one:v1"))
    mounts = [(r.query["mount"], r.query["from"], s) for r, s in fake.requests("POST")]
    assert sorted(mounts) == sorted(
        (d.digest, "acme/base", 201) for d in (image.config, *image.layers)
    )
    assert fake.requests("PUT", "/uploads/") == []

    # Declined (202 with a session): that session takes the blob.
    fake.mounts = False
    fake.seen.clear()
    client.push_image(image, ImageReference.parse(f"{fake.host}/acme/two:v1"))
    assert [s for _, s in fake.requests("POST")] == [202, 202, 202]
    assert all("mount" in r.query for r, _ in fake.requests("POST"))
    assert len(fake.requests("PUT", "/uploads/")) == 3

    # Refused (401: no right to pull the source): a plain upload instead.
    fake.mounts = True
    fake.fault = lambda r: Fault("reply", 401) if "mount" in r.query else None
    fake.seen.clear()
    client.push_image(image, ImageReference.parse(f"{fake.host}/acme/three:v1"))
    assert sorted(s for _, s in fake.requests("POST")) == [202, 202, 202, 401, 401, 401]
    _holds(fake, image, "acme/three")


def test_a_blob_the_repository_is_known_to_hold_is_not_asked_for(
    fake: FakeRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "known", [10, 20, 30])
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    client.push_image(image, ref)
    # A run that found the layers listed there (a registry cache) pushes its image there:
    # no HEAD for them, nothing sent again; the config and manifest still go.
    with retrying_client(httpx.HTTPTransport()) as http:
        fresh = RegistryClient(http)
        for layer in image.layers:
            fresh.note_blob(ref, layer.digest)
        fake.seen.clear()
        assert fresh.push_image(image, ImageReference.parse(f"{fake.host}/acme/app:v2"))
        asked = [r.path.rsplit("/", 1)[1] for r, _ in fake.requests("HEAD")]
        assert asked == [image.config.digest]
        assert fake.requests("POST") == []
        assert fake.manifests[("acme/app", "v2")] == image.manifest_bytes
        # Known in another repository only: asked for there, then mounted.
        fake.seen.clear()
        fresh.push_image(image, ImageReference.parse(f"{fake.host}/acme/other:v1"))
    asked = sorted(r.path.rsplit("/", 1)[1] for r, _ in fake.requests("HEAD"))
    assert asked == sorted(d.digest for d in (image.config, *image.layers))
    _holds(fake, image, "acme/other")


# ---------------------------------------------------------------------------------------------
# Several at once


def test_the_first_failure_stops_the_rest_and_no_manifest_is_put(
    fake: FakeRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    image = layered_image(BlobStore(tmp_path / "s"), tmp_path, "stop", [10 + i for i in range(8)])
    bad = image.layers[0].digest
    later = {d.digest for d in image.layers[upload.PARALLEL_UPLOADS :]}

    def deny_first(request: Request) -> Fault | None:
        if request.method == "PUT" and request.query.get("digest") == bad:
            return Fault("reply", 403)
        if request.method == "PUT":
            return Fault("slow", delay=0.3)  # the others are still under way when it fails
        return None

    fake.fault = deny_first
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    with pytest.raises(RegistryError) as info:
        client.push_image(image, ref)
    assert str(info.value).startswith(f"denied pushing {ref}: upload of blob {bad}")
    assert "\n" not in str(info.value)
    asked = {r.path.rsplit("/", 1)[1] for r, _ in fake.requests("HEAD")}
    assert asked.isdisjoint(later)  # blobs not started were never started
    assert fake.manifests == {}
    assert image.config.digest not in asked


def test_origins_are_per_registry_and_the_latest_other_repository() -> None:
    origins = BlobOrigins()
    digest = digest_bytes(b"layer")
    app = ImageReference.parse("127.0.0.1:5000/acme/app:1")
    assert origins.source(app, digest) is None
    origins.remember(ImageReference.parse("127.0.0.1:5001/acme/base:1"), digest)
    assert origins.source(app, digest) is None  # another registry cannot mount
    origins.remember(ImageReference.parse("127.0.0.1:5000/acme/base:1"), digest)
    origins.remember(ImageReference.parse("127.0.0.1:5000/acme/cache:k"), digest)
    origins.remember(app, digest)
    assert origins.source(app, digest) == "acme/cache"
    other = ImageReference.parse("127.0.0.1:5000/acme/cache:2")
    assert origins.source(other, digest) == "acme/app"
    assert origins.source(app, digest_bytes(b"other")) is None
    origins.refuse(app, "acme/cache")  # no right to pull it: the next place known
    assert origins.source(app, digest) == "acme/base"
    assert origins.source(other, digest) == "acme/app"

"""Pushes to the real registry (Debian's docker-registry): parallel blobs, mounts, chunks.

Every request goes through a recording transport under the run's retrying client, which
counts the body bytes each request sent and how many uploads were under way at once, so the
tests see what went over the wire; what the registry then serves is read back and hashed.
"""

from __future__ import annotations

import math
import os
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from imagebuild.digest import digest_bytes
from imagebuild.errors import RegistryError
from imagebuild.image.model import ImageConfig
from imagebuild.image.mutate import build_image
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
from imagebuild.net.http import RetryPolicy, http_client, retrying_client
from imagebuild.pipeline.remotecache import RegistryLayerCache
from imagebuild.report import NullReporter
from imagebuild.sinks import upload
from imagebuild.sinks.auth import CredentialStore
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.registry_server import LocalRegistry
from tests.integration.test_registry_auth import Secured, login, pki, token_registry
from tests.test_push_uploads import CREATED, layered_image

# The real registry binary (dev/infra.sh installs it).
pytestmark = pytest.mark.docker

__all__ = ["pki", "token_registry"]  # the TLS registry behind a token service, as a fixture


@dataclass(frozen=True)
class Sent:
    """One request that reached the registry: what, where, body bytes sent, the answer."""

    method: str
    url: httpx.URL
    headers: httpx.Headers
    body: int
    status: int
    answer: httpx.Headers


class _Counted(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, count: list[int]) -> None:
        self._inner, self._count = inner, count

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._count[0] += len(chunk)
            yield chunk


class Recorder(httpx.BaseTransport):
    """A transport to the network that records each request and may stand in for the registry.

    ``hold``: the first ``hold`` blob uploads wait (up to ``patience`` seconds) until that
    many are under way, so a client sending them one at a time shows ``most == 1``.
    ``answer``: a response to give instead of the registry's, for the requests it picks.
    """

    def __init__(
        self,
        *,
        hold: int = 0,
        patience: float = 2.0,
        answer: Callable[[httpx.Request], httpx.Response | None] | None = None,
    ) -> None:
        self._network = httpx.HTTPTransport()
        self._hold, self._patience, self._answer = hold, patience, answer
        self._cond = threading.Condition()
        self._arrived = self._under_way = 0
        self.most = 0
        self.sent: list[Sent] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._answer is not None and (canned := self._answer(request)) is not None:
            self._record(request, 0, canned)
            return canned
        uploading = request.method in ("PUT", "PATCH") and "/blobs/uploads/" in request.url.path
        if uploading:
            with self._cond:
                self._arrived += 1
                self._under_way += 1
                self.most = max(self.most, self._under_way)
                self._cond.notify_all()
                if self._arrived <= self._hold:
                    self._cond.wait_for(
                        lambda: self._under_way >= self._hold, timeout=self._patience
                    )
        original, count = request.stream, [0]
        assert isinstance(original, httpx.SyncByteStream)
        request.stream = _Counted(original, count)
        try:
            response = self._network.handle_request(request)
        finally:
            request.stream = original
            if uploading:
                with self._cond:
                    self._under_way -= 1
        self._record(request, count[0], response)
        return response

    def _record(self, request: httpx.Request, body: int, response: httpx.Response) -> None:
        with self._cond:
            self.sent.append(
                Sent(
                    request.method,
                    request.url,
                    request.headers,
                    body,
                    response.status_code,
                    response.headers,
                )
            )

    def close(self) -> None:
        self._network.close()

    def bytes_sent(self) -> int:
        """Body bytes of every request that reached the registry."""
        return sum(s.body for s in self.sent)


def _client(transport: httpx.BaseTransport) -> httpx.Client:
    return retrying_client(transport, retry=RetryPolicy(sleep=lambda _: None))


@pytest.fixture
def plain() -> Iterator[RegistryClient]:
    """A client for reading back what the registry holds."""
    with retrying_client(httpx.HTTPTransport()) as http:
        yield RegistryClient(http)


def _served(registry: LocalRegistry, repository: str, digest: str) -> bytes:
    with httpx.Client(trust_env=False, timeout=30) as http:
        resp = http.get(f"{registry.url}/v2/{repository}/blobs/{digest}")
    assert resp.status_code == 200, resp.text
    return resp.content


def test_parallel_pushes_give_the_manifest_a_serial_push_gives(
    local_registry: LocalRegistry,
    plain: RegistryClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = BlobStore(tmp_path / "store")
    image = layered_image(store, tmp_path, "parallel", [2000 + i for i in range(6)])
    parallel = ImageReference.parse(f"{local_registry.host}/uploads/parallel:v1")
    recorder = Recorder(hold=upload.PARALLEL_UPLOADS)
    with _client(recorder) as http:
        assert RegistryClient(http).push_image(image, parallel) == image.digest
    assert recorder.most == upload.PARALLEL_UPLOADS  # four at once, never more
    blob_puts = [s for s in recorder.sent if s.method == "PUT" and "digest" in s.url.params]
    assert [s.url.params["digest"] for s in blob_puts][-1] == image.config.digest
    assert [s.url.path for s in recorder.sent][-1] == "/v2/uploads/parallel/manifests/v1"

    monkeypatch.setattr(upload, "PARALLEL_UPLOADS", 1)
    serial = ImageReference.parse(f"{local_registry.host}/uploads/serial:v1")
    one_at_a_time = Recorder(hold=2, patience=0.5)
    with _client(one_at_a_time) as http:
        assert RegistryClient(http).push_image(image, serial) == image.digest
    assert one_at_a_time.most == 1

    for ref in (parallel, serial):
        assert plain.fetch_manifest(ref)[2] == image.digest
    pulled = BlobStore(tmp_path / "pulled")
    base = plain.pull_image(parallel, store=pulled)
    assert base.layers == image.layers
    for desc in image.layers:
        assert pulled.path(desc.digest).read_bytes() == store.path(desc.digest).read_bytes()


def test_a_layer_of_a_pulled_base_is_mounted_not_sent(
    local_registry: LocalRegistry, plain: RegistryClient, tmp_path: Path
) -> None:
    base_store = BlobStore(tmp_path / "base-store")
    base_image = layered_image(base_store, tmp_path, "base", [50_000, 60_000, 70_000])
    base_ref = ImageReference.parse(f"{local_registry.host}/uploads/base:1")
    plain.push_image(base_image, base_ref)

    recorder = Recorder()
    with _client(recorder) as http:
        client = RegistryClient(http)
        store = BlobStore(tmp_path / "build-store")
        base = client.pull_image(base_ref, store=store)
        top = tmp_path / "top"
        (top / "app").mkdir(parents=True)
        (top / "app" / "main.py").write_text("print('hello')\n")
        layer = build_layer(top, store, mtime=0, created_by="imgbuild: project")
        image = build_image(base, [layer], config=ImageConfig(), created=CREATED, store=store)
        recorder.sent.clear()
        app = ImageReference.parse(f"{local_registry.host}/uploads/app:1")
        assert client.push_image(image, app) == image.digest

    mounts = [s for s in recorder.sent if s.method == "POST" and "mount" in s.url.params]
    assert sorted(s.url.params["mount"] for s in mounts) == sorted(
        d.digest for d in base_image.layers
    )
    assert {(s.url.params["from"], s.status) for s in mounts} == {("uploads/base", 201)}
    manifest = len(image.manifest_bytes)
    assert recorder.bytes_sent() == layer.size + image.config.size + manifest

    pulled = BlobStore(tmp_path / "pulled")
    assert plain.pull_image(app, store=pulled).layers == image.layers
    for desc in base_image.layers:
        assert digest_bytes(_served(local_registry, "uploads/app", desc.digest)) == desc.digest


def test_layers_kept_in_the_cache_repository_are_mounted_into_the_image(
    local_registry: LocalRegistry, plain: RegistryClient, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    layers = []
    for i, size in enumerate([40_000, 30_000]):
        (tmp_path / f"kept-{i}").mkdir()
        (tmp_path / f"kept-{i}" / "data.bin").write_bytes(os.urandom(size))
        layers.append(build_layer(tmp_path / f"kept-{i}", store, mtime=0, created_by=f"kept {i}"))
    image = build_image(None, layers, config=ImageConfig(), created=CREATED, store=store)
    # As --cache-to keeps them: under a manifest of the cache repository (a layer set).
    kept_set = build_image(
        None, layers, config=ImageConfig(labels=(("set", "1"),)), created=CREATED, store=store
    )
    cache = ImageReference.parse(f"{local_registry.host}/uploads/cache:key")
    recorder = Recorder()
    with _client(recorder) as http:
        client = RegistryClient(http)
        client.push_image(kept_set, cache)
        kept = recorder.bytes_sent()
        recorder.sent.clear()
        app = ImageReference.parse(f"{local_registry.host}/uploads/kept:1")
        assert client.push_image(image, app) == image.digest
    assert kept >= sum(d.size for d in image.layers)
    statuses = sorted(
        (s.url.params.get("from", ""), s.status) for s in recorder.sent if s.method == "POST"
    )
    assert statuses == [("", 202), ("uploads/cache", 201), ("uploads/cache", 201)]
    assert recorder.bytes_sent() == image.config.size + len(image.manifest_bytes)
    assert plain.fetch_manifest(app)[2] == image.digest


def test_a_blob_the_repository_lists_but_no_longer_holds_is_sent_and_the_push_lands(
    local_registry: LocalRegistry, plain: RegistryClient, tmp_path: Path
) -> None:
    # A manifest read in the repository lists the blob, so the push takes it as there
    # without a HEAD; the registry has dropped it since and refuses the manifest.
    store = BlobStore(tmp_path / "store")
    image = layered_image(store, tmp_path, "trust", [30_000, 20_000])
    first = ImageReference.parse(f"{local_registry.host}/uploads/trust:1")
    plain.push_image(image, first)
    gone = image.layers[0]
    with httpx.Client(trust_env=False, timeout=30) as http:
        dropped = http.delete(f"{local_registry.url}/v2/uploads/trust/blobs/{gone.digest}")
    assert dropped.status_code == 202, dropped.text

    recorder = Recorder()
    with _client(recorder) as http:
        client = RegistryClient(http)
        client.pull_image(first, store=store)  # every blob listed there (their bytes at hand)
        recorder.sent.clear()
        second = ImageReference.parse(f"{local_registry.host}/uploads/trust:2")
        assert client.push_image(image, second) == image.digest

    manifests = [s.status for s in recorder.sent if "/manifests/" in s.url.path]
    assert manifests == [400, 201]  # refused once, then taken
    heads = sorted(s.url.path.rsplit("/", 1)[1] for s in recorder.sent if s.method == "HEAD")
    assert heads == sorted(d.digest for d in (image.config, *image.layers))
    assert recorder.bytes_sent() == gone.size + 2 * len(image.manifest_bytes)
    pulled = BlobStore(tmp_path / "pulled")
    assert plain.pull_image(second, store=pulled).layers == image.layers
    assert digest_bytes(_served(local_registry, "uploads/trust", gone.digest)) == gone.digest


def test_a_set_kept_where_its_layers_were_found_is_kept_though_the_registry_dropped_one(
    local_registry: LocalRegistry, tmp_path: Path
) -> None:
    # A runner pushing only (fetch_blobs=False) takes the found layers as held where it
    # found them; one was dropped since, so the set's manifest is refused at first.
    store = BlobStore(tmp_path / "store")
    kept = []
    for name in ("one", "two"):
        tree = tmp_path / name
        (tree / "app").mkdir(parents=True)
        (tree / "app" / f"{name}.txt").write_text(f"{name}\n")
        kept.append((name[0] * 64, build_layer(tree, store, mtime=0)))
    ref = ImageReference.parse(f"{local_registry.host}/uploads/cache-set")
    with _client(Recorder()) as http:
        RegistryLayerCache(client=RegistryClient(http), store=store, source=None, target=ref).keep(
            kept, NullReporter()
        )
    gone = kept[0][1]
    with httpx.Client(trust_env=False, timeout=30) as http:
        dropped = http.delete(f"{local_registry.url}/v2/uploads/cache-set/blobs/{gone.digest}")
    assert dropped.status_code == 202, dropped.text

    recorder = Recorder()
    with _client(recorder) as http:
        runner = RegistryLayerCache(
            client=RegistryClient(http), store=store, source=ref, target=ref, fetch_blobs=False
        )
        assert [runner.find(key) for key, _ in kept] == [layer for _, layer in kept]
        runner.keep_set(kept)
    sets = [
        s.status for s in recorder.sent if s.method == "PUT" and "/manifests/set-" in s.url.path
    ]
    assert sets == [400, 201]
    assert digest_bytes(_served(local_registry, "uploads/cache-set", gone.digest)) == gone.digest


def test_a_manifest_refused_for_a_blob_the_push_asked_for_is_not_sent_again(
    local_registry: LocalRegistry, tmp_path: Path
) -> None:
    # Nothing was taken on trust: every blob was asked for (or sent), so the refusal stands.
    def refuse(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PUT" and "/manifests/" in request.url.path:
            errors = [{"code": "MANIFEST_BLOB_UNKNOWN", "message": "blob unknown to registry"}]
            return httpx.Response(400, json={"errors": errors})
        return None

    store = BlobStore(tmp_path / "store")
    image = layered_image(store, tmp_path, "refused", [10_000])
    recorder = Recorder(answer=refuse)
    ref = ImageReference.parse(f"{local_registry.host}/uploads/refused:1")
    with _client(recorder) as http, pytest.raises(RegistryError, match="MANIFEST_BLOB_UNKNOWN"):
        RegistryClient(http).push_image(image, ref)
    assert [s.status for s in recorder.sent if "/manifests/" in s.url.path] == [400]


def test_a_big_blob_goes_up_in_chunks_and_the_registry_serves_its_digest(
    local_registry: LocalRegistry,
    plain: RegistryClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunk = 100 << 10
    monkeypatch.setattr(upload, "CHUNKED_THRESHOLD", 256 << 10)
    monkeypatch.setattr(upload, "CHUNK_SIZE", chunk)
    store = BlobStore(tmp_path / "store")
    image = layered_image(store, tmp_path, "chunked", [700 << 10])
    (layer,) = image.layers
    ref = ImageReference.parse(f"{local_registry.host}/uploads/chunked:v1")
    recorder = Recorder()
    with _client(recorder) as http:
        assert RegistryClient(http).push_image(image, ref) == image.digest

    patches = [s for s in recorder.sent if s.method == "PATCH"]
    assert len(patches) == math.ceil(layer.size / chunk)
    assert [s.status for s in patches] == [202] * len(patches)
    ranges = [tuple(map(int, s.headers["Content-Range"].split("-"))) for s in patches]
    assert ranges[0][0] == 0 and ranges[-1][1] == layer.size - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(s.body == int(s.headers["Content-Length"]) for s in patches)
    for before, after in zip(patches, patches[1:], strict=False):  # each to the last Location
        assert after.url.path == before.url.join(before.answer["Location"]).path
    (close,) = [
        s for s in recorder.sent if s.method == "PUT" and s.url.params.get("digest") == layer.digest
    ]
    assert (close.body, close.status) == (0, 201)
    served = _served(local_registry, "uploads/chunked", layer.digest)
    assert digest_bytes(served) == layer.digest
    assert served == store.path(layer.digest).read_bytes()
    assert plain.fetch_manifest(ref)[2] == image.digest


def test_a_failing_blob_leaves_nothing_tagged(
    local_registry: LocalRegistry, plain: RegistryClient, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    image = layered_image(store, tmp_path, "failing", [3000, 4000, 5000])
    bad = image.layers[1].digest

    def refuse(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PUT" and request.url.params.get("digest") == bad:
            body = {"errors": [{"code": "BLOB_UPLOAD_INVALID", "message": "refused"}]}
            return httpx.Response(400, json=body)
        return None

    ref = ImageReference.parse(f"{local_registry.host}/uploads/failing:v1")
    recorder = Recorder(answer=refuse)
    with _client(recorder) as http, pytest.raises(RegistryError) as info:
        RegistryClient(http).push_image(image, ref)
    assert str(info.value) == (
        f"pushing {ref}: HTTP 400 on upload of blob {bad}: BLOB_UPLOAD_INVALID refused"
    )
    assert not any("/manifests/" in s.url.path for s in recorder.sent)
    assert plain.fetch_optional(ref, "manifests/v1") is None


@pytest.mark.parametrize("chunked", [False, True])
def test_memory_stays_flat_while_a_big_blob_goes_up(
    local_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunked: bool,
) -> None:
    if chunked:
        monkeypatch.setattr(upload, "CHUNKED_THRESHOLD", 4 << 20)
        monkeypatch.setattr(upload, "CHUNK_SIZE", 4 << 20)
    store = BlobStore(tmp_path / "store")
    staging = tmp_path / "big"
    (staging / "data").mkdir(parents=True)
    (staging / "data" / "big.bin").write_bytes(os.urandom(24 << 20))
    layer = build_layer(staging, store, mtime=0, created_by="imgbuild: big")
    image = build_image(None, [layer], config=ImageConfig(), created=CREATED, store=store)
    kind = "chunked" if chunked else "whole"
    ref = ImageReference.parse(f"{local_registry.host}/uploads/big-{kind}:v1")
    with retrying_client(httpx.HTTPTransport()) as http:
        client = RegistryClient(http)
        tracemalloc.start()
        try:
            assert client.push_image(image, ref) == image.digest
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert layer.size > 24 << 20
    assert peak < 6 << 20, f"pushing a {layer.size >> 20} MiB blob peaked at {peak >> 20} MiB"


def test_under_token_auth_the_mount_token_covers_the_source_and_nothing_is_uploaded(
    token_registry: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mount asks the token service for repository:<from>:pull beside the target's own
    # scope (each scope a parameter of its own), so the registry links every blob it holds
    # in the source instead of taking its bytes again.
    config = login(token_registry, tmp_path, monkeypatch)
    store = BlobStore(tmp_path / "store")
    image = layered_image(store, tmp_path, "token", [3000, 4000])
    host = token_registry.registry.host
    seen: list[tuple[str, str, int]] = []
    with http_client() as http:
        http.event_hooks["response"] = [
            lambda r: seen.append((r.request.method, str(r.request.url), r.status_code))
        ]
        client = RegistryClient(http, credentials=CredentialStore.from_docker_config(config))
        client.push_image(image, ImageReference.parse(f"{host}/mounts/base:1"))
        seen.clear()
        app = ImageReference.parse(f"{host}/mounts/app:1")
        assert client.push_image(image, app) == image.digest
        pulled = BlobStore(tmp_path / "pulled")
        client.pull_image(app, store=pulled)
    for desc in (image.config, *image.layers):
        assert pulled.path(desc.digest).read_bytes() == store.path(desc.digest).read_bytes()
    mounted = {
        unquote(url.split("mount=")[1].split("&")[0])
        for _, url, status in seen
        if status == 201 and "mount=" in url
    }
    assert mounted >= {d.digest for d in (image.config, *image.layers)}
    sent = [url for method, url, _ in seen if method in ("PUT", "PATCH") and "/blobs/" in url]
    assert sent == []

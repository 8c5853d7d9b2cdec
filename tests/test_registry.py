"""Tests for image.name (references), sinks.auth (logins) and sinks.remote (client, sink).

Push/pull behaviour runs against a real docker-registry (the ``local_registry`` fixture);
auth challenges, redirects and failure shapes against a small threaded fake of our own.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from imagebuild.digest import digest_bytes, digest_hex
from imagebuild.errors import RegistryError
from imagebuild.image.descriptor import OCI_INDEX, canonical_json
from imagebuild.image.model import Image, ImageConfig
from imagebuild.image.mutate import build_image, build_index
from imagebuild.image.name import ImageReference, parse_mirrors
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
from imagebuild.image.validate import validate_layout
from imagebuild.net.http import RetryPolicy, retrying_client
from imagebuild.report import NullReporter
from imagebuild.sinks.auth import (
    Credentials,
    CredentialStore,
    Op,
    RegistrySession,
    parse_challenge,
)
from imagebuild.sinks.layout import write_oci_layout
from imagebuild.sinks.remote import MANIFEST_ACCEPT, RegistryClient, RegistrySink
from tests.fixtures.registry_server import LocalRegistry
from tests.fixtures.replies import send_reply
from tests.test_oci import finished_for

CREATED = "2024-01-01T00:00:00Z"
HEX = "a" * 64


# ---------------------------------------------------------------------------------------------
# References

PARSE_CASES = [
    # text, registry, repository, tag, digest
    ("python", "docker.io", "library/python", "latest", None),
    ("python:3.11-slim", "docker.io", "library/python", "3.11-slim", None),
    ("library/python:3.11", "docker.io", "library/python", "3.11", None),
    ("docker.io/python", "docker.io", "library/python", "latest", None),
    ("index.docker.io/library/python:3", "docker.io", "library/python", "3", None),
    ("acme/app", "docker.io", "acme/app", "latest", None),
    ("ghcr.io/acme/app:1.0", "ghcr.io", "acme/app", "1.0", None),
    (
        "gcr.io/distroless/python3-debian12:nonroot",
        "gcr.io",
        "distroless/python3-debian12",
        "nonroot",
        None,
    ),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None),
    (
        "127.0.0.1:5055/library/python:3.11-slim",
        "127.0.0.1:5055",
        "library/python",
        "3.11-slim",
        None,
    ),
    ("[::1]:5000/app:v_1.2-rc", "[::1]:5000", "app", "v_1.2-rc", None),
    (f"python@sha256:{HEX}", "docker.io", "library/python", None, f"sha256:{HEX}"),
    (f"ghcr.io/a/b:1@sha256:{HEX}", "ghcr.io", "a/b", "1", f"sha256:{HEX}"),
    ("my-org/my__app.x", "docker.io", "my-org/my__app.x", "latest", None),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), PARSE_CASES)
def test_parse_reference(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ImageReference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty image reference"),
        ("Python", "must be lowercase"),
        ("ghcr.io/Acme/app", "must be lowercase"),
        ("python:", "invalid tag"),
        ("python:-x", "invalid tag"),
        ("python:bad/tag", "invalid registry"),
        ("a//b", "invalid repository name"),
        ("python@sha256:abc", "only sha256"),
        (f"python@md5:{HEX}", "only sha256"),
        ("python@", "empty digest"),
    ],
)
def test_parse_reference_errors(text: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        ImageReference.parse(text)


def test_reference_str_and_helpers() -> None:
    ref = ImageReference.parse("python:3.11-slim")
    assert str(ref) == "docker.io/library/python:3.11-slim"
    assert ref.reference == "3.11-slim"
    pinned = ref.with_digest(digest_bytes(b"x"))
    assert pinned.reference == digest_bytes(b"x")
    assert str(pinned) == f"docker.io/library/python:3.11-slim@{digest_bytes(b'x')}"
    assert str(ref.with_tag("3.12")) == "docker.io/library/python:3.12"


def test_mirrors() -> None:
    mirrors = parse_mirrors(" docker.io=127.0.0.1:5055, gcr.io=127.0.0.1:5055,,")
    assert mirrors == {"docker.io": "127.0.0.1:5055", "gcr.io": "127.0.0.1:5055"}
    assert parse_mirrors("") == {}
    assert parse_mirrors("index.docker.io=localhost:5000") == {"docker.io": "localhost:5000"}
    python = ImageReference.parse("python:3.11-slim").with_mirrors(mirrors)
    assert str(python) == "127.0.0.1:5055/library/python:3.11-slim"
    distroless = ImageReference.parse("gcr.io/distroless/python3-debian12").with_mirrors(mirrors)
    assert str(distroless) == "127.0.0.1:5055/distroless/python3-debian12:latest"
    ghcr = ImageReference.parse("ghcr.io/a/b:1")
    assert ghcr.with_mirrors(mirrors) == ghcr
    for bad in ("docker.io", "docker.io=", "=x", "docker.io=not a host"):
        with pytest.raises(RegistryError, match="registry mirror"):
            parse_mirrors(bad)


def test_parse_challenge() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.get("realm") == "https://auth.docker.io/token"
    assert c.get("service") == "registry.docker.io"
    assert c.get("scope") == "repository:samalba/my-app:pull,push"
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic" and basic.get("realm") == "Registry Realm"


# ---------------------------------------------------------------------------------------------
# Credentials


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_from_docker_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _b64("hub:secret")},
                    "ghcr.io": {"auth": _b64("octo:ghp_token:with:colons")},
                    "http://localhost:5000/v2/": {"auth": _b64("local:pw")},
                    "id.example": {"identitytoken": "refresh-me"},
                    "empty.example": {},
                }
            }
        )
    )
    store = CredentialStore.from_docker_config(config)
    assert store.get("docker.io") == Credentials(username="hub", password="secret")
    assert store.get("index.docker.io") == Credentials(username="hub", password="secret")
    assert store.get("ghcr.io") == Credentials(username="octo", password="ghp_token:with:colons")
    assert store.get("localhost:5000") == Credentials(username="local", password="pw")
    identity = store.get("id.example")
    assert identity is not None and identity.identity_token == "refresh-me"
    assert store.get("empty.example") is None
    assert store.get("quay.io") is None
    assert "secret" not in repr(store)


def test_credentials_missing_or_broken_config(tmp_path: Path) -> None:
    assert CredentialStore.from_docker_config(tmp_path / "missing.json").get("ghcr.io") is None
    assert CredentialStore.from_docker_config(None).get("ghcr.io") is None
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(RegistryError, match=f"Docker config {broken}"):
        CredentialStore.from_docker_config(broken)
    bad_auth = tmp_path / "bad.json"
    bad_auth.write_text(json.dumps({"auths": {"ghcr.io": {"auth": "!!!"}}}))
    with pytest.raises(RegistryError, match="not base64"):
        CredentialStore.from_docker_config(bad_auth)


def test_credential_helpers_take_precedence(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {"ghcr.io": {"auth": _b64("file:pw")}, "quay.io": {}},
                "credHelpers": {"ghcr.io": "gh"},
                "credsStore": "desktop",
            }
        )
    )
    calls: list[tuple[str, str]] = []

    def helper(suffix: str, server_url: str) -> Credentials | None:
        calls.append((suffix, server_url))
        if suffix == "gh":
            return Credentials(username="helper", password="pw")
        return None

    store = replace(CredentialStore.from_docker_config(config), helper=helper)
    assert store.get("ghcr.io") == Credentials(username="helper", password="pw")
    assert store.get("docker.io") is None
    assert calls == [("gh", "ghcr.io"), ("desktop", "https://index.docker.io/v1/")]
    login = CredentialStore.from_login("https://ghcr.io", "me", "tok")
    assert login.get("ghcr.io") == Credentials(username="me", password="tok")


def test_credential_helper_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real helper protocol, through docker-py: server URL on stdin, JSON on stdout.
    helper = tmp_path / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        'if [ "$server" = ghcr.io ]; then echo \'{"Username":"octo","Secret":"s3"}\'; exit 0; fi\n'
        'if [ "$server" = tok.io ]; then echo \'{"Username":"<token>","Secret":"r"}\'; exit 0; fi\n'
        "echo 'credentials not found in native keychain'; exit 1\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    store = CredentialStore(creds_store="fake")
    assert store.get("ghcr.io") == Credentials(username="octo", password="s3")
    assert store.get("tok.io") == Credentials(username="<token>", password="", identity_token="r")
    assert store.get("quay.io") is None
    assert CredentialStore(creds_store="not-installed").get("ghcr.io") is None


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        yield client


def small_image(store: BlobStore, tmp_path: Path, *, name: str, arch: str = "amd64") -> Image:
    staging = tmp_path / f"staging-{name}-{arch}"
    (staging / "app").mkdir(parents=True)
    (staging / "app" / f"{name}.txt").write_text(f"{name} for {arch}\n")
    layer = build_layer(staging, store, mtime=0, created_by=f"imgbuild: {name}")
    return build_image(
        None,
        [layer],
        config=ImageConfig(cmd=("/bin/true",)),
        created=CREATED,
        store=store,
        platform=("linux", arch),
    )


# ---------------------------------------------------------------------------------------------
# Against the real docker-registry


def test_push_then_pull_roundtrip(
    local_registry: LocalRegistry, http: httpx.Client, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "push-store")
    image = small_image(store, tmp_path, name="roundtrip")
    ref = ImageReference.parse(f"{local_registry.host}/test/roundtrip:v1")
    methods: list[str] = []
    http.event_hooks["request"] = [lambda request: methods.append(request.method)]
    client = RegistryClient(http, credentials=None)

    assert client.push_image(image, ref) == image.digest
    assert methods.count("POST") == 2  # config + one layer
    methods.clear()
    assert client.push_image(image, ref, store) == image.digest
    assert "POST" not in methods  # every blob was already there

    pulled_store = BlobStore(tmp_path / "pull-store")
    base = client.pull_image(ref, platform=("linux", "amd64"), store=pulled_store)
    assert base.manifest_digest == image.digest
    assert base.reference == str(ref)
    assert base.layers == image.layers
    assert base.diff_ids == tuple(
        json.loads(store.read_bytes(image.config.digest))["rootfs"]["diff_ids"]
    )
    assert pulled_store.read_bytes(image.config.digest) == store.read_bytes(image.config.digest)
    for desc in image.layers:
        assert pulled_store.path(desc.digest).read_bytes() == store.path(desc.digest).read_bytes()

    # Pulling again downloads nothing; pulling by digest checks the digest.
    methods.clear()
    client.pull_image(ref.with_digest(image.digest), store=pulled_store)
    assert methods == ["GET"]

    # The pulled base carries a new image, which validates.
    top = tmp_path / "top"
    (top / "srv").mkdir(parents=True)
    (top / "srv" / "x").write_text("x")
    layer = build_layer(top, pulled_store, mtime=0, created_by="imgbuild: top")
    derived = build_image(base, [layer], config=ImageConfig(), created=CREATED, store=pulled_store)
    write_oci_layout(derived, tmp_path / "layout", ref_name="derived")
    validate_layout(tmp_path / "layout")
    assert derived.layers[:1] == image.layers


def test_pull_missing_tag_is_readable(
    local_registry: LocalRegistry, http: httpx.Client, tmp_path: Path
) -> None:
    client = RegistryClient(http)
    ref = ImageReference.parse(f"{local_registry.host}/test/nothing-here:nope")
    with pytest.raises(RegistryError) as info:
        client.pull_image(ref, store=BlobStore(tmp_path / "s"))
    text = str(info.value)
    assert text.startswith(f"not found pulling {ref}: manifest: ")
    assert "\n" not in text
    assert info.value.hint == "check the repository name and tag (and any registry mirror)"


def test_index_platform_selection(
    local_registry: LocalRegistry, http: httpx.Client, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    amd = small_image(store, tmp_path, name="multi", arch="amd64")
    arm = small_image(store, tmp_path, name="multi", arch="arm64")
    client = RegistryClient(http)
    repo = ImageReference.parse(f"{local_registry.host}/test/multi")
    client.push_image(amd, repo.with_tag("amd64"))
    client.push_image(arm, repo.with_tag("arm64"))
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**amd.manifest.to_json(), "platform": {"os": "linux", "architecture": "amd64"}},
                {
                    **arm.manifest.to_json(),
                    "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                },
            ],
        }
    )
    index_ref = repo.with_tag("multi")
    assert client.push_manifest(index_ref, index, media_type=OCI_INDEX) == digest_bytes(index)

    pulled = BlobStore(tmp_path / "pulled")
    base = client.pull_image(index_ref, platform=("linux", "arm64"), store=pulled)
    assert base.manifest_digest == arm.digest
    assert base.config["architecture"] == "arm64"
    assert client.pull_image(index_ref, store=pulled).manifest_digest == amd.digest
    assert (
        client.pull_image(
            index_ref, platform=("linux", "arm64", "v8"), store=pulled
        ).manifest_digest
        == arm.digest
    )

    # Manifests named by digest are kept: a tag costs one request (its index), a base
    # pinned by digest none once kept; a store without them asks again.
    methods: list[str] = []
    http.event_hooks["request"] = [lambda request: methods.append(request.url.path)]
    again = client.pull_image(index_ref, platform=("linux", "arm64"), store=pulled)
    assert (again.manifest_digest, again.config) == (arm.digest, base.config)
    assert methods == ["/v2/test/multi/manifests/multi"]
    pinned = index_ref.with_digest(digest_bytes(index))
    for expected in ([f"/v2/test/multi/manifests/{digest_bytes(index)}"], []):
        methods.clear()
        assert client.pull_image(pinned, store=pulled).manifest_digest == amd.digest
        assert methods == expected
    methods.clear()
    client.pull_image(pinned, store=BlobStore(tmp_path / "empty"))
    assert len([m for m in methods if "/manifests/" in m]) == 2
    http.event_hooks["request"] = []

    with pytest.raises(RegistryError) as info:
        client.pull_image(index_ref, platform=("linux", "s390x"), store=pulled)
    assert str(info.value).startswith(
        f"pulling {index_ref}: no image for linux/s390x; available: linux/amd64, linux/arm64/v8"
    )
    with pytest.raises(RegistryError, match="image is for linux/amd64, not linux/arm64"):
        client.pull_image(repo.with_tag("amd64"), platform=("linux", "arm64"), store=pulled)


def test_push_to_pinned_digest_must_match(
    local_registry: LocalRegistry, http: httpx.Client, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    image = small_image(store, tmp_path, name="pinned")
    ref = ImageReference.parse(f"{local_registry.host}/test/pinned@{digest_bytes(b'other')}")
    with pytest.raises(RegistryError, match="the image's digest is"):
        RegistryClient(http).push_image(image, ref)
    by_digest = ref.with_digest(image.digest)
    assert RegistryClient(http).push_image(image, by_digest) == image.digest


# ---------------------------------------------------------------------------------------------
# A fake registry for auth, redirects and failure shapes


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, dict[str, str], bytes]


@dataclass
class FakeServer:
    """A threaded HTTP server on 127.0.0.1:0 answering through ``handler``."""

    handler: Callable[[Seen], Reply]
    seen: list[Seen] = field(default_factory=list)
    host: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def paths(self, prefix: str = "") -> list[str]:
        return [f"{s.method} {s.path}" for s in self.seen if s.path.startswith(prefix)]


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Seen], Reply]], FakeServer]]:
    servers: list[ThreadingHTTPServer] = []

    def start(handler: Callable[[Seen], Reply]) -> FakeServer:
        fake = FakeServer(handler)

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                split = urlsplit(self.path)
                seen = Seen(
                    method=self.command,
                    path=split.path,
                    query=parse_qs(split.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                fake.seen.append(seen)
                status, headers, payload = fake.handler(seen)
                send_reply(self, status, headers, payload)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        fake.host = f"127.0.0.1:{server.server_address[1]}"
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _errors(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def _json(status: int, obj: object, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(obj).encode()


def image_server(image: Image) -> Callable[[Seen], Reply]:
    """Serve ``image``'s manifest and blobs at any repository, no auth."""

    def handle(seen: Seen) -> Reply:
        if "/manifests/" in seen.path:
            return 200, {"Content-Type": image.manifest.media_type}, image.manifest_bytes
        if "/blobs/" in seen.path:
            digest = seen.path.rsplit("/", 1)[1]
            path = image.store.root / "sha256" / digest.removeprefix("sha256:")
            if path.exists():
                return 200, {"Content-Type": "application/octet-stream"}, path.read_bytes()
        return 404, {}, _errors("NOT_FOUND", "nothing here")

    return handle


@pytest.mark.parametrize("token_key", ["token", "access_token"])
@pytest.mark.parametrize("logged_in", [False, True])
def test_bearer_token_flow(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer],
    http: httpx.Client,
    tmp_path: Path,
    token_key: str,
    logged_in: bool,
) -> None:
    store = BlobStore(tmp_path / "src")
    image = small_image(store, tmp_path, name="bearer")
    content = image_server(image)
    holder: list[FakeServer] = []

    def handle(seen: Seen) -> Reply:
        if seen.path == "/token":
            return _json(200, {token_key: "tok-1", "expires_in": 300})
        if seen.headers.get("authorization") != "Bearer tok-1":
            realm = f"{holder[0].url}/token"
            challenge = (
                f'Bearer realm="{realm}",service="fake-registry",scope="repository:acme/app:pull"'
            )
            return 401, {"WWW-Authenticate": challenge}, _errors("UNAUTHORIZED", "auth required")
        return content(seen)

    fake = serve(handle)
    holder.append(fake)
    creds = CredentialStore.from_login(fake.host, "user", "pw") if logged_in else None
    client = RegistryClient(http, credentials=creds)
    ref = ImageReference.parse(f"{fake.host}/acme/app:1")
    base = client.pull_image(ref, store=BlobStore(tmp_path / "dst"))
    assert base.manifest_digest == image.digest

    tokens = [s for s in fake.seen if s.path == "/token"]
    assert len(tokens) == 1  # cached for the scope after the first challenge
    assert tokens[0].query["service"] == ["fake-registry"]
    assert tokens[0].query["scope"] == ["repository:acme/app:pull"]
    expected_auth = "Basic " + _b64("user:pw") if logged_in else None
    assert tokens[0].headers.get("authorization") == expected_auth
    assert fake.paths("/v2/")[:2] == ["GET /v2/acme/app/manifests/1"] * 2  # 401, then 200
    assert all(
        s.headers.get("authorization") == "Bearer tok-1"
        for s in fake.seen[3:]
        if s.path != "/token"
    )


@pytest.mark.parametrize("expired", [False, True])
def test_uploads_that_meet_one_challenge_together_fetch_one_token(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client, expired: bool
) -> None:
    """Blobs go up four at a time: their first requests meet the same 401 together, and the
    token service (slow here, as a remote one is) is asked once. With ``expired``, the
    session starts with a token the registry no longer takes: it is not reused."""
    holder: list[FakeServer] = []
    issued = iter(f"tok-{n}" for n in range(1, 100))
    lock = threading.Lock()

    def handle(seen: Seen) -> Reply:
        if seen.path == "/token":
            time.sleep(0.3)
            with lock:
                return _json(200, {"token": next(issued)})
        if seen.headers.get("authorization") not in ("Bearer tok-1", "Bearer tok-2"):
            realm = f"{holder[0].url}/token"
            scope = "repository:acme/app:pull,push"
            challenge = f'Bearer realm="{realm}",service="reg",scope="{scope}"'
            return 401, {"WWW-Authenticate": challenge}, _errors("UNAUTHORIZED", "token")
        return 404, {}, _errors("BLOB_UNKNOWN", "no such blob")

    fake = serve(handle)
    holder.append(fake)
    session = RegistrySession(http)
    ref = ImageReference.parse(f"{fake.host}/acme/app:1")
    op = Op(ref=ref, verb="pushing", actions="pull,push")
    if expired:
        session._tokens[(fake.host, op.scope)] = "tok-0"  # noqa: SLF001 - a stale cache entry
    urls = [session.url(ref, f"blobs/sha256:{n:064x}") for n in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda url: session.send(op, "HEAD", url), urls))
    assert [a.status_code for a in answers] == [404] * 4
    assert len([s for s in fake.seen if s.path == "/token"]) == 1


def test_bearer_token_refused(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client
) -> None:
    holder: list[FakeServer] = []

    def handle(seen: Seen) -> Reply:
        if seen.path == "/token":
            return 401, {"Content-Type": "application/json"}, _errors("UNAUTHORIZED", "bad login")
        realm = f"{holder[0].url}/token"
        return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'}, b""

    fake = serve(handle)
    holder.append(fake)
    client = RegistryClient(http, credentials=CredentialStore.from_login(fake.host, "u", "wrong"))
    ref = ImageReference.parse(f"{fake.host}/x/y:1")
    with pytest.raises(RegistryError) as info:
        client.fetch_manifest(ref)
    assert str(info.value) == (
        f"unauthorized pulling {ref}: token from {fake.url}/token: UNAUTHORIZED bad login; "
        f"log in with docker login {fake.host}"
    )


def test_identity_token_is_exchanged(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client
) -> None:
    holder: list[FakeServer] = []

    def handle(seen: Seen) -> Reply:
        if seen.path == "/token":
            return _json(200, {"access_token": "from-refresh"})
        if seen.headers.get("authorization") != "Bearer from-refresh":
            realm = f"{holder[0].url}/token"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="svc"'}, b""
        return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b"{}"

    fake = serve(handle)
    holder.append(fake)
    creds = CredentialStore(
        auths=((fake.host, Credentials(username="<token>", password="", identity_token="rt")),)
    )
    RegistryClient(http, credentials=creds).fetch_manifest(
        ImageReference.parse(f"{fake.host}/x/y:1")
    )
    token_request = next(s for s in fake.seen if s.path == "/token")
    assert token_request.method == "POST"
    form = parse_qs(token_request.body.decode())
    assert form["grant_type"] == ["refresh_token"]
    assert form["refresh_token"] == ["rt"]
    assert form["service"] == ["svc"]
    assert form["scope"] == ["repository:x/y:pull"]


def test_basic_auth(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client
) -> None:
    good = "Basic " + _b64("user:pw")

    def handle(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != good:
            return 401, {"WWW-Authenticate": 'Basic realm="fake"'}, _errors("UNAUTHORIZED", "no")
        return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b'{"a":1}'

    fake = serve(handle)
    ref = ImageReference.parse(f"{fake.host}/x/y:1")
    with_login = RegistryClient(
        http, credentials=CredentialStore.from_login(fake.host, "user", "pw")
    )
    data, _media_type, digest = with_login.fetch_manifest(ref)
    assert (data, digest) == (b'{"a":1}', digest_bytes(b'{"a":1}'))
    assert fake.seen[0].headers["accept"] == MANIFEST_ACCEPT
    with_login.fetch_manifest(ref)
    assert [s.headers.get("authorization") for s in fake.seen] == [None, good, good]

    with pytest.raises(RegistryError) as info:
        RegistryClient(http).fetch_manifest(ref)
    assert str(info.value) == (
        f"unauthorized pulling {ref}: manifest: UNAUTHORIZED no; "
        f"log in with docker login {fake.host}"
    )


def test_blob_redirect_drops_authorization(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "src")
    image = small_image(store, tmp_path, name="redirect")
    cdn = serve(image_server(image))
    holder: list[FakeServer] = []

    def handle(seen: Seen) -> Reply:
        if seen.path == "/token":
            return _json(200, {"token": "secret-token"})
        if seen.headers.get("authorization") != "Bearer secret-token":
            realm = f"{holder[0].url}/token"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'}, b""
        if "/blobs/" in seen.path:
            return 307, {"Location": f"{cdn.url}/cdn{seen.path}?sig=1"}, b""
        return image_server(image)(seen)

    registry = serve(handle)
    holder.append(registry)
    base = RegistryClient(http).pull_image(
        ImageReference.parse(f"{registry.host}/acme/app:1"), store=BlobStore(tmp_path / "dst")
    )
    assert base.manifest_digest == image.digest
    assert len(cdn.seen) == 2  # config and layer
    assert all("authorization" not in s.headers for s in cdn.seen)
    assert all(s.query == {"sig": ["1"]} for s in cdn.seen)


def test_corrupt_blob_is_rejected(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "src")
    image = small_image(store, tmp_path, name="corrupt")
    layer = image.layers[0].digest
    honest = image_server(image)

    def handle(seen: Seen) -> Reply:
        status, headers, body = honest(seen)
        if seen.path.endswith(layer):
            body = body[:-1] + bytes([body[-1] ^ 1])
        return status, headers, body

    fake = serve(handle)
    dst = BlobStore(tmp_path / "dst")
    ref = ImageReference.parse(f"{fake.host}/acme/app:1")
    with pytest.raises(RegistryError, match=f"pulling {ref}: blob {layer}: content hashes to"):
        RegistryClient(http).pull_image(ref, store=dst)
    assert not dst.has(layer)
    assert dst.has(image.config.digest)

    wrong_pin = ref.with_digest(digest_bytes(b"something else"))
    with pytest.raises(RegistryError, match="not the pinned digest"):
        RegistryClient(http).pull_image(wrong_pin, store=dst)


def test_push_protocol_details(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "src")
    image = small_image(store, tmp_path, name="push")
    received: dict[str, bytes] = {}
    digest_header = {"value": image.digest}

    def handle(seen: Seen) -> Reply:
        if seen.method == "HEAD":
            return 404, {}, b""
        if seen.method == "POST" and seen.path == "/v2/acme/app/blobs/uploads/":
            return 202, {"Location": "/v2/acme/app/blobs/uploads/u1?_state=abc"}, b""
        if seen.method == "PUT" and seen.path == "/v2/acme/app/blobs/uploads/u1":
            assert seen.query["_state"] == ["abc"]
            assert seen.headers["content-type"] == "application/octet-stream"
            received[seen.query["digest"][0]] = seen.body
            return 201, {}, b""
        if seen.method == "PUT" and seen.path == "/v2/acme/app/manifests/v1":
            received["manifest"] = seen.body
            assert seen.headers["content-type"] == image.manifest.media_type
            return 201, {"Docker-Content-Digest": digest_header["value"]}, b""
        return 500, {}, b"unexpected"

    fake = serve(handle)
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    assert RegistryClient(http).push_image(image, ref) == image.digest
    assert received["manifest"] == image.manifest_bytes
    for desc in (image.config, *image.layers):
        assert received[desc.digest] == store.path(desc.digest).read_bytes()
    assert fake.paths()[-1] == "PUT /v2/acme/app/manifests/v1"  # manifest last

    digest_header["value"] = digest_bytes(b"rewritten")
    with pytest.raises(RegistryError, match="stored the manifest as"):
        RegistryClient(http).push_image(image, ref)


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (
            403,
            {},
            _errors("DENIED", "requested access to the resource is denied"),
            (
                "denied pushing {ref}: upload of blob {blob}: DENIED requested access to the "
                "resource is denied; check that your login for {host} may push to acme/app"
            ),
        ),
        (
            429,
            {"Retry-After": "7"},
            _errors("TOOMANYREQUESTS", "slow down"),
            (
                "rate limited pushing {ref}: upload of blob {blob}: TOOMANYREQUESTS slow down; "
                "retry after 7 s"
            ),
        ),
        (
            503,
            {},
            b"<html>\nbusy</html>",
            (
                "registry error pushing {ref}: HTTP 503 on upload of blob {blob}: <html>; "
                "the registry failed; retry later"
            ),
        ),
    ],
)
def test_registry_errors_are_one_readable_line(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer],
    http: httpx.Client,
    tmp_path: Path,
    status: int,
    headers: dict[str, str],
    body: bytes,
    expected: str,
) -> None:
    store = BlobStore(tmp_path / "src")
    image = small_image(store, tmp_path, name="errors")

    def handle(seen: Seen) -> Reply:
        if seen.method == "HEAD":
            return 404, {}, b""
        return status, {"Content-Type": "application/json", **headers}, body

    fake = serve(handle)
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    with pytest.raises(RegistryError) as info:
        RegistryClient(http).push_image(image, ref)
    blob = next(iter({d.digest: d for d in image.layers}))
    assert str(info.value) == expected.format(ref=ref, blob=blob, host=fake.host)


def test_unreachable_registry(http: httpx.Client, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ref = ImageReference.parse(f"127.0.0.1:{port}/x/y:1")
    with pytest.raises(RegistryError) as info:
        RegistryClient(http).pull_image(ref, store=BlobStore(tmp_path / "s"))
    assert str(info.value).startswith(f"pulling {ref}: http://127.0.0.1:{port} cannot connect")
    assert "check the registry address" in str(info.value)


def test_blob_store_names_match_digests(tmp_path: Path) -> None:
    # The fake servers above map blob URLs to store paths this way.
    store = BlobStore(tmp_path)
    desc = store.put_bytes(b"x")
    assert store.path(desc.digest).name == digest_hex(desc.digest)


# ---------------------------------------------------------------------------------------------
# The registry sink, retries and re-pushes


def test_registry_sink_pushes_every_tag(
    local_registry: LocalRegistry, http: httpx.Client, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    image = small_image(store, tmp_path, name="sink")
    index = build_index([image, small_image(store, tmp_path, name="sink", arch="arm64")], store)
    sink = RegistrySink(client=RegistryClient(http))
    assert (sink.kind, sink.takes_index) == ("registry", True)
    tags = (f"{local_registry.host}/test/sink:1", f"{local_registry.host}/test/sink:latest")
    lines = sink.write(finished_for(image, store, tmp_path, *tags), NullReporter())
    assert lines == tuple(f"pushed {ImageReference.parse(t)}@{image.digest}" for t in tags)
    lines = sink.write(finished_for(index, store, tmp_path, tags[0]), NullReporter())
    assert lines == (f"pushed {ImageReference.parse(tags[0])}@{index.digest}",)
    pulled = RegistryClient(http).fetch_manifest(ImageReference.parse(tags[0]))
    assert pulled[2] == index.digest


def _flaky_upload_server(image: Image, *, fail_puts: int, keep: bool) -> Callable[[Seen], Reply]:
    """A registry whose first ``fail_puts`` blob PUTs answer 503 (storing the blob if ``keep``)."""
    stored: dict[str, bytes] = {}
    failures = {"left": fail_puts}

    def handle(seen: Seen) -> Reply:
        if seen.method == "HEAD" and "/blobs/" in seen.path:
            return (200, {}, b"") if seen.path.rsplit("/", 1)[1] in stored else (404, {}, b"")
        if seen.method == "POST":
            return 202, {"Location": "/v2/acme/app/blobs/uploads/u1"}, b""
        if seen.method == "PUT" and "/blobs/uploads/" in seen.path:
            digest = seen.query["digest"][0]
            assert digest_bytes(seen.body) == digest, "the body sent again is the whole blob"
            if failures["left"] > 0:
                failures["left"] -= 1
                if keep:
                    stored[digest] = seen.body
                return 503, {}, b"busy"
            stored[digest] = seen.body
            return 201, {}, b""
        if seen.method == "PUT" and "/manifests/" in seen.path:
            return 201, {"Docker-Content-Digest": image.digest}, b""
        return 500, {}, b"unexpected"

    return handle


def big_image(store: BlobStore, tmp_path: Path) -> Image:
    """An image whose layer is larger than what the client holds in memory to upload."""
    staging = tmp_path / "big"
    (staging / "app").mkdir(parents=True)
    (staging / "app" / "data.bin").write_bytes(os.urandom(9 << 20))
    layer = build_layer(staging, store, mtime=0, created_by="imgbuild: big")
    return build_image(None, [layer], config=ImageConfig(), created=CREATED, store=store)


@pytest.mark.parametrize("large", [False, True])
def test_blob_upload_is_retried_with_the_whole_body(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], tmp_path: Path, large: bool
) -> None:
    store = BlobStore(tmp_path / "src")
    image = big_image(store, tmp_path) if large else small_image(store, tmp_path, name="retry")
    fake = serve(_flaky_upload_server(image, fail_puts=1, keep=False))
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    with retrying_client(httpx.HTTPTransport(), retry=RetryPolicy(sleep=lambda _: None)) as http:
        assert RegistryClient(http).push_image(image, ref) == image.digest
    puts = [s for s in fake.seen if s.method == "PUT" and "/blobs/" in s.path]
    assert len(puts) == len({d.digest for d in (image.config, *image.layers)}) + 1
    assert puts[0].body == puts[1].body


def test_upload_failing_after_the_registry_stored_the_blob(
    serve: Callable[[Callable[[Seen], Reply]], FakeServer], http: httpx.Client, tmp_path: Path
) -> None:
    # No retries here: the 503 comes back to the client, which finds the blob stored anyway.
    store = BlobStore(tmp_path / "src")
    image = small_image(store, tmp_path, name="kept")
    fake = serve(_flaky_upload_server(image, fail_puts=1, keep=True))
    ref = ImageReference.parse(f"{fake.host}/acme/app:v1")
    assert RegistryClient(http).push_image(image, ref) == image.digest
    # A blob the registry lost is still an error, and a second push then completes.
    image2 = small_image(store, tmp_path, name="lost")
    fake2 = serve(_flaky_upload_server(image2, fail_puts=1, keep=False))
    ref2 = ImageReference.parse(f"{fake2.host}/acme/app:v1")
    with pytest.raises(RegistryError, match="registry error pushing"):
        RegistryClient(http).push_image(image2, ref2)
    assert RegistryClient(http).push_image(image2, ref2) == image2.digest
    assert not any(s.method == "PUT" and "/manifests/" in s.path for s in fake2.seen[:-1])

"""The registry client against the real registry behind TLS, with htpasswd and with token auth.

Each registry is Debian's ``docker-registry`` serving HTTPS on 127.0.0.1 with a certificate
from a CA the test makes; imgbuild trusts it through ``SSL_CERT_FILE``, as users point it at
a private CA. One registry checks an ``htpasswd`` file (bcrypt, as ``htpasswd -B`` writes);
the other sends clients to a token service the test runs (RS256 JWTs signed by a key whose
certificate is the registry's ``rootcertbundle``). Logins come from a Docker ``config.json``
the test writes into ``DOCKER_CONFIG``, as ``docker login`` would.

For each: push, push again (no blob sent twice), pull by digest, a build whose base comes from
the registry by digest and which pushes there, and a wrong password (one line, exit 1).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from imagebuild.errors import RegistryError
from imagebuild.image.model import ImageConfig
from imagebuild.image.mutate import build_image
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.net.http import http_client
from imagebuild.sinks.auth import CredentialStore
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.pki import KeyMaterial, bcrypt_hash, make_pki
from tests.fixtures.registry_server import LocalRegistry, run_registry
from tests.fixtures.token_server import ISSUER, SERVICE, TokenServer, run_token_server
from tests.integration.conftest import MakeProject, imgbuild
from tests.test_registry import CREATED, small_image

# The real registry binary and the engine's test infrastructure (dev/infra.sh).
pytestmark = pytest.mark.docker

USER = "alice"
PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class Secured:
    """A registry behind TLS and a login; ``tokens`` is its token service (token auth only)."""

    kind: str
    registry: LocalRegistry
    pki: KeyMaterial
    tokens: TokenServer | None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> KeyMaterial:
    """A CA, the registry's certificate and the token signer, made once for the module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def htpasswd_registry(
    pki: KeyMaterial, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    """A TLS registry checking Basic logins against an htpasswd file."""
    root = tmp_path_factory.mktemp("htpasswd-registry")
    (root / "htpasswd").write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
    auth = f"auth:\n  htpasswd:\n    realm: imgbuild-test\n    path: {root / 'htpasswd'}\n"
    with run_registry(root, extra_config=auth, tls=pki, access_log=True) as registry:
        yield Secured("htpasswd", registry, pki, None)


@pytest.fixture(scope="module")
def token_registry(pki: KeyMaterial, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A TLS registry sending clients to a token service the test runs."""
    root = tmp_path_factory.mktemp("token-registry")
    with run_token_server(pki, {USER: PASSWORD}) as tokens:
        auth = (
            f"auth:\n  token:\n    realm: {tokens.realm}\n    service: {SERVICE}\n"
            f"    issuer: {ISSUER}\n    rootcertbundle: {pki.token_cert}\n"
        )
        with run_registry(root, extra_config=auth, tls=pki, access_log=True) as registry:
            yield Secured("token", registry, pki, tokens)


@pytest.fixture(params=["htpasswd", "token"])
def secured(request: pytest.FixtureRequest) -> Secured:
    """Each secured registry in turn."""
    value = request.getfixturevalue(f"{request.param}_registry")
    assert isinstance(value, Secured)
    return value


def login(
    secured: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, password: str = PASSWORD
) -> Path:
    """Trust the test CA and write ``DOCKER_CONFIG/config.json`` with a login, as users do."""
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{USER}:{password}".encode()).decode()
    config = {"auths": {secured.registry.host: {"auth": auth}}}
    (config_dir / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    monkeypatch.setenv("SSL_CERT_FILE", str(secured.pki.ca_cert))
    return config_dir / "config.json"


def _client(config: Path) -> tuple[httpx.Client, RegistryClient]:
    http = http_client()
    return http, RegistryClient(http, credentials=CredentialStore.from_docker_config(config))


def test_push_push_again_and_pull_by_digest(
    secured: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = login(secured, tmp_path, monkeypatch)
    store = BlobStore(tmp_path / "store")
    image = small_image(store, tmp_path, name=f"auth-{secured.kind}")
    ref = ImageReference.parse(f"{secured.registry.host}/auth/{secured.kind}:v1")
    http, client = _client(config)
    sent: list[tuple[str, str, bool]] = []
    http.event_hooks["request"] = [
        lambda r: sent.append((r.method, r.url.scheme, "Authorization" in r.headers))
    ]
    with http:
        assert client.push_image(image, ref) == image.digest
        # Loopback is tried over HTTP first (as Docker does); no login ever goes that way.
        assert sent[0][1] == "http"
        assert [scheme for _, scheme, authorized in sent if authorized] != []
        assert {scheme for _, scheme, authorized in sent if authorized} == {"https"}
        assert [m for m, _, _ in sent].count("POST") == 2  # the config and the one layer

        sent.clear()
        again = RegistryClient(http, credentials=CredentialStore.from_docker_config(config))
        assert again.push_image(image, ref, store) == image.digest
        assert "POST" not in [m for m, _, _ in sent]  # no blob is sent a second time

        pulled = BlobStore(tmp_path / "pulled")
        base = client.pull_image(ref.with_digest(image.digest), store=pulled)
    assert base.manifest_digest == image.digest
    for desc in (*image.layers, image.config):
        assert pulled.path(desc.digest).read_bytes() == store.path(desc.digest).read_bytes()
    if secured.tokens is not None:
        scopes = {s for r in secured.tokens.requests for s in r["query"].get("scope", [])}  # type: ignore[attr-defined]
        assert f"repository:auth/{secured.kind}:pull,push" in scopes
        assert all(r["user"] == USER for r in secured.tokens.requests)


def test_wrong_password_is_one_line(
    secured: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = login(secured, tmp_path, monkeypatch, password="not the password")
    store = BlobStore(tmp_path / "store")
    image = small_image(store, tmp_path, name=f"refused-{secured.kind}")
    ref = ImageReference.parse(f"{secured.registry.host}/auth/refused:v1")
    http, client = _client(config)
    with http, pytest.raises(RegistryError) as info:
        client.push_image(image, ref)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"unauthorized pushing {ref}: ")
    assert "not the password" not in text
    # htpasswd: the registry refused the Basic login; token: the token service did.
    assert f"the registry refused the login of {USER!r}" in text or "token from https://" in text
    assert f"docker login {secured.registry.host}" in text


def test_untrusted_certificate_is_one_line(
    secured: Secured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = login(secured, tmp_path, monkeypatch)
    monkeypatch.delenv("SSL_CERT_FILE")
    ref = ImageReference.parse(f"{secured.registry.host}/auth/nothing:v1")
    http, client = _client(config)
    with http, pytest.raises(RegistryError) as info:
        client.pull_image(ref, store=BlobStore(tmp_path / "s"))
    text = str(info.value)
    assert "\n" not in text
    assert "certificate" in text and "SSL_CERT_FILE" in text


def _base_in(secured: Secured, config: Path, tmp_path: Path) -> str:
    """Copy the test infra's Debian Python base into the secured registry; a digest reference."""
    infra = os.environ.get("IMGBUILD_TEST_REGISTRY")
    assert infra, "run dev/infra.sh up and source /run/imgbuild-infra/env"
    store = BlobStore(tmp_path / "base-store")
    with http_client() as plain:
        source = ImageReference.parse(f"{infra}/library/python:3.11-slim-bookworm")
        base = RegistryClient(plain).pull_image(source, store=store)
    image = build_image(base, [], config=ImageConfig(), created=CREATED, store=store)
    target = ImageReference.parse(f"{secured.registry.host}/bases/python:3.11-slim")
    http, client = _client(config)
    with http:
        digest = client.push_image(image, target)
    return str(target.with_digest(digest))


def test_build_from_and_to_the_registry(
    secured: Secured,
    make_project: MakeProject,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build pulls its base by digest from the secured registry and pushes there, twice."""
    config = login(secured, tmp_path, monkeypatch)
    base = _base_in(secured, config, tmp_path)
    project = make_project()
    ref = f"{secured.registry.host}/apps/demo-{secured.kind}:1"
    args = ("build", project, "--python", "3.11", "--base", base, "--no-compile",
            "--tag", ref, "--output", "registry", "--cache-dir", tmp_path / "cache")  # fmt: skip
    first = imgbuild(*args)
    assert first.exit_code == 0, first.stderr
    digest = first.stdout.strip().splitlines()[-1].removeprefix("digest: ")
    assert f"pushed {ref}@{digest}" in first.stdout
    uploads = _uploads(secured, "apps/")
    assert uploads > 0

    again = imgbuild(*args)
    assert again.exit_code == 0, again.stderr
    assert f"pushed {ref}@{digest}" in again.stdout
    assert _uploads(secured, "apps/") == uploads  # every blob was there: none is sent again

    pulled = BlobStore(tmp_path / "pulled")
    http, client = _client(config)
    with http:
        image = client.pull_image(ImageReference.parse(ref).with_digest(digest), store=pulled)
    assert image.manifest_digest == digest
    assert base.partition("@")[2] != digest


def _uploads(secured: Secured, prefix: str) -> int:
    """Blob uploads the registry's access log shows into repositories under ``prefix``."""
    log = secured.registry.log.read_text(errors="replace")
    return log.count(f"POST /v2/{prefix}")


def test_build_with_a_wrong_password_fails_in_one_line(
    secured: Secured, make_project: MakeProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = login(secured, tmp_path, monkeypatch)
    base = _base_in(secured, config, tmp_path)
    login(secured, tmp_path, monkeypatch, password="wrong password")
    project = make_project()
    ref = f"{secured.registry.host}/apps/refused:1"
    args = ("build", project, "--python", "3.11", "--base", base, "--no-compile",
            "--tag", ref, "--output", "registry", "--cache-dir", tmp_path / "cache")  # fmt: skip
    result = imgbuild(*args)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: unauthorized pulling ")
    assert f"docker login {secured.registry.host}" in errors[0]
    assert "wrong password" not in result.stderr

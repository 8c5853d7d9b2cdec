"""Registries: image references, credentials, and an OCI distribution client on httpx.

Pointing tests (or an air-gapped build) at a local registry: ``ImageReference.with_mirrors``
rewrites the registry host and keeps the repository path, so with the mirror map
``parse_mirrors("docker.io=127.0.0.1:5055")`` the base ``python:3.11-slim`` is pulled from
``127.0.0.1:5055/library/python:3.11-slim``. Loopback hosts are spoken to over plain HTTP,
everything else over HTTPS.

Authentication follows the distribution token spec: requests go out anonymously (or with a
cached token); a 401 carries a ``WWW-Authenticate`` challenge, ``Bearer`` (fetch a token from
the realm for the scope, with Basic credentials when known) or ``Basic`` (send credentials);
the request is then retried once. Tokens are cached per registry and scope.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from imagebuild.digest import Digest, digest_bytes
from imagebuild.errors import ImageError, RegistryError
from imagebuild.image.descriptor import (
    CONFIG_TYPES,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    checked_digest,
)
from imagebuild.image.model import BaseImage, Image, ImageIndex
from imagebuild.image.name import DOCKER_HUB, ImageReference, normalize_registry, registry_url
from imagebuild.image.store import BlobStore

__all__ = [
    "MANIFEST_ACCEPT",
    "CredentialStore",
    "Credentials",
    "RegistryClient",
]

_DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

MANIFEST_ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"

_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True, kw_only=True, slots=True)
class Credentials:
    """A login for one registry."""

    username: str
    """User name (``<token>`` when ``password`` is an identity token, as Docker writes it)."""
    password: str = field(repr=False)
    """Password or personal access token."""
    identity_token: str | None = field(default=None, repr=False)
    """An OAuth2 refresh token (``identitytoken`` in config.json), exchanged for access tokens."""


def _normalize_auth_key(key: str) -> str:
    """Docker's config keys may be hosts or URLs (``https://index.docker.io/v1/``)."""
    host = re.sub(r"^[a-z]+://", "", key.strip()).split("/", 1)[0]
    return normalize_registry(host)


def _helper_server_url(registry: str) -> str:
    return _DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry


def _run_credential_helper(suffix: str, server_url: str) -> Credentials | None:
    """Ask ``docker-credential-<suffix> get``; ``None`` when it has nothing or is missing.

    The only subprocess in this module, output captured; helper failures fall back to
    anonymous access, which then fails with an "unauthorized" error naming the fix.
    """
    try:
        done = subprocess.run(
            [f"docker-credential-{suffix}", "get"],
            input=server_url.encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    try:
        reply = json.loads(done.stdout)
        username, secret = str(reply["Username"]), str(reply["Secret"])
    except (ValueError, KeyError, TypeError):
        return None
    if username == "<token>":
        return Credentials(username=username, password="", identity_token=secret)
    return Credentials(username=username, password=secret)


@dataclass(frozen=True, kw_only=True, slots=True)
class CredentialStore:
    """Registry logins: explicit ones and those from Docker's ``config.json``.

    Lookup follows docker-py: ``credHelpers[host]``, then ``credsStore``, then ``auths``. The
    CLI decides where config.json is (``$DOCKER_CONFIG`` or ``~/.docker``); this class never
    reads the environment.
    """

    auths: tuple[tuple[str, Credentials], ...] = ()
    """Logins by normalised registry host (``docker.io``, ``ghcr.io``, ``127.0.0.1:5055``)."""
    cred_helpers: tuple[tuple[str, str], ...] = ()
    """Per-registry credential helper suffixes (``credHelpers``)."""
    creds_store: str | None = None
    """The default credential helper suffix (``credsStore``)."""
    helper: Callable[[str, str], Credentials | None] = field(
        default=_run_credential_helper, repr=False, compare=False
    )
    """Runs a helper: ``(suffix, server_url) -> Credentials | None`` (tests replace it)."""

    @classmethod
    def from_login(cls, registry: str, username: str, password: str) -> CredentialStore:
        """A store holding one explicit login (e.g. ``--username`` / ``--password-stdin``)."""
        creds = Credentials(username=username, password=password)
        return cls(auths=((_normalize_auth_key(registry), creds),))

    @classmethod
    def from_docker_config(cls, path: Path | None) -> CredentialStore:
        """Read a Docker ``config.json``; a missing file (or ``None``) gives an empty store."""
        if path is None:
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise RegistryError(
                f"Docker config {path}: cannot read: {exc}",
                hint="fix or remove the file, or point DOCKER_CONFIG elsewhere",
            ) from None
        if not isinstance(raw, dict):
            raise RegistryError(f"Docker config {path}: expected a JSON object")
        auths: dict[str, Credentials] = {}
        raw_auths = raw.get("auths")
        for key, entry in (raw_auths if isinstance(raw_auths, dict) else {}).items():
            if not isinstance(entry, dict):
                continue
            creds = _decode_auth_entry(entry, path=path, key=str(key))
            if creds is not None:
                auths.setdefault(_normalize_auth_key(str(key)), creds)
        raw_helpers = raw.get("credHelpers")
        helpers = {
            _normalize_auth_key(str(k)): str(v)
            for k, v in (raw_helpers if isinstance(raw_helpers, dict) else {}).items()
            if isinstance(v, str) and v
        }
        store = raw.get("credsStore")
        return cls(
            auths=tuple(sorted(auths.items())),
            cred_helpers=tuple(sorted(helpers.items())),
            creds_store=store if isinstance(store, str) and store else None,
        )

    def get(self, registry: str) -> Credentials | None:
        """The login for ``registry`` (a normalised host), or ``None`` to go anonymous."""
        registry = normalize_registry(registry)
        helper = dict(self.cred_helpers).get(registry) or self.creds_store
        if helper:
            found = self.helper(helper, _helper_server_url(registry))
            if found is not None:
                return found
        return dict(self.auths).get(registry)


def _decode_auth_entry(entry: Mapping[str, object], *, path: Path, key: str) -> Credentials | None:
    identity = entry.get("identitytoken")
    auth = entry.get("auth")
    username = entry.get("username")
    password = entry.get("password")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryError(
                f"Docker config {path}: auths[{key!r}].auth is not base64 of user:password",
                hint=f"run docker login {key} again",
            ) from None
        username, _, password = decoded.partition(":")
    if isinstance(identity, str) and identity:
        return Credentials(
            username=username if isinstance(username, str) else "<token>",
            password="",
            identity_token=identity,
        )
    if isinstance(username, str) and username and isinstance(password, str):
        return Credentials(username=username, password=password)
    return None


# --------------------------------------------------------------------------------------------
# Client


@dataclass(frozen=True, slots=True)
class _Challenge:
    scheme: str  # "bearer" or "basic", lowercased
    params: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return dict(self.params).get(key)


_CHALLENGE_PARAM_RE = re.compile(
    r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?'
)


def _parse_challenge(header: str) -> _Challenge | None:
    """Parse the first ``WWW-Authenticate`` challenge: ``Bearer realm="…",service="…"``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: list[tuple[str, str]] = []
    pos = 0
    while pos < len(rest):
        m = _CHALLENGE_PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params.append((m.group(1).lower(), re.sub(r"\\(.)", r"\1", value)))
        pos = m.end()
    return _Challenge(scheme=scheme.lower(), params=tuple(params))


@dataclass(frozen=True, slots=True)
class _Op:
    """What we are doing, for error messages: ``pulling ghcr.io/x/y:1``."""

    ref: ImageReference
    verb: str  # "pulling" or "pushing"
    actions: str  # token scope actions: "pull" or "pull,push"

    @property
    def scope(self) -> str:
        return f"repository:{self.ref.repository}:{self.actions}"


def _error_body(resp: httpx.Response) -> tuple[str, str]:
    """(code, message) from a registry JSON error body, or from the status line."""
    try:
        body = resp.json()
        first = body["errors"][0]
        code = str(first.get("code") or "")
        message = str(first.get("message") or "")
        detail = first.get("detail")
        if detail and not isinstance(detail, (dict, list)):
            message = f"{message} ({detail})" if message else str(detail)
        return code, message
    except Exception:  # noqa: BLE001 - any unparsable body falls back to the status line
        text = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else ""
        return "", text or resp.reason_phrase


def _platform_text(platform: object) -> str:
    if not isinstance(platform, dict):
        return "unknown"
    parts = [str(platform.get("os", "?")), str(platform.get("architecture", "?"))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _json_object(data: bytes, op: _Op, what: str) -> dict[str, object]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{op.verb} {op.ref}: {what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RegistryError(f"{op.verb} {op.ref}: {what} is not a JSON object")
    return obj


def _descriptor(obj: object, op: _Op, where: str) -> Descriptor:
    try:
        return Descriptor.from_json(obj, where=where)
    except ImageError as exc:
        raise RegistryError(f"{op.verb} {op.ref}: {exc.message}") from None


class RegistryClient:
    """Pulls and pushes images over the OCI distribution API.

    ``http`` is the one client the CLI created (its timeouts, proxies and TLS settings apply);
    ``credentials`` supplies logins, or ``None`` for anonymous access only. Every failure is a
    ``RegistryError`` whose message names the reference, the operation and a fix.
    """

    def __init__(self, http: httpx.Client, *, credentials: CredentialStore | None = None) -> None:
        self._http = http
        self._credentials = credentials
        self._challenges: dict[str, _Challenge] = {}
        self._tokens: dict[tuple[str, str], str] = {}

    # -- public operations ---------------------------------------------------------------

    def pull_image(
        self,
        ref: ImageReference,
        *,
        platform: Sequence[str] = ("linux", "amd64"),
        store: BlobStore,
    ) -> BaseImage:
        """Pull ``ref`` for ``platform`` (``(os, architecture[, variant])``) into ``store``.

        An index or manifest list is resolved to the first entry for the platform. Blobs
        already in ``store`` are not downloaded again; the others are verified while they
        stream in. A digest-pinned reference must match the bytes received.
        """
        op = _Op(ref, "pulling", "pull")
        data, media_type, digest = self.fetch_manifest(ref)
        if ref.digest is not None and digest != ref.digest:
            raise RegistryError(
                f"pulling {ref}: manifest hashes to {digest}, not the pinned digest",
                hint="the registry served different content; check the mirror or the digest",
            )
        obj = _json_object(data, op, "manifest")
        if media_type in INDEX_TYPES:
            entry = self._select_platform(op, obj, platform)
            data, media_type, digest = self.fetch_manifest(ref.with_digest(entry.digest))
            if digest != entry.digest:
                raise RegistryError(
                    f"pulling {ref}: platform manifest hashes to {digest}, "
                    f"the index says {entry.digest}"
                )
            obj = _json_object(data, op, "manifest")
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(
                f"pulling {ref}: unsupported manifest media type {media_type!r}",
                hint="imgbuild reads OCI and Docker v2 schema 2 images",
            )

        config_desc = _descriptor(obj.get("config"), op, "manifest config")
        if config_desc.media_type not in CONFIG_TYPES:
            raise RegistryError(
                f"pulling {ref}: config has media type {config_desc.media_type}, not an image"
            )
        raw_layers = obj.get("layers")
        if not isinstance(raw_layers, list):
            raise RegistryError(f"pulling {ref}: manifest has no layers list")
        layers = tuple(
            _descriptor(raw, op, f"manifest layers[{i}]") for i, raw in enumerate(raw_layers)
        )

        self._ensure_blob(op, config_desc, store)
        config = _json_object(store.read_bytes(config_desc.digest), op, "image config")
        wanted = "/".join(platform[:2])
        found = f"{config.get('os')}/{config.get('architecture')}"
        if found != wanted:
            raise RegistryError(
                f"pulling {ref}: image is for {found}, not {wanted}",
                hint=f"use a base image published for {wanted} or build for {found}",
            )
        rootfs = config.get("rootfs")
        raw_diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(raw_diff_ids, list) or len(raw_diff_ids) != len(layers):
            raise RegistryError(
                f"pulling {ref}: config rootfs.diff_ids does not list one entry per layer"
            )
        try:
            diff_ids = tuple(checked_digest(str(d)) for d in raw_diff_ids)
        except ImageError as exc:
            raise RegistryError(f"pulling {ref}: config rootfs.diff_ids: {exc.message}") from None
        for layer in layers:
            self._ensure_blob(op, layer, store)
        return BaseImage(
            reference=str(ref),
            manifest_digest=digest,
            config=config,
            layers=layers,
            diff_ids=diff_ids,
        )

    def push_image(
        self, image: Image, ref: ImageReference, store: BlobStore | None = None
    ) -> Digest:
        """Push ``image`` (blobs from ``store``, default ``image.store``) to ``ref``.

        Blobs the registry has are skipped (HEAD); the others are uploaded monolithically
        (POST, then PUT ``?digest=``). The manifest goes last, to the tag (or the pinned
        digest). Returns the manifest digest after checking the registry computed the same.
        """
        op = _Op(ref, "pushing", "pull,push")
        store = store or image.store
        if ref.digest is not None and ref.digest != image.digest:
            raise RegistryError(
                f"pushing {ref}: the image's digest is {image.digest}",
                hint="push to a tag, or to the image's own digest",
            )
        blobs: dict[Digest, Descriptor] = {}
        for desc in (*image.layers, image.config):
            blobs.setdefault(desc.digest, desc)
        for desc in blobs.values():
            if not self._blob_exists(op, desc.digest):
                self._upload_blob(op, desc, store)
        return self.push_manifest(ref, image.manifest_bytes, media_type=image.manifest.media_type)

    def push_index(self, index: ImageIndex, ref: ImageReference) -> Digest:
        """Push every image of ``index`` by digest, then the index itself to ``ref``."""
        for image in index.images:
            self.push_image(image, ref.with_digest(image.digest), index.store)
        return self.push_manifest(ref, index.manifest_bytes, media_type=index.manifest.media_type)

    def push_manifest(self, ref: ImageReference, data: bytes, *, media_type: str) -> Digest:
        """PUT manifest (or index) ``data`` at ``ref``'s tag or digest; return its digest.

        The blobs (or child manifests) it references must already be in the repository.
        """
        op = _Op(ref, "pushing", "pull,push")
        digest = digest_bytes(data)
        resp = self._send(
            op,
            "PUT",
            self._url(ref, f"manifests/{ref.reference}"),
            headers={"Content-Type": media_type},
            content=lambda: data,
        )
        if resp.status_code not in (200, 201):
            raise self._status_error(op, resp, "manifest upload")
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise RegistryError(
                f"pushing {ref}: the registry stored the manifest as {returned}, expected {digest}",
                hint="the registry rewrote the manifest; push to a registry that keeps bytes",
            )
        return digest

    def fetch_manifest(self, ref: ImageReference) -> tuple[bytes, str, Digest]:
        """GET the manifest (or index) at ``ref``: ``(bytes, media type, digest of bytes)``."""
        op = _Op(ref, "pulling", "pull")
        resp = self._send(
            op,
            "GET",
            self._url(ref, f"manifests/{ref.reference}"),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if resp.status_code != 200:
            raise self._status_error(op, resp, "manifest")
        data = resp.content
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES | INDEX_TYPES:
            # Some registries answer application/json; the document names its own type.
            try:
                declared = json.loads(data).get("mediaType")
            except (ValueError, AttributeError):
                declared = None
            if isinstance(declared, str) and declared:
                media_type = declared
        return data, media_type, digest_bytes(data)

    # -- blobs ---------------------------------------------------------------------------

    def _blob_exists(self, op: _Op, digest: Digest) -> bool:
        resp = self._send(op, "HEAD", self._url(op.ref, f"blobs/{digest}"), follow_redirects=True)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._status_error(op, resp, f"blob {digest} check")

    def _ensure_blob(self, op: _Op, desc: Descriptor, store: BlobStore) -> None:
        if store.has(desc.digest):
            return
        url = self._url(op.ref, f"blobs/{desc.digest}")
        with self._stream(op, "GET", url) as resp:
            if resp.status_code != 200:
                resp.read()
                raise self._status_error(op, resp, f"blob {desc.digest}")
            try:
                store.ingest(
                    resp.iter_bytes(_CHUNK),
                    media_type=desc.media_type,
                    expected=desc.digest,
                    expected_size=desc.size,
                )
            except ImageError as exc:
                raise RegistryError(
                    f"pulling {op.ref}: {exc.message}",
                    hint="the download was corrupted or the registry is serving bad data; retry",
                ) from None
            except httpx.HTTPError as exc:
                raise self._transport_error(op, exc) from exc

    def _upload_blob(self, op: _Op, desc: Descriptor, store: BlobStore) -> None:
        path = store.path(desc.digest)
        if not path.is_file():
            raise RegistryError(
                f"pushing {op.ref}: blob {desc.digest} is missing from {store.root}",
                hint="rebuild the image",
            )
        start = self._send(
            op,
            "POST",
            self._url(op.ref, "blobs/uploads/"),
            headers={"Content-Length": "0"},
        )
        if start.status_code not in (201, 202):
            raise self._status_error(op, start, f"upload of blob {desc.digest}")
        location = start.headers.get("Location")
        if not location:
            raise RegistryError(f"pushing {op.ref}: upload started without a Location header")
        # Location may be relative and may carry session state in its query: keep it.
        target = start.url.join(location).copy_add_param("digest", desc.digest)

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk

        done = self._send(
            op,
            "PUT",
            target,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
            content=chunks,
        )
        if done.status_code not in (201, 204):
            raise self._status_error(op, done, f"upload of blob {desc.digest}")

    def _select_platform(
        self, op: _Op, index: Mapping[str, object], platform: Sequence[str]
    ) -> Descriptor:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise RegistryError(f"pulling {op.ref}: image index has no manifests list")
        os_name, arch = platform[0], platform[1]
        variant = platform[2] if len(platform) > 2 else None
        available: list[str] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            plat = entry.get("platform")
            text = _platform_text(plat)
            if text.startswith("unknown/"):  # attestation manifests
                continue
            available.append(text)
            if not isinstance(plat, dict):
                continue
            if plat.get("os") != os_name or plat.get("architecture") != arch:
                continue
            if variant is not None and plat.get("variant") not in (None, variant):
                continue
            return _descriptor(entry, op, f"index manifests[{i}]")
        wanted = "/".join(platform)
        raise RegistryError(
            f"pulling {op.ref}: no image for {wanted}; available: {', '.join(available) or 'none'}",
            hint="pick one of the available platforms with --platform",
        )

    # -- transport and auth --------------------------------------------------------------

    def _url(self, ref: ImageReference, path: str) -> httpx.URL:
        return httpx.URL(f"{registry_url(ref.registry)}/v2/{ref.repository}/{path}")

    def _send(
        self,
        op: _Op,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str] | None = None,
        content: Callable[[], bytes | Iterator[bytes]] | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send a request with auth, retrying once after a 401; return the read response."""
        with self._stream(
            op, method, url, headers=headers, content=content, follow_redirects=follow_redirects
        ) as resp:
            try:
                resp.read()
            except httpx.HTTPError as exc:
                raise self._transport_error(op, exc) from exc
        return resp

    @contextmanager
    def _stream(
        self,
        op: _Op,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str] | None = None,
        content: Callable[[], bytes | Iterator[bytes]] | None = None,
        follow_redirects: bool = True,
    ) -> Iterator[httpx.Response]:
        """Like ``_send`` but yields the response with its body unread, closing it after.

        Redirects (blob downloads to a CDN) are followed by httpx, which drops the
        ``Authorization`` header when the redirect leaves the registry's origin.
        """
        resp = self._open(
            op, method, url, headers=headers, content=content, follow_redirects=follow_redirects
        )
        try:
            yield resp
        finally:
            resp.close()

    def _open(
        self,
        op: _Op,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str] | None,
        content: Callable[[], bytes | Iterator[bytes]] | None,
        follow_redirects: bool,
    ) -> httpx.Response:
        host = op.ref.registry
        known = self._challenges.get(host)
        if known is not None and known.scheme == "bearer" and (host, op.scope) not in self._tokens:
            # Same registry, new scope (e.g. pull then push): get its token up front.
            self._authorize(op, host, known)
        for attempt in (1, 2):
            request_headers = dict(headers or {})
            auth = self._auth_header(host, op.scope)
            if auth is not None:
                request_headers["Authorization"] = auth
            request = self._http.build_request(
                method, url, headers=request_headers, content=content() if content else None
            )
            try:
                resp = self._http.send(request, stream=True, follow_redirects=follow_redirects)
            except httpx.HTTPError as exc:
                raise self._transport_error(op, exc) from exc
            if resp.status_code != 401 or attempt == 2:
                return resp
            try:
                resp.read()
            except httpx.HTTPError:
                pass
            finally:
                resp.close()
            challenge = _parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            if challenge is None or challenge.scheme not in ("bearer", "basic"):
                return resp
            # A fresh challenge, or our token was refused (expired, or lacks the scope).
            self._challenges[host] = challenge
            self._authorize(op, host, challenge)
        raise AssertionError("unreachable")

    def _auth_header(self, host: str, scope: str) -> str | None:
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials.get(host) if self._credentials else None
            if creds is None or creds.identity_token:
                return None
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        token = self._tokens.get((host, scope))
        return f"Bearer {token}" if token else None

    def _authorize(self, op: _Op, host: str, challenge: _Challenge) -> None:
        """Obtain what ``_auth_header`` will send next, for a fresh challenge."""
        if challenge.scheme == "basic":
            return  # credentials are added by _auth_header (or we stay unauthorized)
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"{op.verb} {op.ref}: Bearer challenge without a realm")
        scopes = [op.scope]
        challenge_scope = challenge.get("scope")
        if challenge_scope and challenge_scope not in scopes:
            scopes.append(challenge_scope)
        service = challenge.get("service")
        creds = self._credentials.get(host) if self._credentials else None
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "imgbuild",
                    "scope": " ".join(scopes),
                }
                if service:
                    form["service"] = service
                resp = self._http.post(realm, data=form)
            else:
                params: list[tuple[str, str | int | float | bool | None]] = [
                    ("scope", s) for s in scopes
                ]
                if service:
                    params.insert(0, ("service", service))
                basic = (creds.username, creds.password) if creds is not None else None
                resp = self._http.get(realm, params=params, auth=basic)
        except httpx.HTTPError as exc:
            raise self._transport_error(op, exc, what=f"token service {realm}") from exc
        if resp.status_code in (401, 403):
            raise self._status_error(op, resp, f"token from {realm}")
        if resp.status_code != 200:
            raise self._status_error(op, resp, f"token from {realm}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(
                f"{op.verb} {op.ref}: token service {realm} returned no token",
                hint="check the registry's auth service",
            )
        self._tokens[(host, op.scope)] = token

    # -- errors --------------------------------------------------------------------------

    def _transport_error(
        self, op: _Op, exc: httpx.HTTPError, *, what: str | None = None
    ) -> RegistryError:
        target = what or registry_url(op.ref.registry)
        if isinstance(exc, httpx.TimeoutException):
            detail = "timed out"
        elif isinstance(exc, httpx.ConnectError):
            detail = f"cannot connect ({exc})"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return RegistryError(
            f"{op.verb} {op.ref}: {target} {detail}",
            hint="check the registry address, your network or proxy settings, and retry",
        )

    def _status_error(self, op: _Op, resp: httpx.Response, what: str) -> RegistryError:
        code, message = _error_body(resp)
        status = resp.status_code
        detail = f"{what}: {code + ' ' if code else ''}{message}".rstrip(": ")
        registry = op.ref.registry
        if status == 401:
            return RegistryError(
                f"unauthorized {op.verb} {op.ref}: {detail}",
                hint=f"log in with docker login {registry}",
            )
        if status == 403 or code == "DENIED":
            fix = (
                f"check that your login for {registry} may push to {op.ref.repository}"
                + (" (a GHCR token needs write:packages)" if registry == "ghcr.io" else "")
                if op.verb == "pushing"
                else f"check that your login for {registry} may pull {op.ref.repository}"
            )
            return RegistryError(f"denied {op.verb} {op.ref}: {detail}", hint=fix)
        if status == 404:
            return RegistryError(
                f"not found {op.verb} {op.ref}: {detail}",
                hint="check the repository name and tag (and any registry mirror)",
            )
        if status == 429:
            after = resp.headers.get("Retry-After")
            return RegistryError(
                f"rate limited {op.verb} {op.ref}: {detail}",
                hint=f"retry after {after} s" if after else "retry later, or log in",
            )
        if status >= 500:
            return RegistryError(
                f"registry error {op.verb} {op.ref}: HTTP {status} on {detail}",
                hint="the registry failed; retry later",
            )
        return RegistryError(f"{op.verb} {op.ref}: HTTP {status} on {detail}")

"""How a registry request gets in: the distribution token flow, over the right scheme.

Authentication follows the distribution token spec: requests go out anonymously (or with a
cached token); a 401 carries a ``WWW-Authenticate`` challenge, ``Bearer`` (fetch a token from
the realm for the scope, with Basic credentials when known) or ``Basic`` (send credentials);
the request is then sent once more. Tokens are cached per registry and scope, and fetched
once when parallel uploads meet the same challenge together. Logins come from
``sinks.logins`` (re-exported here). ``RegistrySession`` does this for the client in
``sinks.remote`` and turns every failure into one ``RegistryError`` naming the reference,
the operation and a fix.
"""

from __future__ import annotations

import base64
import re
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from imagebuild.errors import RegistryError
from imagebuild.image.name import ImageReference, registry_url
from imagebuild.net.http import (
    Deadline,
    TransferDeadlineExceeded,
    client_policy,
    with_deadline,
)
from imagebuild.net.transfer import redact, redact_text
from imagebuild.sinks.logins import Credentials, CredentialStore

__all__ = [
    "Body",
    "Challenge",
    "CredentialStore",
    "Credentials",
    "Op",
    "RegistrySession",
    "parse_challenge",
]

Body = Callable[[], bytes | httpx.SyncByteStream]
"""Makes a request's body afresh for each attempt: bytes, or a stream that re-reads a file."""


# --------------------------------------------------------------------------------------------
# Challenges and the session


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` challenge."""

    scheme: str
    """``bearer`` or ``basic``, lowercased."""
    params: tuple[tuple[str, str], ...]
    """Its parameters (``realm``, ``service``, ``scope``), names lowercased, in order."""

    def get(self, key: str) -> str | None:
        """The parameter ``key``, or ``None``."""
        return dict(self.params).get(key)


_CHALLENGE_PARAM_RE = re.compile(
    r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?'
)


def parse_challenge(header: str) -> Challenge | None:
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
    return Challenge(scheme=scheme.lower(), params=tuple(params))


@dataclass(frozen=True, slots=True)
class Op:
    """What we are doing, for error messages: ``pulling ghcr.io/x/y:1``."""

    ref: ImageReference
    """The image pulled or pushed."""
    verb: str
    """``pulling`` or ``pushing``."""
    actions: str
    """Token scope actions: ``pull`` or ``pull,push``."""
    also: tuple[str, ...] = ()
    """Further scopes the token must carry (``repository:<from>:pull`` to mount a blob)."""

    @property
    def scope(self) -> str:
        """The token scope this operation needs, and the others it asks for, space-separated."""
        return " ".join((f"repository:{self.ref.repository}:{self.actions}", *self.also))


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


def error_code(resp: httpx.Response) -> str:
    """The code of a registry's JSON error answer (``MANIFEST_BLOB_UNKNOWN``), or ''."""
    return _error_body(resp)[0]


class RegistrySession:
    """Requests to registries with auth: challenges answered, tokens cached per scope.

    ``http`` is the one client the CLI created (its timeouts, proxies, TLS settings and retry
    transport apply); ``credentials`` supplies logins, or ``None`` for anonymous access only.
    """

    def __init__(self, http: httpx.Client, *, credentials: CredentialStore | None = None) -> None:
        self._http = http
        self._credentials = credentials
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], str] = {}
        self._answered: dict[tuple[str, str], Challenge] = {}  # what each token was got for
        self._token_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._tls: set[str] = set()  # loopback registries found to answer only HTTPS

    def base_url(self, registry: str) -> str:
        """``registry``'s API base: ``registry_url``'s, or HTTPS for a loopback one with TLS."""
        base = registry_url(registry)
        return "https://" + base.partition("://")[2] if registry in self._tls else base

    def url(self, ref: ImageReference, path: str) -> httpx.URL:
        """The API URL of ``path`` (``manifests/<ref>``, ``blobs/<digest>``) in ``ref``'s repo."""
        return httpx.URL(f"{self.base_url(ref.registry)}/v2/{ref.repository}/{path}")

    def send(
        self,
        op: Op,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str] | None = None,
        content: Body | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send a request with auth, retrying once after a 401; return the read response."""
        with self.stream(
            op, method, url, headers=headers, content=content, follow_redirects=follow_redirects
        ) as resp:
            try:
                resp.read()
            except httpx.HTTPError as exc:
                raise self.transport_error(op, exc) from exc
        return resp

    @contextmanager
    def stream(
        self,
        op: Op,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str] | None = None,
        content: Body | None = None,
        follow_redirects: bool = True,
        size: int | None = None,
    ) -> Iterator[httpx.Response]:
        """Like ``send`` but yields the response with its body unread, closing it after.

        Redirects (blob downloads to a CDN) are followed by httpx, which drops the
        ``Authorization`` header when the redirect leaves the registry's origin. ``size``
        (a blob's, from its descriptor) widens the transfer's deadline.
        """
        resp = self._open(
            op,
            method,
            url,
            headers=headers,
            content=content,
            follow_redirects=follow_redirects,
            size=size,
        )
        try:
            yield resp
        finally:
            resp.close()

    def _open(
        self,
        op: Op,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str] | None,
        content: Body | None,
        follow_redirects: bool,
        size: int | None = None,
    ) -> httpx.Response:
        host = op.ref.registry
        known = self._challenges.get(host)
        if known is not None and known.scheme == "bearer" and (host, op.scope) not in self._tokens:
            # Same registry, new scope (e.g. pull then push): get its token up front.
            self._renew(op, host, known, refused=None)
        for attempt in (1, 2):
            request_headers = dict(headers or {})
            auth = self._auth_header(host, op.scope)
            if auth is not None:
                request_headers["Authorization"] = auth
            resp = self._send_once(
                op, method, url, request_headers, content, follow_redirects=follow_redirects,
                size=size,
            )  # fmt: skip
            if resp.status_code != 401 or attempt == 2:
                return resp
            try:
                resp.read()
            except httpx.HTTPError:
                pass
            finally:
                resp.close()
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            if challenge is None or challenge.scheme not in ("bearer", "basic"):
                return resp
            # A fresh challenge, or our token was refused (expired, or lacks the scope).
            self._challenges[host] = challenge
            self._renew(op, host, challenge, refused=request_headers.get("Authorization"))
        raise AssertionError("unreachable")

    def _send_once(
        self,
        op: Op,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        content: Body | None,
        *,
        follow_redirects: bool,
        size: int | None = None,
    ) -> httpx.Response:
        """Send one request (over HTTPS once the loopback registry turned out to need it).

        Every request carries a deadline (the client's per-transfer budget, widened by the
        blob's size when known), so a registry that trickles bytes cannot hang a build.
        """
        host = op.ref.registry
        if host in self._tls and url.scheme == "http" and url.netloc.decode() == host:
            url = url.copy_with(scheme="https")
        request = self._build(method, url, headers, content)
        length = headers.get("Content-Length")
        budget = client_policy(self._http)[1].budget(
            size if size is not None else int(length) if length and length.isdigit() else None
        )
        request.extensions = with_deadline(request.extensions, Deadline(budget))
        try:
            resp = self._http.send(request, stream=True, follow_redirects=follow_redirects)
        except httpx.HTTPError as exc:
            raise self.transport_error(op, exc) from exc
        if resp.status_code == 400 and url.scheme == "http" and self._answers_https(op, url):
            resp.close()
            self._tls.add(host)
            return self._send_once(
                op, method, url, headers, content, follow_redirects=follow_redirects, size=size
            )
        return resp

    def _answers_https(self, op: Op, url: httpx.URL) -> bool:
        """Whether the plain-HTTP registry at ``url`` is a TLS server refusing plain HTTP.

        A loopback registry is spoken to over HTTP first (as Docker treats it as insecure);
        one serving TLS answers a plain request with a bare 400 that says so (Go's "Client
        sent an HTTP request to an HTTPS server", nginx's "plain HTTP request was sent to
        HTTPS port"). A HEAD has no body to tell, so ``/v2/`` is asked with a GET.
        """
        if url.netloc.decode() != op.ref.registry:
            return False
        try:
            probe = self._http.get(url.copy_with(path="/v2/", query=None), follow_redirects=False)
        except httpx.HTTPError:
            return False
        return probe.status_code == 400 and "https" in probe.text.lower()

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

    def _token_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._token_locks.setdefault(key, threading.Lock())

    def _renew(self, op: Op, host: str, challenge: Challenge, *, refused: str | None) -> None:
        """Answer ``challenge`` once, however many requests met it at the same time.

        Blobs go up four at a time, and each upload's first request meets the same 401:
        a token another one got meanwhile, for this very challenge, is used; the one that
        was just refused (``refused``, the header sent) never is.
        """
        key = (host, op.scope)
        with self._token_lock(key):
            current = self._tokens.get(key)
            fresh = current is not None and f"Bearer {current}" != refused
            if fresh and self._answered.get(key) == challenge:
                return
            self._authorize(op, host, challenge)

    def _authorize(self, op: Op, host: str, challenge: Challenge) -> None:
        """Obtain what ``_auth_header`` will send next, for a fresh challenge."""
        if challenge.scheme == "basic":
            return  # credentials are added by _auth_header (or we stay unauthorized)
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"{op.verb} {op.ref}: Bearer challenge without a realm")
        scopes = op.scope.split()
        # A challenge may name several scopes in one parameter, space-separated; the token
        # service takes each as a `scope` parameter of its own.
        for extra in (challenge.get("scope") or "").split():
            if extra not in scopes:
                scopes.append(extra)
        resp = self._request_token(op, host, realm, scopes, challenge.get("service"))
        if resp.status_code in (401, 403):
            raise self.status_error(op, resp, f"token from {realm}")
        if resp.status_code != 200:
            raise self.status_error(op, resp, f"token from {realm}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(
                f"{op.verb} {op.ref}: token service {redact(realm)} returned no token",
                hint="check the registry's auth service",
            )
        self._tokens[(host, op.scope)] = token
        self._answered[(host, op.scope)] = challenge

    def _request_token(
        self, op: Op, host: str, realm: str, scopes: list[str], service: str | None
    ) -> httpx.Response:
        """Ask the token service for ``scopes``: an identity token is exchanged, else Basic."""
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
            raise self.transport_error(op, exc, what=f"token service {realm}") from exc
        return resp

    def _build(
        self, method: str, url: httpx.URL, headers: dict[str, str], content: Body | None
    ) -> httpx.Request:
        body = content() if content is not None else None
        if isinstance(body, httpx.SyncByteStream):
            request = self._http.build_request(method, url, headers=headers)
            request.stream = body
            return request
        return self._http.build_request(method, url, headers=headers, content=body)

    def transport_error(
        self, op: Op, exc: httpx.HTTPError, *, what: str | None = None
    ) -> RegistryError:
        """One line for a request that got no answer: ``pulling REF: URL timed out``."""
        # A realm (or a server's error text) may carry user:password: never shown.
        target = redact_text(what or self.base_url(op.ref.registry))
        untrusted = _certificate_failure(exc)
        if untrusted is not None:
            return RegistryError(
                f"{op.verb} {op.ref}: {target} has a TLS certificate we cannot verify "
                f"({untrusted})",
                hint="if a private CA signed it, point SSL_CERT_FILE at a bundle holding that CA",
            )
        if isinstance(exc, TransferDeadlineExceeded):
            detail = str(exc)
        elif isinstance(exc, httpx.TimeoutException):
            detail = "timed out"
        elif isinstance(exc, httpx.ConnectError):
            detail = f"cannot connect ({exc})"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return RegistryError(
            f"{op.verb} {op.ref}: {target} {redact_text(detail)}",
            hint="check the registry address, your network or proxy settings, and retry",
        )

    def _refused_user(self, registry: str) -> str | None:
        """The user whose password a Basic challenge refused (``None``: none was sent)."""
        challenge = self._challenges.get(registry)
        creds = self._credentials.get(registry) if self._credentials else None
        if challenge is None or challenge.scheme != "basic" or creds is None:
            return None
        return None if creds.identity_token else creds.username

    def status_error(self, op: Op, resp: httpx.Response, what: str) -> RegistryError:
        """One line for a refusal or failure answer, with the fix its status suggests."""
        code, message = _error_body(resp)
        status = resp.status_code
        detail = redact_text(f"{what}: {code + ' ' if code else ''}{message}".rstrip(": "))
        registry = op.ref.registry
        if status == 401:
            user = self._refused_user(registry)
            if user is not None:
                return RegistryError(
                    f"unauthorized {op.verb} {op.ref}: the registry refused the login of "
                    f"{user!r} ({detail})",
                    hint=f"check the password, then log in again with docker login {registry}",
                )
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


def _certificate_failure(exc: BaseException) -> str | None:
    """The verifier's reason when ``exc`` comes from a server certificate we do not trust."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> ssl; a bound, in case a chain loops
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or "certificate verify failed")
        seen = seen.__cause__ or seen.__context__
    return None

"""The one HTTP layer: the run's client factory and the retry transport inside it.

Every request the program makes (index pages, metadata files, wheel and sdist downloads,
registry calls) goes through a client from ``http_client``. Its transport retries what is
worth another attempt, a bounded number of times with exponential backoff:

- transport failures: connect, read and write errors, timeouts, a peer that closed or reset
  the connection (``httpx.NetworkError``, ``httpx.TimeoutException``,
  ``httpx.RemoteProtocolError``);
- answers 408, 429 and 5xx, waiting as long as ``Retry-After`` asks (seconds or an HTTP
  date), capped.

Only replayable requests are retried: GET and HEAD always, others only when their body is
held in memory (never a stream that was already consumed). When the attempts run out the
caller gets the last answer or the last exception, as without retries, and turns it into
one line; ``attempts(outcome)`` says how many attempts it took.

Retries end where the response's headers arrive: a body that breaks off while the caller
streams it is retried by ``net.transfer.fetch_retrying``, which sends the request again on
the same budget of attempts.

Nothing waits for ever. Each read and connect has a timeout (``Timeouts``), and a request
that carries a ``Deadline`` (``with_deadline``; the transfer helper always gives one) ends
at it: attempts are cut short, no wait runs past it, and a body still arriving then fails
with ``TransferDeadlineExceeded``, so a server that trickles a byte at a time cannot hold a
build.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from imagebuild import __version__

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504} | set(range(505, 600)))
"""Answers worth another attempt: request timeout, too many requests, server errors."""

RETRY_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.NetworkError,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
)
"""Transport failures worth another attempt (a bad URL or scheme is not one of them)."""

_REPLAYABLE_METHODS = frozenset({"GET", "HEAD"})
_ATTEMPTS_KEY = "imgbuild.attempts"  # in a final response's extensions
_ATTEMPTS_ATTR = "imgbuild_attempts"  # on a final exception
_DEADLINE_KEY = "imgbuild.deadline"  # in a request's extensions: a Deadline
_FIRST_ATTEMPT_KEY = "imgbuild.first_attempt"  # in a request's extensions: attempts used + 1


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How often and how patiently a request is retried."""

    attempts: int = 3
    """Attempts in all, the first one included (1: no retries)."""
    backoff: float = 0.1
    """Seconds before the second attempt; doubled for each one after it."""
    max_wait: float = 30.0
    """The longest wait between two attempts, whatever ``Retry-After`` asks for."""
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    """How to wait (tests pass a function that records the delay and returns at once)."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        wait = self.backoff * 2 ** (attempt - 1) if retry_after is None else retry_after
        return max(0.0, min(wait, self.max_wait))


DEFAULT_RETRY = RetryPolicy()
"""Three attempts, 0.1 s then 0.2 s apart (or what Retry-After asks, up to 30 s)."""

NO_RETRY = RetryPolicy(attempts=1)
"""One attempt: what a client that does not come from ``http_client`` does."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """How long the network may keep a request waiting, per step and per transfer."""

    connect: float = 15.0
    """Seconds to open a connection."""
    read: float = 30.0
    """Seconds to wait for the next bytes of an answer: longer silence means stalled."""
    deadline: float = 300.0
    """Seconds for one whole transfer, every attempt and wait between them included."""
    min_rate: float = 128 * 1024
    """Bytes per second a transfer of a known size is allowed on top of ``deadline``.

    The size comes from the lock or the index page (``budget(size)``), never from the
    server's own Content-Length, so a hostile server cannot buy itself more time.
    """
    max_deadline: float = 3600.0
    """The longest a single transfer may take, whatever its size."""

    def budget(self, size: int | None = None) -> float:
        """Seconds a transfer of ``size`` bytes (None: unknown) may take in all."""
        extra = size / self.min_rate if size and size > 0 and self.min_rate > 0 else 0.0
        return min(self.deadline + extra, max(self.max_deadline, self.deadline))

    def httpx_timeout(self) -> httpx.Timeout:
        """The per-step timeouts as httpx takes them (writes and the pool wait as reads)."""
        return httpx.Timeout(self.read, connect=self.connect)


DEFAULT_TIMEOUTS = Timeouts()
"""Connect 15 s, read 30 s, 300 s a transfer (plus 1 s per 128 KiB of known size, up to 1 h)."""


class TransferDeadlineExceeded(httpx.TimeoutException):
    """A transfer was still unfinished when its deadline came (a server trickling bytes)."""


class Deadline:
    """The moment a transfer must be over by, on the monotonic clock."""

    __slots__ = ("_at", "_clock", "seconds")

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        """The budget it was started with (for messages)."""
        self._clock = clock
        self._at = clock() + seconds

    def remaining(self) -> float:
        """Seconds left (negative once it has passed)."""
        return self._at - self._clock()

    def allows(self, wait: float) -> bool:
        """Whether waiting ``wait`` seconds still leaves time for another attempt."""
        return self.remaining() > wait

    def check(self, request: httpx.Request | None = None) -> None:
        """Raise ``TransferDeadlineExceeded`` once the deadline has passed."""
        if self.remaining() <= 0:
            raise TransferDeadlineExceeded(
                f"not finished within {self.seconds:g} s (the deadline for one transfer)",
                request=request,
            )

    def clip(self, request: httpx.Request) -> None:
        """Shorten ``request``'s connect/read/write/pool timeouts to the time left."""
        left = max(self.remaining(), 0.001)
        timeouts = dict(request.extensions.get("timeout") or {})
        for key in ("connect", "read", "write", "pool"):
            value = timeouts.get(key)
            timeouts[key] = left if value is None else min(value, left)
        request.extensions["timeout"] = timeouts


def with_deadline(
    extensions: dict[str, Any] | None, deadline: Deadline, *, first_attempt: int = 1
) -> dict[str, Any]:
    """``extensions`` for a request that must end by ``deadline``.

    ``first_attempt`` is the number of the first attempt the retry transport makes for it
    (a body retried after ``n`` attempts starts at ``n + 1``, so all share one bound).
    """
    merged = dict(extensions or {})
    merged[_DEADLINE_KEY] = deadline
    merged[_FIRST_ATTEMPT_KEY] = first_attempt
    return merged


class _DeadlineStream(httpx.SyncByteStream):
    """A response body that fails once its transfer's deadline has passed."""

    def __init__(
        self, inner: httpx.SyncByteStream, deadline: Deadline, request: httpx.Request
    ) -> None:
        self._inner = inner
        self._deadline = deadline
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        self._deadline.check(self._request)
        for chunk in self._inner:
            self._deadline.check(self._request)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class RetryTransport(httpx.BaseTransport):
    """A transport that retries replayable requests through the transport it wraps."""

    def __init__(self, wrapped: httpx.BaseTransport, *, policy: RetryPolicy = DEFAULT_RETRY):
        self._wrapped = wrapped
        self._policy = policy

    @property
    def policy(self) -> RetryPolicy:
        """The policy this transport retries by."""
        return self._policy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, again after a retryable failure, until the attempts run out.

        A request with a ``Deadline`` (``with_deadline``) also ends at it: each attempt's
        timeouts are cut to the time left, a wait that would cross it ends the retries, and
        the body fails once it has passed.
        """
        replayable = is_replayable(request)
        deadline = request.extensions.get(_DEADLINE_KEY)
        deadline = deadline if isinstance(deadline, Deadline) else None
        attempt = int(request.extensions.get(_FIRST_ATTEMPT_KEY, 1))
        while True:
            last = attempt >= self._policy.attempts or not replayable
            if deadline is not None:
                deadline.check(request)
                deadline.clip(request)
            try:
                response = self._wrapped.handle_request(request)
            except RETRY_ERRORS as exc:
                wait = self._policy.delay(attempt, None)
                if last or (deadline is not None and not deadline.allows(wait)):
                    note_attempts(exc, attempt)
                    raise
            else:
                wait = self._policy.delay(attempt, retry_after(response))
                if (
                    last
                    or response.status_code not in RETRY_STATUSES
                    or (deadline is not None and not deadline.allows(wait))
                ):
                    return _final(response, request, attempt, deadline)
                response.close()
            self._policy.sleep(wait)
            attempt += 1

    def close(self) -> None:
        """Close the wrapped transport."""
        self._wrapped.close()


def _final(
    response: httpx.Response, request: httpx.Request, attempt: int, deadline: Deadline | None
) -> httpx.Response:
    response.extensions[_ATTEMPTS_KEY] = attempt
    if deadline is not None and isinstance(response.stream, httpx.SyncByteStream):
        response.stream = _DeadlineStream(response.stream, deadline, request)
    return response


def is_replayable(request: httpx.Request) -> bool:
    """Whether sending ``request`` again sends the same thing (see the module doc)."""
    return request.method in _REPLAYABLE_METHODS or isinstance(request.stream, httpx.ByteStream)


def retry_after(response: httpx.Response, *, now: datetime | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds; None if absent or unreadable."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    import email.utils  # (a date here is rare: not imported by every run)

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def attempts(outcome: httpx.Response | BaseException) -> int:
    """How many attempts the retry transport made for this final answer or failure.

    1 for anything that did not pass through a ``RetryTransport``.
    """
    if isinstance(outcome, httpx.Response):
        value: object = outcome.extensions.get(_ATTEMPTS_KEY, 1)
    else:
        value = getattr(outcome, _ATTEMPTS_ATTR, 1)
    return value if isinstance(value, int) else 1


def note_attempts(exc: BaseException, count: int) -> None:
    """Record on a final failure that it took ``count`` attempts (read by ``attempts``)."""
    setattr(exc, _ATTEMPTS_ATTR, count)


class _RetryingClient(httpx.Client):
    """An ``httpx.Client`` whose every transport (direct, proxy or given) retries.

    httpx builds the proxy transports from the environment (``trust_env``) itself; wrapping
    them where it builds them keeps its proxy and ``NO_PROXY`` rules instead of copying them.
    """

    def __init__(self, *, retry: RetryPolicy, timeouts: Timeouts, **kwargs: Any) -> None:
        self._retry_policy = retry  # read while httpx.Client.__init__ builds transports
        self.retry_policy = retry
        """The policy every transport of this client retries by."""
        self.timeouts = timeouts
        """The timeouts and transfer deadline this client was made with."""
        super().__init__(timeout=timeouts.httpx_timeout(), **kwargs)

    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx.BaseTransport:
        make = super()._init_transport
        if kwargs.get("transport") is not None:
            return RetryTransport(make(*args, **kwargs), policy=self._retry_policy)
        return _LazyTransport(
            lambda: RetryTransport(make(*args, **_trusting(kwargs)), policy=self._retry_policy),
            # Only plain http:// requests go through this one: it never carries TLS, so it
            # needs no certificates (a redirect to https:// comes back through the other).
            plain=lambda: RetryTransport(
                make(*args, **{**kwargs, "verify": False}), policy=self._retry_policy
            ),
        )

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx.BaseTransport:
        make = super()._init_proxy_transport
        return _LazyTransport(
            lambda: RetryTransport(make(*args, **_trusting(kwargs)), policy=self._retry_policy)
        )


def _trusting(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Httpx's transport arguments, with the context ``trusted_context`` keeps for ``True``."""
    if kwargs.get("verify") is True and kwargs.get("trust_env", True):
        return {**kwargs, "verify": trusted_context()}
    return kwargs


_CONTEXTS: dict[tuple[object, ...], ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def trusted_context() -> ssl.SSLContext:
    """The TLS context httpx makes from the environment, made once per process for it.

    That is from ``SSL_CERT_FILE``, else ``SSL_CERT_DIR``, else certifi's bundle. Loading
    the certificates costs about 25 ms. The resident server makes the context before it
    forks, so a build it runs with the same variables (the same files) does not load them
    again; another file, or a changed one, gets a context of its own.
    """
    values = tuple(os.environ.get(name) or None for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"))
    key: list[object] = [values]
    for value in values:
        try:
            info = os.stat(value) if value else None
        except OSError:
            info = None
        key.append(None if info is None else (info.st_ino, info.st_size, info.st_mtime_ns))
    with _CONTEXTS_LOCK:
        context = _CONTEXTS.get(tuple(key))
        if context is None:
            context = _CONTEXTS[tuple(key)] = httpx.create_ssl_context(trust_env=True)
    return context


class _LazyTransport(httpx.BaseTransport):
    """A transport made when its first request comes.

    A run that sends none (a rebuild from the cache) never loads the CA certificates,
    which costs a warm build about 40 ms; with a ``plain`` transport for ``http://``
    requests, nor does a run that only talks to a plain-HTTP registry or index (a CI
    runner's loopback or private mirror: 25 ms before its first answer).

    Certificates that cannot be loaded (``SSL_CERT_FILE`` naming no file, say) fail that
    request with a ``ConnectError`` saying so, not retried: every later one would fail alike.
    """

    def __init__(
        self,
        make: Callable[[], httpx.BaseTransport],
        *,
        plain: Callable[[], httpx.BaseTransport] | None = None,
    ) -> None:
        self._makers = {"tls": make, "plain": plain or make}
        self._made: dict[str, httpx.BaseTransport] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the transport, made now if this is the first."""
        return self._transport(request).handle_request(request)

    def _transport(self, request: httpx.Request) -> httpx.BaseTransport:
        kind = "plain" if request.url.scheme == "http" else "tls"
        with self._lock:
            if kind not in self._made:
                try:
                    self._made[kind] = self._makers[kind]()
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    # httpx read them from these variables (trust_env): name what they say.
                    given = [
                        f"{name}={os.environ[name]}"
                        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")
                        if os.environ.get(name)
                    ]
                    raise httpx.ConnectError(
                        f"cannot load the TLS certificates to trust "
                        f"({', '.join(given) or 'the system store'}): {exc}; "
                        "check SSL_CERT_FILE and SSL_CERT_DIR",
                        request=request,
                    ) from exc
            return self._made[kind]

    def close(self) -> None:
        """Close the transports requests made."""
        with self._lock:
            for made in self._made.values():
                made.close()


def http_client(
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    auth: httpx.Auth | None = None,
    transport: httpx.BaseTransport | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> httpx.Client:
    """The one HTTP client for a run, retrying as the module doc says.

    It honours ``SSL_CERT_FILE``/``SSL_CERT_DIR`` and the proxy variables (``trust_env``),
    follows redirects, and names itself ``imgbuild/<version>``. ``transport`` replaces the
    network (tests pass an ``httpx.MockTransport``; the environment is then ignored).
    ``timeouts`` sets the connect and read timeouts and the deadline the transfer helper
    gives each transfer (tests pass tiny ones).
    """
    return _RetryingClient(
        retry=retry,
        timeouts=timeouts,
        follow_redirects=True,
        headers={"User-Agent": f"imgbuild/{__version__}"},
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        auth=auth,
        transport=transport,
        trust_env=transport is None,
    )


def retrying_client(
    transport: httpx.BaseTransport,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> httpx.Client:
    """A client like ``http_client``'s over ``transport`` (an ``httpx.MockTransport``)."""
    return http_client(retry=retry, transport=transport, timeouts=timeouts)


def client_policy(http: httpx.Client) -> tuple[RetryPolicy, Timeouts]:
    """The retry policy and timeouts ``http`` was made with.

    A client that does not come from ``http_client`` retries nothing (``NO_RETRY``); its
    transfers still get the default deadline budget, though only a retry transport
    enforces it.
    """
    if isinstance(http, _RetryingClient):
        return http.retry_policy, http.timeouts
    return NO_RETRY, DEFAULT_TIMEOUTS

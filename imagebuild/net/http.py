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
streams it is the caller's failure to report (a replay could not resume it).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
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


class RetryTransport(httpx.BaseTransport):
    """A transport that retries replayable requests through the transport it wraps."""

    def __init__(self, wrapped: httpx.BaseTransport, *, policy: RetryPolicy = DEFAULT_RETRY):
        self._wrapped = wrapped
        self._policy = policy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, again after a retryable failure, until the attempts run out."""
        replayable = is_replayable(request)
        attempt = 1
        while True:
            last = attempt >= self._policy.attempts or not replayable
            try:
                response = self._wrapped.handle_request(request)
            except RETRY_ERRORS as exc:
                if last:
                    setattr(exc, _ATTEMPTS_ATTR, attempt)
                    raise
                wait = self._policy.delay(attempt, None)
            else:
                if last or response.status_code not in RETRY_STATUSES:
                    response.extensions[_ATTEMPTS_KEY] = attempt
                    return response
                wait = self._policy.delay(attempt, retry_after(response))
                response.close()
            self._policy.sleep(wait)
            attempt += 1

    def close(self) -> None:
        """Close the wrapped transport."""
        self._wrapped.close()


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


class _RetryingClient(httpx.Client):
    """An ``httpx.Client`` whose every transport (direct, proxy or given) retries.

    httpx builds the proxy transports from the environment (``trust_env``) itself; wrapping
    them where it builds them keeps its proxy and ``NO_PROXY`` rules instead of copying them.
    """

    def __init__(self, *, retry: RetryPolicy, **kwargs: Any) -> None:
        self._retry_policy = retry  # read while httpx.Client.__init__ builds transports
        super().__init__(**kwargs)

    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx.BaseTransport:
        return RetryTransport(super()._init_transport(*args, **kwargs), policy=self._retry_policy)

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx.BaseTransport:
        inner = super()._init_proxy_transport(*args, **kwargs)
        return RetryTransport(inner, policy=self._retry_policy)


def http_client(
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    auth: httpx.Auth | None = None,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """The one HTTP client for a run, retrying as the module doc says.

    It honours ``SSL_CERT_FILE``/``SSL_CERT_DIR`` and the proxy variables (``trust_env``),
    follows redirects, and names itself ``imgbuild/<version>``. ``transport`` replaces the
    network (tests pass an ``httpx.MockTransport``; the environment is then ignored).
    """
    return _RetryingClient(
        retry=retry,
        timeout=httpx.Timeout(60.0, connect=15.0),
        follow_redirects=True,
        headers={"User-Agent": f"imgbuild/{__version__}"},
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        auth=auth,
        transport=transport,
        trust_env=transport is None,
    )


def retrying_client(
    transport: httpx.BaseTransport, *, retry: RetryPolicy = DEFAULT_RETRY
) -> httpx.Client:
    """A client like ``http_client``'s over ``transport`` (an ``httpx.MockTransport``)."""
    return http_client(retry=retry, transport=transport)
